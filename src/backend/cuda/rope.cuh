// RoPE and the MLA latent-cache row on the GPU, with the CPU backend's arithmetic: cpu::rope_rotate (f32 angle =
// f32(pos) * f32(inv_freq), inv_freq from a double pow, cos/sin in double, the rotation in f32) and
// CpuBackend::mla_cache_append (RMS norm of c_kv, rope of k_rope, one rounding to bf16). Shared by the rope and
// cache-append kernels (kernels_elementwise.cu) and the MLA decode kernel that folds them in (mla_decode.cu).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/kv_pages.h"

namespace trellm::cuda {

// cos and sin of pair i of a `dim`-wide rope vector at position pos.
__device__ __forceinline__ void rope_cos_sin(int i, int dim, int pos, float theta, float& c, float& s) {
  const float inv_freq = float(1.0 / pow(double(theta), double(2 * i) / double(dim)));
  const float ang = float(pos) * inv_freq;
  double sn, cs;
  sincos(double(ang), &sn, &cs);
  c = float(cs), s = float(sn);
}
__device__ __forceinline__ void rope_apply(float& a, float& b, float c, float s) {
  const float x = a, y = b;
  a = x * c - y * s;
  b = y * c + x * s;
}
// (a, b) = pair i of a `dim`-wide rope vector at position pos, rotated in place.
__device__ __forceinline__ void rope_rotate(float& a, float& b, int i, int dim, int pos, float theta) {
  float c, s;
  rope_cos_sin(i, dim, pos, theta, c, s);
  rope_apply(a, b, c, s);
}

// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ inline float block_sum(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = lane < nw ? part[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The residual step for one row, by the whole block: h[0..d) += y, out = w ⊙ h · rsqrt(mean h² + eps). The one
// definition of add_rms_norm_kernel and of the MoE down kernel's fused tail (the same block size: bit for bit the
// same result). y is read through L2 (ld.cg): in the fused tail other SMs wrote it during this kernel.
// Up to kRowHeld values a thread (GLM: 2048 over 256 threads) are loaded together and kept in registers: as a
// loop of load, add, store (h and y may alias as far as the compiler knows) every element waited for its own L2
// round trip, 6.6 µs in the MoE down tail (kernel clocks, H100, 2026-12-07). Each thread's sum of squares runs
// over its elements in ascending order either way.
constexpr int kRowHeld = 8;  // out of line (static: one copy a translation unit): inlined, the fused down kernel spilled
static __device__ __noinline__ void add_rms_norm_row(float* h, const float* y, const float* w, float* out, int d, float eps) {
  const int nt = int(blockDim.x);
  float ss = 0;
  if (d <= kRowHeld * nt) {
    float hv[kRowHeld], yv[kRowHeld], wv[kRowHeld];
#pragma unroll
    for (int i = 0; i < kRowHeld; i++) {
      const int j = min(int(threadIdx.x) + i * nt, d - 1);  // unpredicated (past d: d - 1 again, not used)
      hv[i] = h[j], yv[i] = __ldcg(y + j), wv[i] = w[j];
    }
#pragma unroll
    for (int i = 0; i < kRowHeld; i++) {
      hv[i] += yv[i];
      if (int(threadIdx.x) + i * nt < d) ss += hv[i] * hv[i];
    }
    ss = block_sum(ss);
    const float r = rsqrtf(ss / float(d) + eps);
#pragma unroll
    for (int i = 0; i < kRowHeld; i++) {
      const int j = int(threadIdx.x) + i * nt;
      if (j < d) h[j] = hv[i], out[j] = wv[i] * (hv[i] * r);
    }
    return;
  }
  for (int j = threadIdx.x; j < d; j += nt) {
    const float v = h[j] + __ldcg(y + j);
    h[j] = v;
    ss += v * v;
  }
  ss = block_sum(ss);
  const float r = rsqrtf(ss / float(d) + eps);
  for (int j = threadIdx.x; j < d; j += nt) out[j] = w[j] * (h[j] * r);  // each thread rereads its own writes
}

// The cache row of query row `row` (pool row kv_pool_row(table of seq[row], pos[row])) =
// bf16([rms_norm(kv[row, :rank], w) | rope(kv[row, rank:])]), cache width rank + rope_dim (rope_dim <= 256). The
// rotation happens in f32 (as on the CPU); only the stored row is rounded to bf16. Needs the whole block.
__device__ inline void append_cache_row(__nv_bfloat16* cache, const float* kv, const float* w, int row, int rank,
                                        int rope_dim, float eps, const int32_t* pos, const KvPages& pages, float theta) {
  __shared__ float kr[256];
  const int width = rank + rope_dim, p = pos[row];
  const float* src = kv + int64_t(row) * width;
  __nv_bfloat16* dst = cache + kv_pool_row(pages.table(row), p) * width;
  float ss = 0;
  for (int j = threadIdx.x; j < rank; j += blockDim.x) ss += src[j] * src[j];
  ss = block_sum(ss);
  const float r = rsqrtf(ss / float(rank) + eps);
  for (int j = threadIdx.x; j < rank; j += blockDim.x) dst[j] = __float2bfloat16_rn(w[j] * (src[j] * r));
  for (int j = threadIdx.x; j < rope_dim; j += blockDim.x) kr[j] = src[rank + j];
  __syncthreads();
  for (int i = threadIdx.x; i < rope_dim / 2; i += blockDim.x) rope_rotate(kr[2 * i], kr[2 * i + 1], i, rope_dim, p, theta);
  __syncthreads();
  for (int j = threadIdx.x; j < rope_dim; j += blockDim.x) dst[rank + j] = __float2bfloat16_rn(kr[j]);
}

}  // namespace trellm::cuda
