// The CPU backend: the reference implementation of every op (f32 arithmetic, multi-threaded).
#pragma once
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace trellm {

class CpuBackend final : public Backend {
 public:
  // Calibration hook: when set, called with every Linear and the rows x [n, in] (f32, contiguous) it is
  // applied to — by matmul, by moe_ffn's experts (only the rows routed to each expert) and, for kv_b_proj, by
  // attention_mla with the latent rows c_kv of the step's tokens (both attention forms see each token once).
  // Empty by default: the hot path then pays one branch per op.
  using LinearObserver = std::function<void(const Linear& w, TensorView x)>;
  void set_linear_observer(LinearObserver observer) { observer_ = std::move(observer); }

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

 private:
  void add_bias(TensorView out, const Linear& w);
  void matmul_unobserved(TensorView out, TensorView x, const Linear& w);
  void observe_latents(const Linear& kv_b, TensorView cache, const Positions& pos, int rank);
  LinearObserver observer_;
  // A dense f32 copy of a trellis-coded Linear, made on first use and kept (the absorbed attention reads
  // kv_b_proj per head, which the row-major trellis product cannot slice).
  const Linear& dense_view(const Linear& w);
  struct DenseCopy {
    std::vector<float> data;
    Linear lin;
  };
  std::unordered_map<const trellis::TrellisWeight*, DenseCopy> dense_cache_;
  // Trellis matmuls keep each weight's decoded Q (f32, in_padded x out_padded) after first use, while the cache
  // stays under kDecodedCacheBytes, instead of decoding every tile on every call (the reference's way, which
  // costs ~10 ns per weight): the 3-bit default model runs ~30x faster. Larger models fall back to the
  // reference product.
  static constexpr size_t kDecodedCacheBytes = size_t(4) << 30;
  std::unordered_map<const trellis::TrellisWeight*, std::vector<float>> decoded_;
  size_t decoded_bytes_ = 0;
  void matmul_trellis(TensorView out, TensorView x, const Linear& w);
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
// The sampling reference (SamplingParams in backend.h): thresholds by sorting, then Gumbel-max.
int32_t sample_token(const float* logits, int64_t n, const SamplingParams& p, uint64_t step);
// The noise of token i at `step`: a uniform in (0, 1) from a counter-based hash (the CUDA kernel has the same).
double sample_uniform(uint64_t seed, uint64_t step, uint64_t i);
}  // namespace cpu

}  // namespace trellm
