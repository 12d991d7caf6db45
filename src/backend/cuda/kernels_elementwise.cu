// Elementwise and row-wise kernels: embedding, RMSNorm, add, SwiGLU, bias, conversions, RoPE, cache append.
// All are memory-bound and tiny next to the weight reads; they are written for clarity first. Each starts with
// grid_wait() (pdl.cuh): they are launched as programmatic dependents of the kernel before them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope.cuh"

namespace trellm::cuda {

namespace {

__device__ __forceinline__ float load_as_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__global__ void embed_kernel(float* out, const int32_t* tokens, const void* table, DType dt, int d) {
  grid_wait();
  grid_launch_dependents();
  const int64_t row = tokens[blockIdx.x];
  for (int j = threadIdx.x; j < d; j += blockDim.x) out[int64_t(blockIdx.x) * d + j] = load_as_f32(table, dt, row * d + j);
}

__global__ void rms_norm_kernel(float* out, const float* x, const float* w, int d, float eps) {
  grid_wait();
  grid_launch_dependents();
  const float* xr = x + int64_t(blockIdx.x) * d;
  float* orow = out + int64_t(blockIdx.x) * d;
  float ss = 0;
  for (int j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
  ss = block_sum(ss);
  const float r = rsqrtf(ss / float(d) + eps);
  for (int j = threadIdx.x; j < d; j += blockDim.x) orow[j] = w[j] * (xr[j] * r);
}

__global__ void add_rms_norm_kernel(float* h, const float* y, const float* w, float* out, int d, float eps) {
  grid_wait();
  grid_launch_dependents();
  const int64_t row = int64_t(blockIdx.x) * d;
  add_rms_norm_row(h + row, y + row, w, out + row, d, eps);
}

__global__ void add_kernel(float* out, const float* a, const float* b, int64_t n) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) out[i] = a[i] + b[i];
}

__global__ void silu_mul_kernel(float* out, const float* g, const float* u, int64_t n) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

__global__ void silu_mul_bf16_kernel(__nv_bfloat16* out, const float* g, const float* u, int64_t n) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(g[i] / (1.0f + expf(-g[i])) * u[i]);
}

__global__ void add_bias_kernel(float* out, const float* bias, int d) {
  grid_wait();
  grid_launch_dependents();
  for (int j = threadIdx.x; j < d; j += blockDim.x) out[int64_t(blockIdx.x) * d + j] += bias[j];
}

__global__ void to_bf16_kernel(__nv_bfloat16* out, const float* x, int64_t n) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(x[i]);
}

// x = hi + lo in the 16-bit type, hi at [0, n) and lo at [n, 2n): a product over both halves carries ~16
// significand bits of x instead of 8 (bf16) or 11 (fp16).
template <typename T>
__device__ __forceinline__ T to_half_t(float v);
template <> __device__ __forceinline__ __nv_bfloat16 to_half_t<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half to_half_t<__half>(float v) { return __float2half_rn(v); }
template <typename T>
__device__ __forceinline__ float from_half_t(T v) { return float(v); }

template <typename T>
__global__ void split_half_kernel(T* out, const float* x, int64_t n) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const T hi = to_half_t<T>(x[i]);
    out[i] = hi;
    out[n + i] = to_half_t<T>(x[i] - from_half_t(hi));
  }
}

__global__ void add_halves_kernel(float* out, const float* y, int64_t n, const float* bias, int d) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = y[i] + y[n + i] + (bias ? bias[i % d] : 0.0f);
}

__global__ void to_f16_kernel(__half* out, const float* x, int64_t n) {
  grid_wait();
  grid_launch_dependents();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2half_rn(x[i]);
}

__global__ void bf16_to_f32_kernel(float* out, const __nv_bfloat16* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(x[i]);
}

