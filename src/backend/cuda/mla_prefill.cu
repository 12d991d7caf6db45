// MLA prefill (n >= 17 query rows), absorbed on tensor cores, causal, any bound:
//   prefill_prepare  q16 = bf16(q) (cuBLAS input), Qb[:, 512:] = bf16(q_rope)
//   cuBLAS           Qb[:, :512] = W_UK[h]ᵀ q_nope   (strided-batched over heads; issued by the backend op)
//   attend           the tensor-core attention of mla_attend.cu with 32 (query, head) rows per CTA, row groups
//                    launched latest-first so the long causal rows start early; one split per group once
//                    there are >= #SM groups (n >= 212 at 20 heads), so no combine pass
//   cuBLAS           out = W_UV[h] · o_lat                                                 (backend op)
// Why absorbed and not expanded: per (query, key, head) it costs 576 + 512 MACs against 256 + 256 expanded,
// but needs no per-tile kv_b expansion (20*448*512 MACs per key) and no expanded K/V buffer, shares every
// K/V byte across the 20 heads (MQA-like), and is the same kernel as decode. docs/kernels.md has the numbers.
#include <cuda_bf16.h>

#include "backend/cuda/mla.h"
#include "backend/cuda/mla_common.cuh"

namespace trellm::cuda::mla {

namespace {

using bf16 = __nv_bfloat16;

__global__ void prefill_prepare_kernel(bf16* q16, bf16* qb, const float* q, int64_t total, int qd, int nope) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const bf16 x = __float2bfloat16_rn(q[idx]);
    q16[idx] = x;
    const int d = int(idx % qd);
    if (d >= nope) qb[(idx / qd) * kWidth + kRank + (d - nope)] = x;
  }
}

}  // namespace

void prefill_prepare(const Args& a, const Plan& p, cudaStream_t s) {
  TRELLM_ASSERT(p.prefill && a.n == p.n, "mla prefill_prepare: plan is not a prefill plan");
  char* w = static_cast<char*>(a.work);
  const int qd = a.nope + kRope;
  const int64_t total = int64_t(p.rows) * qd;
  const int blocks = int(std::min<int64_t>((total + 255) / 256, 4096));
  prefill_prepare_kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<bf16*>(w + p.q16), reinterpret_cast<bf16*>(w + p.qb), a.q,
                                                total, qd, a.nope);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda::mla
