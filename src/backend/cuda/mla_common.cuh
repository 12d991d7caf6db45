// Device helpers shared by the MLA kernels (mla_attend.cu, mla_decode.cu, mla_prefill.cu): async copies,
// ldmatrix, bf16 mma.sync (PDL: pdl.cuh). Inline PTX only; nothing framework-specific.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"

namespace trellm::cuda::mla {

constexpr float kLog2e = 1.4426950408889634f;  // softmax scores live in the log2 domain (exp2f)

// Raises `kernel`'s dynamic shared-memory limit to `bytes` (the > 48 KB opt-in) once per device; `done` is the
// kernel's own set of devices already raised (bit d for device d < 32).
template <typename Kernel>
inline void opt_in_smem(Kernel kernel, size_t bytes, std::atomic<uint32_t>& done) {
  int dev = 0;
  TRELLM_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 32 && !(done.load() & (1u << dev))) {
    TRELLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    done.fetch_or(1u << dev);
  }
}

}  // namespace trellm::cuda::mla

namespace trellm::cuda::mla::dev {

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16-byte async global->shared copy; valid == false writes 16 zero bytes and reads nothing (rows past the
// context may hold anything, NaN bit patterns included, and a zero row times p = 0 stays 0).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr) : "memory");
}

// mbarrier + bulk copy (sm_90): one thread announces the bytes a stage will receive, the copies complete them, and
// every consumer waits for the barrier's phase to flip. A stage's k-th fill completes phase k, parity k & 1.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the bulk copies) before their first use.
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// bytes (a multiple of 16, both addresses 16-byte aligned) from global to this CTA's shared memory, completing
// on `bar`'s transaction count.
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// d += a · b, m16n8k16, bf16 inputs, f32 accumulators (PTX ISA fragment layouts).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float bf_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// One online-softmax step of the attention kernels, 8 threads per row (lanes 8k .. 8k + 7 of a warp), each owning
// 8 consecutive keys [kb, kb + 8) of the tile: sums the 4 partial scores at part + q * q_stride (q < 4), masks keys
// past `prow` (-1: padding row), updates the running max and sum (log2 domain) and returns the 8 probabilities as
// bf16 and the factor that rescales the row's output.
__device__ __forceinline__ uint4 softmax_step(const float* part, int q_stride, int kb, int prow, float scale_log2,
                                              float& m_run, float& l_run, float& alpha) {
  float s[8];
#pragma unroll
  for (int e = 0; e < 8; e++) s[e] = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const float4 a = *reinterpret_cast<const float4*>(part + q * q_stride);
    const float4 b = *reinterpret_cast<const float4*>(part + q * q_stride + 4);
    s[0] += a.x, s[1] += a.y, s[2] += a.z, s[3] += a.w, s[4] += b.x, s[5] += b.y, s[6] += b.z, s[7] += b.w;
  }
  float mx = -INFINITY;
#pragma unroll
  for (int e = 0; e < 8; e++) {
    s[e] = kb + e <= prow ? s[e] * scale_log2 : -INFINITY;
    mx = fmaxf(mx, s[e]);
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
  const float mnew = fmaxf(m_run, mx);
  alpha = exp2f(m_run - mnew);
  float sum = 0.0f;
  uint32_t pk[4];
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const float p0 = exp2f(s[2 * e] - mnew), p1 = exp2f(s[2 * e + 1] - mnew);
    sum += p0 + p1;
    pk[e] = pack_bf16(p0, p1);
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  l_run = l_run * alpha + sum;
  m_run = mnew;
  return make_uint4(pk[0], pk[1], pk[2], pk[3]);
}

}  // namespace trellm::cuda::mla::dev


