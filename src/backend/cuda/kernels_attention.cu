// MLA attention kernels, version 1: straightforward f32 CUDA-core kernels that mirror the CPU reference
// (absorbed for decode, expanded per key tile for prefill). They are the correctness baseline that the
// tensor-core versions (heads on the MMA M dimension, split-K over the context) are measured against.
// The cache is paged (kv_pages.h): every key's pool row is looked up in its query row's block table.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"

namespace trellm::cuda {

namespace {

constexpr int kMaxTile = 256;  // keys per expanded tile (scores live in shared memory)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ float block_reduce(float v, bool is_max) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = is_max ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < nw ? part[lane] : (is_max ? -FLT_MAX : 0.0f);
  return is_max ? warp_max(v) : warp_sum(v);
}

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// q_lat[i,h,k] = Σ_d W_UK[h][d][k] · q_nope[i,h,d]      grid (n*H, rank/128), block 128
template <typename W>
__global__ void q_lat_kernel(float* q_lat, const float* q, const W* kvb, MlaShape m) {
  __shared__ float qn[512];
  const int ih = blockIdx.x, h = ih % m.heads, qd = m.nope + m.rope, per = m.nope + m.v;
  for (int d = threadIdx.x; d < m.nope; d += blockDim.x) qn[d] = q[int64_t(ih) * qd + d];
  __syncthreads();
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= m.rank) return;
  float s = 0;
  for (int d = 0; d < m.nope; d++) s += ld(kvb, int64_t(h * per + d) * m.rank + k) * qn[d];
  q_lat[int64_t(ih) * m.rank + k] = s;
}

// scores[i,h,t] = (q_lat·c_kv[t] + q_rope·k_rope[t]) · scale for t <= pos[i]   grid (n*H, T/8), block 256
__global__ void scores_kernel(float* scores, const float* q_lat, const float* q, const __nv_bfloat16* cache, MlaShape m, int T) {
  __shared__ float ql[1024];
  const int ih = blockIdx.x, i = ih / m.heads, qd = m.nope + m.rope, width = m.rank + m.rope;
  for (int k = threadIdx.x; k < m.rank; k += blockDim.x) ql[k] = q_lat[int64_t(ih) * m.rank + k];
  for (int k = threadIdx.x; k < m.rope; k += blockDim.x) ql[m.rank + k] = q[int64_t(ih) * qd + m.nope + k];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.y * (blockDim.x >> 5) + warp;
  if (t >= T || t > m.pos[i]) return;
  const __nv_bfloat16* c = cache + kv_pool_row(m.pages.table(i), t) * width;
  float s = 0;
  for (int k = lane; k < width; k += 32) s += ql[k] * __bfloat162float(c[k]);
  s = warp_sum(s);
  if (lane == 0) scores[int64_t(ih) * T + t] = s * m.scale;
}

// softmax over t <= pos[i], then o_lat[k] = Σ_t p_t c_kv[t][k]        grid n*H, block 256
__global__ void softmax_olat_kernel(float* o_lat, float* scores, const __nv_bfloat16* cache, MlaShape m, int T) {
  const int ih = blockIdx.x, i = ih / m.heads, last = m.pos[i], width = m.rank + m.rope;
  const int32_t* table = m.pages.table(i);
  float* sc = scores + int64_t(ih) * T;
  float mx = -FLT_MAX;
  for (int t = threadIdx.x; t <= last; t += blockDim.x) mx = fmaxf(mx, sc[t]);
  mx = block_reduce(mx, true);
  float sum = 0;
  for (int t = threadIdx.x; t <= last; t += blockDim.x) sum += (sc[t] = expf(sc[t] - mx));
  sum = block_reduce(sum, false);
  __syncthreads();  // every p_t written before the weighted sum reads them
  const float inv = 1.0f / sum;
  for (int k = threadIdx.x; k < m.rank; k += blockDim.x) {
    float a = 0;
    for (int t = 0; t <= last; t++) a += sc[t] * __bfloat162float(cache[kv_pool_row(table, t) * width + k]);
    o_lat[int64_t(ih) * m.rank + k] = a * inv;
  }
}