// Row `row` of the interleaved RoPE (block-strided over (head, pair)).
// The heads of a row share their angles: cos/sin once per pair (the double-precision pow and sincos dominated
// the prefill rope: 42 us per layer at 2,048 rows, 20 heads, ncu on the H200), then every head's rotation; pairs
// in slices of kMaxPairs (GLM's 32 pairs take one).
__device__ void rope_row(float* x, int row, int heads, int head_dim, int offset, int dim, const int32_t* pos, float theta) {
  constexpr int kMaxPairs = 128;
  __shared__ float cs[2][kMaxPairs];
  const int pairs = dim / 2, p = pos[row];
  for (int base = 0; base < pairs; base += kMaxPairs) {
    const int np = min(kMaxPairs, pairs - base);
    for (int i = threadIdx.x; i < np; i += blockDim.x) rope_cos_sin(base + i, dim, p, theta, cs[0][i], cs[1][i]);
    __syncthreads();
    for (int idx = threadIdx.x; idx < heads * np; idx += blockDim.x) {
      const int h = idx / np, i = idx % np;
      float* q = x + (int64_t(row) * heads + h) * head_dim + offset + 2 * (base + i);
      rope_apply(q[0], q[1], cs[0][i], cs[1][i]);
    }
    __syncthreads();  // cs is rewritten by the next slice
  }
}

__global__ void rope_kernel(float* x, int heads, int head_dim, int offset, int dim, const int32_t* pos, float theta) {
  grid_wait();
  grid_launch_dependents();
  rope_row(x, blockIdx.x, heads, head_dim, offset, dim, pos, theta);  // block = one row (token)
}

__global__ void cache_append_kernel(__nv_bfloat16* cache, const float* kv, const float* w, int rank, int rope_dim,
                                    float eps, const int32_t* pos, const KvPages pages, float theta) {
  grid_wait();
  grid_launch_dependents();
  append_cache_row(cache, kv, w, blockIdx.x, rank, rope_dim, eps, pos, pages, theta);
}

// Both at once (MLA decode: one launch fewer per layer): grid (n, 2), y = 0 rotates q's row, y = 1 appends kv's.
struct RopeAppendArgs {
  float* q;
  int heads, head_dim, offset, dim;
  __nv_bfloat16* cache;
  const float* kv;
  const float* w;
  int rank, rope_dim;
  float eps;
  const int32_t* pos;
  KvPages pages;
  float theta;
};
__global__ void rope_append_kernel(const RopeAppendArgs a) {
  grid_wait();
  grid_launch_dependents();
  if (blockIdx.y == 0) rope_row(a.q, blockIdx.x, a.heads, a.head_dim, a.offset, a.dim, a.pos, a.theta);
  else append_cache_row(a.cache, a.kv, a.w, blockIdx.x, a.rank, a.rope_dim, a.eps, a.pos, a.pages, a.theta);
}

// Row copy, a block per output row: 16-byte words when the rows allow it (f32 logits rows: 154,880 x 4 B), else
// bytes.
template <typename Word>
__global__ void gather_rows_kernel(Word* out, const Word* x, const int32_t* idx, int64_t words) {
  grid_wait();
  grid_launch_dependents();
  const Word* src = x + int64_t(idx[blockIdx.x]) * words;
  Word* dst = out + int64_t(blockIdx.x) * words;
  for (int64_t j = threadIdx.x; j < words; j += blockDim.x) dst[j] = src[j];
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64 finaliser: a counter-based generator
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__global__ void fill_random_kernel(void* p, DType dt, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed + 0x9E3779B97F4A7C15ull * uint64_t(i + 1));
    const float u = float(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
    switch (dt) {
      case DType::F32: static_cast<float*>(p)[i] = u * scale; break;
      case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(u * scale); break;
      case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(u * scale); break;
      case DType::I64: static_cast<uint64_t*>(p)[i] = r; break;
      case DType::I32: static_cast<uint32_t*>(p)[i] = uint32_t(r); break;
      case DType::I16: static_cast<uint16_t*>(p)[i] = uint16_t(r); break;
      default: static_cast<uint8_t*>(p)[i] = uint8_t(r); break;
    }
  }
}

int grid_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 132 * 16)); }

}  // namespace

