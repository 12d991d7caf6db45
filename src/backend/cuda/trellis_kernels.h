// CUDA kernels for EXL3 trellis-coded weights (issue 5): dequantize -> bf16, the fused product
// y = x·W + b (GEMV for m <= 8, tensor-core GEMM above), and the MoE router + fused expert FFNs.
//
// Framework-free: raw device pointers, sizes and a stream. Every entry point is CUDA-graph capturable:
// no allocation, no host synchronisation, no host reads of device data. The caller (CudaBackend) turns the
// checkpoint's TrellisWeight into a DeviceTrellis once, at load time.
//
// Numerics (= trellis::trellis_matmul_ref, TRELLIS.md §3):
//   x' = fp16(x ⊙ suh) -> x_h = fp16(FWHT128(x') / √128)  (bit-identical to the reference)
//   y_h = x_h · Q      fp16 × fp16 tensor-core MMA (mma.sync m16n8k16), fp32 accumulation
//   y   = FWHT128(y_h) / √128 ⊙ svh + bias                 (fp32)
// The decode of Q goes through the one shared definition, quant/trellis_decode.h (lane_states +
// decode_state): the trellis walk order is the mma B-fragment layout, so each lane decodes its 8 states
// straight into two B fragments.
//
// Supported: K = 2..8 (any other K fails loudly on the host, or __trap()s in the MoE kernels, whose K is
// read on the device), all three codebooks, in/out any size (padded to 128 in the descriptor).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace trellm::cuda {

// Rows up to which the dense product is one fused GEMV kernel (one mma N dimension); also the limit of the pair
// and norm-prologue variants.
constexpr int kTrellisGemvMaxRows = 8;

struct DeviceTrellis {            // POD; every pointer is device memory
  const uint16_t* trellis;        // (in_padded/16, out_padded/16, 16K) uint16
  const uint16_t* suh;            // (in_padded) fp16 bits
  const uint16_t* svh;            // (out_padded) fp16 bits
  const float* bias;              // (out) f32 or nullptr
  int K, codebook;                // 2..8; 0 = 3INST, 1 = MCG, 2 = MUL1 (trellis::Codebook)
  int in, out, in_padded, out_padded;
};

// ---- dense trellis linear -------------------------------------------------------------------------------

// Scratch the caller allocates once (never inside a step), sized for the largest call, and ZEROES ONCE
// after allocating (cudaMemset, or trellis_workspace_init): it holds the split-k arrival counters, which
// every kernel leaves at zero again when it finishes. One workspace per stream (calls on one stream are
// ordered; two streams must not share one).
size_t trellis_workspace_bytes(int max_m, int max_in_padded, int max_out_padded);
void trellis_workspace_init(void* workspace, size_t bytes, cudaStream_t s);

// y[m, out] = x[m, in] · W + bias. x and y f32 row-major with the real dims, any m >= 1.
//  m <= 8: one fused kernel (input transform in the prologue, split-k over blocks, the last block of each
//          128-column group applies the output Hadamard, svh and bias).
//  m > 8 : input-transform kernel (x_h fp16 into the workspace) + tensor-core GEMM (128 rows × 128 cols
//          per block, split-k when the grid would be small) with the same epilogue.
void trellis_matmul(const DeviceTrellis& w, const float* x, float* y, int m, void* workspace, cudaStream_t s);

// y1 = x · W1 + b1 and y2 = x · W2 + b2 in one GEMV launch (m <= 8, same K and in_padded: the blocks of both
// outputs share one grid and one k-split plan); anything else runs as two trellis_matmul calls. Workspace:
// trellis_workspace_bytes(m, in_padded, out_padded1 + out_padded2).
// y = rms_norm(x, norm_w, eps) · W + bias for m <= 8: the norm is computed in every block's prologue (each
// block reads its rows in full), so no separate norm kernel runs. x is not modified.
void trellis_matmul_normed(const DeviceTrellis& w, const float* x, const float* norm_w, float eps, float* y, int m,
                           void* workspace, cudaStream_t s);

void trellis_matmul_pair(const DeviceTrellis& w1, const DeviceTrellis& w2, const float* x, float* y1, float* y2, int m,
                         void* workspace, cudaStream_t s);

// w_hf_bf16[out, in] (HF orientation, real dims) = bf16(diag(suh)·H·Q·H·diag(svh))ᵀ. Same fp32 operation
// order as trellis::dequantize_hf_bf16 (column FWHT exact, ·1/√128, row FWHT in stage order, ·1/√128,
// ·suh, ·svh, round to nearest even): bit-identical in practice; see tests/backend/cuda for the bound.
void trellis_dequantize_bf16(const DeviceTrellis& w, uint16_t* w_hf_bf16, cudaStream_t s);