// out[i, h*v + j] = Σ_k W_UV[h][j][k] · o_lat[i,h,k]     grid (n*H, v/8), block 256 (a warp per j)
template <typename W>
__global__ void out_kernel(float* out, const float* o_lat, const W* kvb, MlaShape m) {
  const int ih = blockIdx.x, h = ih % m.heads, per = m.nope + m.v;
  const int j = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (j >= m.v) return;
  const int64_t row = int64_t(h * per + m.nope + j) * m.rank;
  float s = 0;
  for (int k = lane; k < m.rank; k += 32) s += ld(kvb, row + k) * o_lat[int64_t(ih) * m.rank + k];
  s = warp_sum(s);
  if (lane == 0) out[int64_t(ih) * m.v + j] = s;
}

template <typename W>
void absorbed(float* out, const float* q, const __nv_bfloat16* cache, const W* kvb, const MlaShape& m, float* work, cudaStream_t s) {
  const int rows = m.n * m.heads, T = m.bound;
  float* q_lat = work;
  float* o_lat = q_lat + int64_t(rows) * m.rank;
  float* scores = o_lat + int64_t(rows) * m.rank;
  q_lat_kernel<W><<<dim3(rows, (m.rank + 127) / 128), 128, 0, s>>>(q_lat, q, kvb, m);
  TRELLM_CUDA_LAUNCH_CHECK();
  scores_kernel<<<dim3(rows, (T + 7) / 8), 256, 0, s>>>(scores, q_lat, q, cache, m, T);
  TRELLM_CUDA_LAUNCH_CHECK();
  softmax_olat_kernel<<<rows, 256, 0, s>>>(o_lat, scores, cache, m, T);
  TRELLM_CUDA_LAUNCH_CHECK();
  out_kernel<W><<<dim3(rows, (m.v + 7) / 8), 256, 0, s>>>(out, o_lat, kvb, m);
  TRELLM_CUDA_LAUNCH_CHECK();
}

// One key tile of the expanded form with an online softmax.        grid n*H, block 256
__global__ void expanded_tile_kernel(const float* q, const __nv_bfloat16* cache, const float* kvx, int t0, int nt, MlaShape m,
                                     float* acc, float* mx, float* den) {
  __shared__ float sc[kMaxTile];
  __shared__ float qs[1024];
  const int ih = blockIdx.x, i = ih / m.heads, h = ih % m.heads, qd = m.nope + m.rope, per = m.nope + m.v;
  const int width = m.rank + m.rope;
  const int last = min(nt, m.pos[i] + 1 - t0);  // keys t0 .. t0+last-1 are visible (causal)
  if (last <= 0) return;
  for (int d = threadIdx.x; d < qd; d += blockDim.x) qs[d] = q[int64_t(ih) * qd + d];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int t = warp; t < last; t += nw) {
    const float* kh = kvx + (int64_t(t) * m.heads + h) * per;
    const __nv_bfloat16* kr = cache + kv_pool_row(m.pages.table(i), t0 + t) * width + m.rank;
    float s = 0;
    for (int d = lane; d < m.nope; d += 32) s += qs[d] * kh[d];
    for (int d = lane; d < m.rope; d += 32) s += qs[m.nope + d] * __bfloat162float(kr[d]);
    s = warp_sum(s);
    if (lane == 0) sc[t] = s * m.scale;
  }
  __syncthreads();
  float tmax = -FLT_MAX;
  for (int t = threadIdx.x; t < last; t += blockDim.x) tmax = fmaxf(tmax, sc[t]);
  tmax = block_reduce(tmax, true);
  const float old = mx[ih], nmax = fmaxf(old, tmax), r = expf(old - nmax);  // old = -inf on the first tile: r = 0
  __syncthreads();
  for (int t = threadIdx.x; t < last; t += blockDim.x) sc[t] = expf(sc[t] - nmax);
  __syncthreads();
  float psum = 0;
  for (int t = threadIdx.x; t < last; t += blockDim.x) psum += sc[t];
  psum = block_reduce(psum, false);
  for (int j = threadIdx.x; j < m.v; j += blockDim.x) {
    float a = acc[int64_t(ih) * m.v + j] * r;
    for (int t = 0; t < last; t++) a += sc[t] * kvx[(int64_t(t) * m.heads + h) * per + m.nope + j];
    acc[int64_t(ih) * m.v + j] = a;
  }
  if (threadIdx.x == 0) {
    den[ih] = den[ih] * r + psum;
    mx[ih] = nmax;
  }
}

