// The CUDA backend's own kernels (everything but the trellis GEMV/GEMM/MoE kernels, which live in
// trellis_kernels.h). Framework-free: raw device pointers, sizes and a stream. Activations are f32.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/kv_pages.h"
#include "core/dtype.h"

namespace trellm::cuda {

// out[i, :] = table[tokens[i], :] (table F32/F16/BF16 [vocab, d])
void embed(float* out, const int32_t* tokens, const void* table, DType dt, int n, int d, cudaStream_t s);
// out = x / rms(x) * w per row (out may alias x)
void rms_norm(float* out, const float* x, const float* w, int n, int d, float eps, cudaStream_t s);
void add(float* out, const float* a, const float* b, int64_t n, cudaStream_t s);
// h += y; out = h / rms(h) * w, per row (one kernel: the residual add fused with the next norm), one block of
// kAddRmsNormThreads a row (the MoE decode's fused form uses the same: moe_experts' MoeResidual).
constexpr int kAddRmsNormThreads = 256;
void add_rms_norm(float* h, const float* y, const float* w, float* out, int n, int d, float eps, cudaStream_t s);
void silu_mul(float* out, const float* gate, const float* up, int64_t n, cudaStream_t s);
// The same, rounded to bf16 (the input of the next cuBLAS product).
void silu_mul_bf16(uint16_t* out, const float* gate, const float* up, int64_t n, cudaStream_t s);
// out[i, :] += bias for n rows of width d
void add_bias(float* out, const float* bias, int n, int d, cudaStream_t s);
// f32 -> bf16 / f16 (for cuBLAS inputs)
void to_bf16(uint16_t* out, const float* x, int64_t n, cudaStream_t s);
void to_f16(uint16_t* out, const float* x, int64_t n, cudaStream_t s);
// out[0, n) = half(x), out[n, 2n) = half(x - half(x)) (bf16 or fp16): x in two 16-bit terms for a near-f32 product.
void split_half(uint16_t* out, const float* x, int64_t n, bool bf16, cudaStream_t s);
// out[i] = y[i] + y[n + i] (+ bias[i % d]): the two terms' products summed.
void add_halves(float* out, const float* y, int64_t n, const float* bias, int d, cudaStream_t s);
// bf16 -> f32
void bf16_to_f32(float* out, const uint16_t* x, int64_t n, cudaStream_t s);
// Interleaved RoPE in place on x [n, heads, head_dim], dims [offset, offset+dim), row i at position pos[i].
void rope(float* x, int n, int heads, int head_dim, int offset, int dim, const int32_t* pos, float theta, cudaStream_t s);
// The cache pool row of row i's position pos[i] (kv_pages.h) = bf16([rms_norm(kv[i, :rank]) | rope(kv[i, rank:])]),
// cache width rank + rope_dim.
void mla_cache_append(uint16_t* cache, const float* kv, const float* norm_w, int n, int rank, int rope_dim, float eps,
                      const int32_t* pos, const KvPages& pages, float theta, cudaStream_t s);
// rope(q, ...) and mla_cache_append(cache, kv, ...) in one launch (rope dims = dim for both).
void mla_rope_append(float* q, int heads, int head_dim, int offset, int dim, uint16_t* cache, const float* kv,
                     const float* norm_w, int n, int rank, float eps, const int32_t* pos, const KvPages& pages, float theta,
                     cudaStream_t s);
// out[i, :] = x[idx[i], :] for m rows of row_bytes bytes each.
void gather_rows(void* out, const void* x, const int32_t* idx, int m, int64_t row_bytes, cudaStream_t s);

// MLA attention over a paged bf16 latent cache pool [blocks * 64, rank+rope]: query row i attends to positions
// [0, pos[i]] of its sequence (pages.table(i)). bound: host-side upper bound on pos[i] + 1 (sizes grids).
// Absorbed: q [n, H, nope+rope], kv_b [H*(nope+v), rank] (BF16/F16/F32), out [n, H*v]; work:
// mla_absorbed_work_floats(n, H, rank, bound) floats; any mix of sequences. Expanded: the rows of one sequence.
struct MlaShape {
  int n, heads, rank, rope, nope, v;
  const int32_t* pos;
  int bound;
  float scale;
  KvPages pages;
};
size_t mla_absorbed_work_floats(int n, int heads, int rank, int T);
void mla_absorbed(float* out, const float* q, const uint16_t* cache, const void* kv_b, DType kv_b_dtype, const MlaShape& m,
                  float* work, cudaStream_t s);
// Expanded form, one key tile [t0, t0+nt): kvx [nt, H, nope+v] is that tile's kv_b expansion. Keeps an online
// softmax state (max, sum, acc) per (query, head) across tiles; mla_expanded_finish divides.
void mla_expanded_tile(const float* q, const uint16_t* cache, const float* kvx, int t0, int nt, const MlaShape& m,
                       float* acc, float* mx, float* den, cudaStream_t s);
void mla_expanded_init(float* acc, float* mx, float* den, int rows, int v, cudaStream_t s);
void mla_expanded_finish(float* out, const float* acc, const float* den, int rows, int v, cudaStream_t s);
// Gathers the latent part of positions [t0, t0+nt) of query row 0's sequence (pages.table(0)) into a contiguous
// f32 [nt, rank] buffer (cuBLAS input); positions past *last (the last position of the run: rows of a run have
// consecutive positions) are zeros, so no block table entry past the sequence is read.
void gather_latent(float* dst, const uint16_t* cache, int t0, int nt, int rank, int width, const KvPages& pages,
                   const int32_t* last, cudaStream_t s);
// dst[i, :] = the latent c_kv (first `rank` columns) of query row i's cache row at position pos[i] (pages.table(i)),
// in f32: what kv_b_proj is applied to for the step's tokens (the calibration observer's view of it).
void gather_step_latents(float* dst, const uint16_t* cache, int n, int rank, int width, const int32_t* pos,
                         const KvPages& pages, cudaStream_t s);

// MoE router (semantics of CpuBackend::moe_route). gate [E, hidden] F32/F16/BF16, bias [E] f32 or null.
void moe_route(const float* x, const void* gate, DType gate_dtype, const float* bias, int m, int hidden, int E,
               int top_k, int n_group, int topk_group, bool norm, float scale, float* weights, int32_t* ids,
               cudaStream_t s);

}  // namespace trellm::cuda

