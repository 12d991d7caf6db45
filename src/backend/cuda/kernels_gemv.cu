// Dense small-batch products with f32 activations (the unquantized path's decode GEMV).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/pdl.cuh"

namespace trellm::cuda {

namespace {

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename W>
__global__ void gemv_kernel(float* y, const float* x, const W* w, int n, int in, int out, const float* bias) {
  grid_wait();  // a PDL dependent (pdl.cuh): x comes from the kernel before
  grid_launch_dependents();
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (o >= out) return;
  const W* row = w + int64_t(o) * in;
  for (int r0 = 0; r0 < n; r0 += 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int rn = min(8, n - r0);
    for (int k = lane; k < in; k += 32) {
      const float wk = ld(row, k);
#pragma unroll
      for (int r = 0; r < 8; r++)
        if (r < rn) acc[r] += wk * x[int64_t(r0 + r) * in + k];
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
      float v = acc[r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && r < rn) y[int64_t(r0 + r) * out + o] = v + (bias ? bias[o] : 0.0f);
    }
  }
}

}  // namespace

void gemv_dense(float* y, const float* x, const void* w, DType dt, int n, int in, int out, const float* bias, cudaStream_t s) {
  const dim3 grid((out + 7) / 8);
  switch (dt) {
    case DType::BF16: launch(gemv_kernel<__nv_bfloat16>, grid, dim3(256), 0, s, true, y, x, static_cast<const __nv_bfloat16*>(w), n, in, out, bias); break;
    case DType::F16: launch(gemv_kernel<__half>, grid, dim3(256), 0, s, true, y, x, static_cast<const __half*>(w), n, in, out, bias); break;
    case DType::F32: launch(gemv_kernel<float>, grid, dim3(256), 0, s, true, y, x, static_cast<const float*>(w), n, in, out, bias); break;
    default: TRELLM_ASSERT(false, "gemv_dense: dtype ", dtype_name(dt));
  }
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
