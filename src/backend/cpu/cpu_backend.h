// The CPU backend: the reference implementation of every op (f32 arithmetic, multi-threaded).
#pragma once
#include <cmath>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace trellm {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  void* alloc(size_t bytes) override;
  void release(void* p) override;
  void to_host(void* dst, const void* src, size_t bytes) override;
  void from_host(void* dst, const void* src, size_t bytes) override;
  void fill_random(TensorView t, uint64_t seed, float scale) override;
  bool host_memory() const override { return true; }
  DType kv_dtype() const override { return DType::F32; }

  void embed(TensorView out, TensorView tokens, TensorView table) override;
  void rms_norm(TensorView out, TensorView x, TensorView w, float eps) override;
  void add(TensorView out, TensorView a, TensorView b) override;
  void add_rms_norm(TensorView h, TensorView y, TensorView w, float eps, TensorView out) override;
  void matmul(TensorView out, TensorView x, const Linear& w) override;
  void silu_mul(TensorView out, TensorView gate, TensorView up) override;
  void rope(TensorView x, int offset, const Positions& pos, const RopeParams& rope) override;
  void mla_cache_append(TensorView cache, TensorView kv, TensorView norm_w, float eps, const Positions& pos,
                        const RopeParams& rope) override;
  void attention_mla(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const Positions& pos,
                     const MlaDims& dims, MlaMode mode) override;
  void moe_route(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias,
                 const MoeRouting& r) override;
  void moe_ffn(TensorView out, TensorView x, TensorView weights, TensorView ids, std::span<const Expert> experts,
               const Expert* shared) override;
  void sample_step(TensorView logits, TensorView params, TensorView token, TensorView pos,
                   TensorView history) override;
  void sample_rows(TensorView logits, TensorView params, TensorView steps, TensorView tokens) override;
  void gather_rows(TensorView out, TensorView x, TensorView idx) override;
  void spec_verify(const SpecVerify& v) override;
  void spec_prepare(const SpecPrepare& p) override;

 private:
  void add_bias(TensorView out, const Linear& w);
  void matmul_unobserved(TensorView out, TensorView x, const Linear& w);
  void observe_latents(const Linear& kv_b, TensorView cache, const Positions& pos, int rank);
  // Trellis-coded Linears run through the fused product (trellis_gemm.h: tiles decoded on the fly, nothing decoded
  // is kept; cpu_trellis.cpp). A batch of products (the routed experts' gate and up, ...) shares one
  // parallel_for per phase: input transforms, strips, output transforms.
  struct TrellisJob {
    const trellis::TrellisWeight* w;
    const float* x;  // [m, in]
    int64_t m;
    float* y;        // [m, out], bias added
  };
  void trellis_products(const TrellisJob* jobs, size_t n_jobs);
  void matmul_trellis(TensorView out, TensorView x, const Linear& w);
  // moe_ffn when every expert that runs is trellis-coded (cpu_moe.cpp); rows[e]: expert e's (token * K + slot)s.
  void moe_ffn_trellis(TensorView out, TensorView x, TensorView weights, const std::vector<std::vector<int64_t>>& rows,
                       int64_t K, std::span<const Expert> experts, const Expert* shared);
  // Absorbed MLA attention with a trellis-coded kv_b_proj, its per-head slices through the fused product
  // (cpu_attention.cpp).
  // cache: f32 rows of width cache_width; row t of the sequence at pool row kv_pool_row(table, t), or at row t when
  // table is nullptr (a gathered copy).
  void attention_absorbed_trellis(TensorView out, TensorView q, const float* cache, const int32_t* table, const Linear& kv_b,
                                  const int32_t* pos, const MlaDims& d);
  void gather_sequence(float* dst, TensorView cache, const int32_t* table, int64_t rows);
  void attention_absorbed(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const int32_t* pos, const MlaDims& d);
  void attention_expanded(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const int32_t* pos, const MlaDims& d);
  // Grow-only scratch (the forward pass stops allocating after its first step).
  float* scratch(size_t slot, size_t floats);
  std::vector<std::vector<float>> scratch_;
};

// Asserts that every row of `pos` (n rows) maps to a pool row below pool_rows through its block table.
void check_cache_rows(const Positions& pos, int64_t n, int64_t pool_rows);

namespace cpu {
// Building blocks shared by the CPU ops (also used by tests as straightforward references).
void rope_rotate(float* x, int dim, int pos, float theta);
// The sampling reference (SamplingParams in backend.h): the filters as one logit threshold (by sorting), then
// Gumbel-max over the survivors.
struct SampleFilter {
  int64_t best = 0;              // the argmax (ties: the lowest id), the greedy token
  float threshold = -INFINITY;   // temperature > 0: logits >= threshold (and finite) survive
  bool keeps(float x) const { return std::isfinite(x) && x >= threshold; }
};
SampleFilter sample_filter(const float* logits, int64_t n, const SamplingParams& p);  // an Error when no logit is finite
int32_t sample_token(const float* logits, int64_t n, const SamplingParams& p, uint64_t step);
// The distribution sample_token draws from: softmax(l / T) over the survivors, zero elsewhere (greedy: one-hot).
void sample_probs(const float* logits, int64_t n, const SamplingParams& p, double* probs);
// Backend::spec_verify for one sequence: target [K+1, V], draft[j] -> draft j's logits [V], drafts [K], out [K+2].
void spec_verify_one(const float* target, const float* const* draft, const int32_t* drafts, int K, int64_t V,
                     const SamplingParams& p, uint64_t step, int32_t* out);
// The noise of token i at `step`: a uniform in (0, 1) from a counter-based hash (the CUDA kernel has the same).
double sample_uniform(uint64_t seed, uint64_t step, uint64_t i);
}  // namespace cpu

}  // namespace trellm
