// The CUDA backend: every op of backend.h on one GPU and one stream. Weights are uploaded once; activations
// are f32; scratch grows only during the first (warm-up) steps, so later steps can be captured as CUDA graphs.
#pragma once
#include <memory>

#include "backend/backend.h"

namespace trellm::cuda {
struct MoeResidual;  // trellis_kernels.h
}

namespace trellm {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device, const CudaOptions& options = {});
  ~CudaBackend() override;

  std::string name() const override;
  void* alloc(size_t bytes) override;
  void release(void* p) override;
  void to_host(void* dst, const void* src, size_t bytes) override;
  void from_host(void* dst, const void* src, size_t bytes) override;
  void fill_random(TensorView t, uint64_t seed, float scale) override;
  void synchronize() override;
  std::unique_ptr<StepGraph> capture(const std::function<void()>& step) override;
  uint64_t memory_epoch() const override;
  int record_event() override;
  double elapsed_ms(int from, int to) override;
  std::pair<size_t, size_t> memory_used_total() override;
  double copy_bandwidth() override;
  bool kernel_clocks_available() const override;
  void kernel_clocks_begin(size_t max_records) override;
  KernelClocks kernel_clocks_end() override;
  bool host_memory() const override { return false; }
  DType kv_dtype() const override { return DType::BF16; }

  void embed(TensorView out, TensorView tokens, TensorView table) override;
  void rms_norm(TensorView out, TensorView x, TensorView w, float eps) override;
  void add(TensorView out, TensorView a, TensorView b) override;
  void add_rms_norm(TensorView h, TensorView y, TensorView w, float eps, TensorView out) override;
  void matmul(TensorView out, TensorView x, const Linear& w) override;
  void matmul_pair(TensorView out1, TensorView out2, TensorView x, const Linear& w1, const Linear& w2) override;
  void silu_mul(TensorView out, TensorView gate, TensorView up) override;
  void rope(TensorView x, int offset, const Positions& pos, const RopeParams& rope) override;
  void mla_cache_append(TensorView cache, TensorView kv, TensorView norm_w, float eps, const Positions& pos,
                        const RopeParams& rope) override;
  void mla_rope_append(TensorView q, int offset, TensorView cache, TensorView kv, TensorView norm_w, float eps,
                       const Positions& pos, const RopeParams& rope) override;
  void rms_norm_matmul(TensorView out, TensorView x, TensorView norm_w, float eps, const Linear& w) override;
  void attention_mla(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const Positions& pos,
                     const MlaDims& dims, MlaMode mode) override;
  void attention_mla_append(TensorView out, TensorView q, int offset, TensorView cache, TensorView kv, TensorView norm_w,
                            float eps, const Linear& kv_b, const Positions& pos, const MlaDims& dims,
                            const RopeParams& rope, MlaMode mode) override;
  void moe_route(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias,
                 const MoeRouting& r) override;
  void add_rms_norm_route(TensorView h, TensorView y, TensorView norm_w, float eps, TensorView x, TensorView weights,
                          TensorView ids, TensorView gate, TensorView bias, const MoeRouting& r) override;
  void moe_ffn(TensorView out, TensorView x, TensorView weights, TensorView ids, std::span<const Expert> experts,
               const Expert* shared) override;
  void moe_ffn_add_rms_norm(TensorView out, TensorView x, TensorView weights, TensorView ids, std::span<const Expert> experts,
                            const Expert* shared, TensorView h, TensorView norm_w, float eps, TensorView x_next) override;
  void sample_step(TensorView logits, TensorView params, TensorView token, TensorView pos,
                   TensorView history) override;
  void sample_rows(TensorView logits, TensorView params, TensorView steps, TensorView tokens) override;
  void spec_verify(const SpecVerify& v) override;
  void spec_prepare(const SpecPrepare& p) override;
  void gather_rows(TensorView out, TensorView x, TensorView idx) override;
  void forget_weights() override;

  void* stream() const;  // the cudaStream_t every op runs on
  // attention_mla on the v1 kernels (f32 CUDA cores) even where the tensor-core ones apply: the ladder
  // baseline for tests and bench/bench_attention.
  void use_mla_v1(bool on);

  struct Impl;

 private:
  void matmul_unobserved(TensorView out, TensorView x, const Linear& w);
  void matmul_trellis(TensorView out, TensorView x, const Linear& w);
  // The trellis linear w dequantized to bf16 in a scratch buffer (valid until the next call), as a dense Linear
  // with w's bias.
  Linear dequantized(const Linear& w);
  // out[n, w.out] = xh · Wᵀ + b (+ beta · out) with W the trellis linear w dequantized for this call and xh the bf16
  // activations [n, w.in] (converted once by the caller when several products share them).
  void gemm_dequantized(float* out, const uint16_t* xh, int64_t n, const Linear& w, float beta);
  // res: the residual step fused after the experts (decode only; moe_ffn_add_rms_norm).
  void moe_ffn_trellis(TensorView out, TensorView x, TensorView weights, TensorView ids, std::span<const Expert> experts,
                       const Expert* shared, const cuda::MoeResidual* res = nullptr);
  // moe_ffn while a Linear observer is set (calibration): expert by expert through observed matmuls.
  void moe_ffn_observed(TensorView out, TensorView x, TensorView weights, TensorView ids, std::span<const Expert> experts,
                        const Expert* shared);
  // Prefill router: logits by cuBLAS SGEMM against an f32 copy of the bf16 gate (made once), then selection.
  void route_by_gemm(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias, const MoeRouting& r);
  // w itself when dense; else its bf16 dequantization (cached), described in tmp.
  const Linear& dense_bf16(const Linear& w, Linear& tmp);
  // The tensor-core MLA kernels apply (GLM's latent dims, a dense bf16 kv_b after dense_bf16).
  bool mla_fast(TensorView out, const Linear& kv_b, const Positions& pos, const MlaDims& d, int n) const;

  std::unique_ptr<Impl> impl_;
};

}  // namespace trellm