__global__ void expanded_init_kernel(float* acc, float* mx, float* den, int rows, int v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < int64_t(rows) * v; i += int64_t(gridDim.x) * blockDim.x) {
    acc[i] = 0;
    if (i < rows) {
      mx[i] = -INFINITY;
      den[i] = 0;
    }
  }
}

__global__ void expanded_finish_kernel(float* out, const float* acc, const float* den, int v) {
  for (int j = threadIdx.x; j < v; j += blockDim.x) out[int64_t(blockIdx.x) * v + j] = acc[int64_t(blockIdx.x) * v + j] / den[blockIdx.x];
}

__global__ void gather_latent_kernel(float* dst, const __nv_bfloat16* cache, int t0, int rank, int width, KvPages pages,
                                     const int32_t* last) {
  const int t = t0 + int(blockIdx.x);
  const bool inside = t <= *last;  // the table holds no block for positions past the sequence's last
  const __nv_bfloat16* src = inside ? cache + kv_pool_row(pages.table(0), t) * width : nullptr;
  for (int k = threadIdx.x; k < rank; k += blockDim.x)
    dst[int64_t(blockIdx.x) * rank + k] = inside ? __bfloat162float(src[k]) : 0.0f;
}

__global__ void gather_step_latents_kernel(float* dst, const __nv_bfloat16* cache, int rank, int width, const int32_t* pos,
                                           KvPages pages) {
  const int i = int(blockIdx.x);
  const __nv_bfloat16* src = cache + kv_pool_row(pages.table(i), pos[i]) * width;
  for (int k = threadIdx.x; k < rank; k += blockDim.x) dst[int64_t(i) * rank + k] = __bfloat162float(src[k]);
}

}  // namespace

size_t mla_absorbed_work_floats(int n, int heads, int rank, int T) {
  return size_t(n) * heads * (2 * size_t(rank) + size_t(T));
}

void mla_absorbed(float* out, const float* q, const uint16_t* cache_u16, const void* kv_b, DType dt, const MlaShape& m,
                  float* work, cudaStream_t s) {
  TRELLM_ASSERT(m.rank + m.rope <= 1024 && m.nope <= 512, "MLA dims too large for the v1 kernels");
  const auto* cache = reinterpret_cast<const __nv_bfloat16*>(cache_u16);
  switch (dt) {
    case DType::BF16: return absorbed(out, q, cache, static_cast<const __nv_bfloat16*>(kv_b), m, work, s);
    case DType::F16: return absorbed(out, q, cache, static_cast<const __half*>(kv_b), m, work, s);
    case DType::F32: return absorbed(out, q, cache, static_cast<const float*>(kv_b), m, work, s);
    default: TRELLM_ASSERT(false, "mla_absorbed: kv_b dtype ", dtype_name(dt));
  }
}

void mla_expanded_init(float* acc, float* mx, float* den, int rows, int v, cudaStream_t s) {
  expanded_init_kernel<<<std::min((rows * v + 255) / 256, 4096), 256, 0, s>>>(acc, mx, den, rows, v);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void mla_expanded_tile(const float* q, const uint16_t* cache, const float* kvx, int t0, int nt, const MlaShape& m,
                       float* acc, float* mx, float* den, cudaStream_t s) {
  TRELLM_ASSERT(nt <= kMaxTile && m.nope + m.rope <= 1024);
  expanded_tile_kernel<<<m.n * m.heads, 256, 0, s>>>(q, reinterpret_cast<const __nv_bfloat16*>(cache), kvx, t0, nt, m, acc, mx, den);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void mla_expanded_finish(float* out, const float* acc, const float* den, int rows, int v, cudaStream_t s) {
  expanded_finish_kernel<<<rows, 256, 0, s>>>(out, acc, den, v);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void gather_latent(float* dst, const uint16_t* cache, int t0, int nt, int rank, int width, const KvPages& pages,
                   const int32_t* last, cudaStream_t s) {
  gather_latent_kernel<<<nt, 256, 0, s>>>(dst, reinterpret_cast<const __nv_bfloat16*>(cache), t0, rank, width, pages, last);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void gather_step_latents(float* dst, const uint16_t* cache, int n, int rank, int width, const int32_t* pos,
                         const KvPages& pages, cudaStream_t s) {
  if (n == 0) return;
  gather_step_latents_kernel<<<n, 256, 0, s>>>(dst, reinterpret_cast<const __nv_bfloat16*>(cache), rank, width, pos, pages);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