namespace trellm::cuda {

// MoE experts with dense weights (unquantized checkpoints). One job per (token, slot) and one per token for
// the shared expert: job j < m*top_k runs expert ids[j] on token j/top_k with weight weights[j]; job m*top_k + i
// runs the shared expert on token i with weight 1. gate_up_down: device array [n_experts + 1][3] of weight
// pointers (the last entry = shared expert, may be null when n_shared = 0). act: [jobs, max_inter] f32,
// part: [jobs, hidden] f32 scratch.
struct DenseMoeArgs {
  const void* const* weights;  // device: [(E + 1) * 3] gate, up, down
  DType dtype;
  int n_experts, inter, shared_inter, hidden, m, top_k;
  bool has_shared;
};
void moe_dense(const DenseMoeArgs& a, const float* x, const int32_t* ids, const float* wts, float* act, float* part,
               float* out, cudaStream_t s);
// One expert's results added into the MoE output: out[slots[r] / top_k, :] += wts[slots[r]] * y[r, :] for r < m
// (slots: the (token, slot) pairs routed to the expert, index token * top_k + k into the router's weights; each
// token at most once, so rows do not collide). y [m, hidden], out [tokens, hidden] f32.
void moe_scatter_add(float* out, const float* y, const int32_t* slots, const float* wts, int m, int top_k, int hidden,
                     cudaStream_t s);

}  // namespace trellm::cuda

namespace trellm::cuda {
// y[n, out] = x[n, in] · Wᵀ (+ bias) with f32 activations and W [out, in] in F32/F16/BF16: a warp per output
// row, rows of x in chunks of 8. For small n (decode); exact f32 accumulation like the CPU backend.
void gemv_dense(float* y, const float* x, const void* w, DType dt, int n, int in, int out, const float* bias, cudaStream_t s);
}  // namespace trellm::cuda

namespace trellm::cuda {
// Seeded counter-based random fill: floats uniform in [-scale, scale], integers random bits.
void fill_random(void* p, DType dt, int64_t n, uint64_t seed, float scale, cudaStream_t s);
}  // namespace trellm::cuda

namespace trellm::cuda {
// token[0] = the token sampled from logits[0..V) as cpu::sample_token does (greedy when temperature is 0), with
// history[0] as the noise step; pos[0] += 1; history[1 + history[0]++] = token.
// params: a device copy of trellm::SamplingParams (backend.h).
void sample_step(const float* logits, int64_t V, const void* params, int32_t* token, int32_t* pos, int32_t* history,
                 int64_t history_cap, cudaStream_t s);
// tokens[i] = the token sampled from logits[i, 0..V) with params[i] (n device SamplingParams) and noise step
// steps[i], the function of sample_step for every row; one block per row.
void sample_rows(const float* logits, int64_t V, int n, const void* params, const int32_t* steps, int32_t* tokens,
                 cudaStream_t s);
// Backend::spec_verify (backend.h, SpecVerify): block i verifies sequence i (m blocks of 1024 threads).
void spec_verify(const float* target, const float* draft, int draft_stride, const int32_t* src, const int32_t* tokens,
                 const void* params, const int32_t* steps, int32_t* out, int m, int K, int64_t V, cudaStream_t s);
// Backend::spec_prepare (SpecPrepare); pointers a step does not use may be null.
void spec_prepare(const int32_t* result, const int32_t* steps, int32_t* base, const int32_t* drafts, int32_t* tokens,
                  int32_t* pos, int32_t* seq, int32_t* logit_idx, int32_t* steps_out, int m, int K, int j, cudaStream_t s);
}  // namespace trellm::cuda