// ---- MoE ------------------------------------------------------------------------------------------------

// Router, same semantics as CpuBackend::moe_route: s = sigmoid(x·gateᵀ) in fp32, choice = s + bias
// (selection only), group-limited top-k (n_group groups scored by their two best choices; topk_group
// kept), top_k by choice with ties to the lower expert index, w = s / (Σ s + 1e-20) (if norm) · scale.
// One cluster of 8 CTAs per token (distributed shared memory, no workspace). E <= 1024, top_k <= 32,
// n_group <= 32.
void moe_route(const float* x /*[m,hidden]*/, const uint16_t* gate_bf16 /*[E,hidden]*/, const float* bias /*[E] or null*/,
               int m, int hidden, int E, int top_k, int n_group, int topk_group, bool norm, float scale,
               float* weights /*[m,top_k]*/, int* ids /*[m,top_k]*/, cudaStream_t s);

// The router from precomputed scores (prefill: logits [m, E] = x · gateᵀ in f32 by a GEMM): sigmoid, bias,
// selection and weights exactly as moe_route; one warp per token.
void moe_route_logits(const float* logits, const float* bias, int m, int E, int top_k, int n_group, int topk_group,
                      bool norm, float scale, float* weights, int* ids, cudaStream_t s);

// h += y; x = rms_norm(h, norm_w, eps) (as add_rms_norm), then moe_route on x, in one launch: every CTA of a
// token's cluster forms the normalised row in shared memory (no separate norm kernel). hidden <= 4096.
void add_rms_norm_route(float* h, const float* y, const float* norm_w, float eps, float* x, const uint16_t* gate_bf16,
                        const float* bias, int m, int hidden, int E, int top_k, int n_group, int topk_group, bool norm,
                        float scale, float* weights, int* ids, cudaStream_t s);

// out[m,hidden] = Σ_k weights[i,k]·expert_{ids[i,k]}(x_i) + shared(x_i), expert(x) = down(silu(gate x) ⊙ up x).
// experts: device array of 3·n_experts descriptors (gate, up, down per expert); shared: device array of 3
// (or null). ids/weights live on the device. Each descriptor's K and codebook are read on the device (they
// may differ between experts and between gate/up/down); ids outside [0, n_experts) __trap().
//  m <= 8 (decode): 2 kernels — gate+up per (token, slot) job with SwiGLU and the down projection's input
//          transform fused into the last split's epilogue; down per job with the weighted sum over the
//          token's jobs fused into the last block of each 128-column group.
//  m > 8 (prefill): tokens grouped by expert on the device (one 1-block kernel), then grouped tensor-core
//          GEMMs (128-row tiles of one expert) for gate+up and down, and a deterministic combine.
// workspace: moe_workspace_bytes(...) bytes, zeroed once after allocation (see trellis_workspace_bytes).
// max_k: the largest K among the descriptors (sizes the decode kernels' shared-memory ring: a smaller ring
// fits more blocks per SM); a descriptor with a larger K __trap()s. uniform_k / uniform_cb: the K and codebook
// every descriptor shares, if they do (prefill then runs a grouped GEMM specialised for them); 0 / -1 if not.
// Token rows below which uniform codes get the specialised grouped GEMM (H200: faster at 32-512 tokens, 3 %
// slower at 2,048; trellis_moe_grouped.cu).
constexpr int kMoeSpecialMaxRows = 1024;
// Tokens up to which moe_experts runs the decode kernels.
constexpr int kMoeDecodeMaxTokens = 8;
// The residual step after the experts, fused into the down kernel (decode only): h += out, then
// x_out = norm_w ⊙ h · rsqrt(mean h² + eps), per token; the arithmetic of cuda::add_rms_norm (kernels.h), bit for
// bit. x_out may be x: the gate/up kernel is done with it by then.
struct MoeResidual {
  float* h;              // [m, hidden]
  const float* norm_w;   // [hidden]
  float eps;
  float* x_out;          // [m, hidden]
};
void moe_experts(const DeviceTrellis* experts, const DeviceTrellis* shared, int n_experts, const float* x,
                 const int* ids, const float* weights, float* out, int m, int top_k, int hidden, int inter,
                 void* workspace, cudaStream_t s, int max_k = 8, int uniform_k = 0, int uniform_cb = -1,
                 const MoeResidual* res = nullptr);
size_t moe_workspace_bytes(int max_m, int top_k, int hidden, int inter, int n_experts);

}  // namespace trellm::cuda
