// Token selection on the device, so a captured decode step needs no host round trip.
#include <cfloat>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"

namespace trellm::cuda {

namespace {

// One block of 1024 threads: 154880 logits = 152 per thread, then a block-wide (value, index) max.
__global__ void greedy_kernel(const float* logits, int64_t V, int32_t* token, int32_t* pos, int32_t* history,
                              int64_t cap) {
  float best = -FLT_MAX;
  int64_t bi = V;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = logits[i];
    if (v > best || (v == best && i < bi)) best = v, bi = i;  // NaN never wins
  }
  __shared__ float sv[32];
  __shared__ int64_t si[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > best || (ov == best && oi < bi)) best = ov, bi = oi;
  }
  if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = best, si[threadIdx.x >> 5] = bi;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < int(blockDim.x >> 5); w++)
    if (sv[w] > best || (sv[w] == best && si[w] < bi)) best = sv[w], bi = si[w];
  if (bi >= V) bi = 0;  // all NaN: emit token 0 rather than an out-of-range id
  token[0] = int32_t(bi);
  pos[0] += 1;
  const int32_t n = history[0];
  if (n + 1 < cap) {
    history[1 + n] = int32_t(bi);
    history[0] = n + 1;
  }
}

}  // namespace

void greedy_step(const float* logits, int64_t V, int32_t* token, int32_t* pos, int32_t* history, int64_t cap,
                 cudaStream_t s) {
  greedy_kernel<<<1, 1024, 0, s>>>(logits, V, token, pos, history, cap);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
