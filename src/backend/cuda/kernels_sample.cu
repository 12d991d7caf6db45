// Token selection on the device, so a captured decode step needs no host round trip. Same function as
// cpu::sample_token: the filters become one logit threshold (top-k and top-p by 4-pass 8-bit radix selection
// over order-preserving keys of the logits; min-p in closed form), then a Gumbel-max draw with the same
// counter-based noise. One block of 1024 threads per row: 154,880 logits are 152 per thread, read from L2 once per
// pass; sample_rows runs one such block per row of a batch.
#include <cfloat>

#include "backend/cuda/cuda_check.h"
#include "backend/backend.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/pdl.cuh"

namespace trellm::cuda {

namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ double uniform(uint64_t seed, uint64_t step, uint64_t i) {  // = cpu::sample_uniform
  uint64_t z = mix64(seed + 0x9E3779B97F4A7C15ull * (step + 1));
  z = mix64(z ^ (i * 0xD1B54A32D192ED03ull));
  return (double(z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
// Order-preserving map of a float to uint32 (larger float -> larger key).
__device__ __forceinline__ uint32_t key_of(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ bool usable(float x) { return isfinite(x); }

// Block-wide argmax of (value, index) pairs: larger value wins, ties go to the lower index.
template <typename T>
__device__ void block_argmax(T& v, int64_t& idx) {
  __shared__ T sv[32];
  __shared__ int64_t si[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) v = ov, idx = oi;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = v, si[threadIdx.x >> 5] = idx;
  __syncthreads();
  v = sv[0];
  idx = si[0];
  for (int w = 1; w < kThreads / 32; w++)
    if (sv[w] > v || (sv[w] == v && si[w] < idx)) v = sv[w], idx = si[w];
}

__device__ float block_sum(float x) {
  __shared__ float part[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
  __syncthreads();
  float s = 0;
  for (int w = 0; w < kThreads / 32; w++) s += part[w];
  return s;
}

// The smallest key `sel` such that the elements with key >= sel (among those >= floor) hold at least `target`
// of the weight, where an element's weight is 1 (count: top-k) or exp((l - m)/T) (mass: top-p).
template <bool kMass>
__device__ uint32_t radix_select(const float* l, int64_t V, uint32_t floor, float target, float m, float inv_t) {
  __shared__ float hist[256];
  __shared__ uint32_t s_prefix, s_mask;
  __shared__ float s_target;
  if (threadIdx.x == 0) s_prefix = 0, s_mask = 0, s_target = target;
  __syncthreads();
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix, mask = s_mask;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float x = l[i];
      if (!usable(x)) continue;
      const uint32_t k = key_of(x);
      if (k < floor || (k & mask) != prefix) continue;
      atomicAdd(&hist[(k >> shift) & 255u], kMass ? __expf((x - m) * inv_t) : 1.0f);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float rem = s_target;
      int sel = -1, lowest = -1;
      for (int b = 255; b >= 0; b--) {
        if (hist[b] > 0) lowest = b;
        if (hist[b] > 0 && hist[b] >= rem) {
          sel = b;
          break;
        }
        rem -= hist[b];
      }
      if (sel < 0) sel = lowest < 0 ? 0 : lowest;  // rounding left a sliver: take the last non-empty bin
      s_target = rem;
      s_prefix = prefix | (uint32_t(sel) << shift);
      s_mask = mask | (255u << shift);
    }
    __syncthreads();
  }
  return s_prefix;
}

// The token cpu::sample_token picks from l[0, V) with *params and noise step `step`; the whole block calls it and
// every thread gets the result.
__device__ int64_t sample_row(const float* l, int64_t V, const SamplingParams* params, uint64_t step) {
  const float temperature = params->temperature, top_p = params->top_p, min_p = params->min_p;
  const int top_k = params->top_k;
  const uint64_t seed = params->seed;
  float best = -FLT_MAX;
  int64_t bi = V;
  int64_t finite = 0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = l[i];
    if (!usable(x)) continue;
    finite++;
    if (x > best || (x == best && i < bi)) best = x, bi = i;
  }
  const float nfin = block_sum(float(finite));
  block_argmax(best, bi);
  int64_t pick = bi < V ? bi : 0;  // all non-finite: token 0 rather than an out-of-range id
  if (temperature > 0.0f && bi < V) {
    const float m = best, inv_t = 1.0f / temperature;
    uint32_t floor = 0;
    if (top_k > 0 && float(top_k) < nfin) floor = radix_select<false>(l, V, 0, float(top_k), m, inv_t);
    if (top_p < 1.0f) {
      float z = 0;
      for (int64_t i = threadIdx.x; i < V; i += kThreads)
        if (usable(l[i]) && key_of(l[i]) >= floor) z += __expf((l[i] - m) * inv_t);
      z = block_sum(z);
      const uint32_t kp = radix_select<true>(l, V, floor, top_p * z, m, inv_t);
      floor = max(floor, kp);
    }
    if (min_p > 0.0f) floor = max(floor, key_of(float(double(m) + double(temperature) * log(double(min_p)))));
    double top = -DBL_MAX;
    int64_t ti = V;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float x = l[i];
      if (!usable(x) || key_of(x) < floor) continue;
      const double score = double(x) / double(temperature) - log(-log(uniform(seed, step, uint64_t(i))));
      if (score > top || (score == top && i < ti)) top = score, ti = i;
    }
    block_argmax(top, ti);
    if (ti < V) pick = ti;
  }
  return pick;
}

__global__ void sample_kernel(const float* l, int64_t V, const SamplingParams* params, int32_t* token, int32_t* pos,
                              int32_t* history, int64_t cap) {
  grid_wait();  // a PDL dependent of the lm_head (pdl.cuh)
  grid_launch_dependents();
  const int64_t pick = sample_row(l, V, params, uint64_t(history[0]));
  if (threadIdx.x != 0) return;
  token[0] = int32_t(pick);
  pos[0] += 1;
  const int32_t n = history[0];
  if (n + 1 < cap) {
    history[1 + n] = int32_t(pick);
    history[0] = n + 1;
  }
}

// Batched decode: block i samples row i with its own params and step (64 rows: 64 blocks of 1024 threads, each
// reading its 620 KB row from L2 a few times).
__global__ void sample_rows_kernel(const float* l, int64_t V, const SamplingParams* params, const int32_t* steps,
                                   int32_t* tokens) {
  grid_wait();
  grid_launch_dependents();
  const int i = blockIdx.x;
  const int64_t pick = sample_row(l + int64_t(i) * V, V, params + i, uint64_t(steps[i]));
  if (threadIdx.x == 0) tokens[i] = int32_t(pick);
}

}  // namespace

void sample_step(const float* logits, int64_t V, const void* params, int32_t* token, int32_t* pos, int32_t* history,
                 int64_t cap, cudaStream_t s) {
  launch(sample_kernel, dim3(1), dim3(kThreads), 0, s, true, logits, V, static_cast<const SamplingParams*>(params), token, pos, history, cap);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void sample_rows(const float* logits, int64_t V, int n, const void* params, const int32_t* steps, int32_t* tokens,
                 cudaStream_t s) {
  if (n == 0) return;
  launch(sample_rows_kernel, dim3(n), dim3(kThreads), 0, s, true, logits, V, static_cast<const SamplingParams*>(params), steps,
         tokens);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