void embed(float* out, const int32_t* tokens, const void* table, DType dt, int n, int d, cudaStream_t s) {
  launch(embed_kernel, dim3(n), dim3(256), 0, s, true, out, tokens, table, dt, d);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void rms_norm(float* out, const float* x, const float* w, int n, int d, float eps, cudaStream_t s) {
  launch(rms_norm_kernel, dim3(n), dim3(d >= 1024 ? 512 : 256), 0, s, true, out, x, w, d, eps);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void add_rms_norm(float* h, const float* y, const float* w, float* out, int n, int d, float eps, cudaStream_t s) {
  // 256 threads, as the MoE down kernel that fuses this step (trellis_moe_decode.cu): the same sums.
  launch(add_rms_norm_kernel, dim3(n), dim3(kAddRmsNormThreads), 0, s, true, h, y, w, out, d, eps);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void add(float* out, const float* a, const float* b, int64_t n, cudaStream_t s) {
  launch(add_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, true, out, a, b, n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void silu_mul(float* out, const float* g, const float* u, int64_t n, cudaStream_t s) {
  launch(silu_mul_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, true, out, g, u, n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void silu_mul_bf16(uint16_t* out, const float* g, const float* u, int64_t n, cudaStream_t s) {
  launch(silu_mul_bf16_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, true, reinterpret_cast<__nv_bfloat16*>(out), g, u, n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void add_bias(float* out, const float* bias, int n, int d, cudaStream_t s) {
  launch(add_bias_kernel, dim3(n), dim3(256), 0, s, true, out, bias, d);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void to_bf16(uint16_t* out, const float* x, int64_t n, cudaStream_t s) {
  launch(to_bf16_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, true, reinterpret_cast<__nv_bfloat16*>(out), x, n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void to_f16(uint16_t* out, const float* x, int64_t n, cudaStream_t s) {
  launch(to_f16_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, true, reinterpret_cast<__half*>(out), x, n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void split_half(uint16_t* out, const float* x, int64_t n, bool bf16, cudaStream_t s) {
  if (bf16) launch(split_half_kernel<__nv_bfloat16>, dim3(grid_for(n, 256)), dim3(256), 0, s, true, reinterpret_cast<__nv_bfloat16*>(out), x, n);
  else launch(split_half_kernel<__half>, dim3(grid_for(n, 256)), dim3(256), 0, s, true, reinterpret_cast<__half*>(out), x, n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void add_halves(float* out, const float* y, int64_t n, const float* bias, int d, cudaStream_t s) {
  launch(add_halves_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, true, out, y, n, bias, d);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void bf16_to_f32(float* out, const uint16_t* x, int64_t n, cudaStream_t s) {
  bf16_to_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(out, reinterpret_cast<const __nv_bfloat16*>(x), n);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void gather_rows(void* out, const void* x, const int32_t* idx, int m, int64_t row_bytes, cudaStream_t s) {
  if (m == 0) return;
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (wide)
    launch(gather_rows_kernel<uint4>, dim3(m), dim3(256), 0, s, true, static_cast<uint4*>(out), static_cast<const uint4*>(x),
           idx, row_bytes / 16);
  else
    launch(gather_rows_kernel<uint8_t>, dim3(m), dim3(256), 0, s, true, static_cast<uint8_t*>(out),
           static_cast<const uint8_t*>(x), idx, row_bytes);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void fill_random(void* p, DType dt, int64_t n, uint64_t seed, float scale, cudaStream_t s) {
  fill_random_kernel<<<grid_for(n, 256), 256, 0, s>>>(p, dt, n, seed, scale);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void rope(float* x, int n, int heads, int head_dim, int offset, int dim, const int32_t* pos, float theta, cudaStream_t s) {
  launch(rope_kernel, dim3(n), dim3(128), 0, s, true, x, heads, head_dim, offset, dim, pos, theta);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void mla_rope_append(float* q, int heads, int head_dim, int offset, int dim, uint16_t* cache, const float* kv,
                     const float* norm_w, int n, int rank, float eps, const int32_t* pos, const KvPages& pages, float theta,
                     cudaStream_t s) {
  TRELLM_ASSERT(dim <= 256);
  const RopeAppendArgs a{q, heads, head_dim, offset, dim, reinterpret_cast<__nv_bfloat16*>(cache), kv, norm_w, rank, dim,
                         eps, pos, pages, theta};
  launch(rope_append_kernel, dim3(n, 2), dim3(256), 0, s, true, a);
  TRELLM_CUDA_LAUNCH_CHECK();
}
void mla_cache_append(uint16_t* cache, const float* kv, const float* norm_w, int n, int rank, int rope_dim, float eps,
                      const int32_t* pos, const KvPages& pages, float theta, cudaStream_t s) {
  TRELLM_ASSERT(rope_dim <= 256);
  launch(cache_append_kernel, dim3(n), dim3(256), 0, s, true, reinterpret_cast<__nv_bfloat16*>(cache), kv, norm_w, rank,
         rope_dim, eps, pos, pages, theta);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
