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

// The filters of cpu::sample_filter as one key threshold: survivors are the usable logits with key >= floor.
struct RowFilter {
  float m = 0;        // the largest usable logit
  int64_t best = 0;   // its id (ties: the lowest); V when no logit is usable
  uint32_t floor = 0;
};
__device__ RowFilter row_filter(const float* l, int64_t V, const SamplingParams* params) {
  const float temperature = params->temperature, top_p = params->top_p, min_p = params->min_p;
  const int top_k = params->top_k;
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
  RowFilter f;
  f.m = best;
  f.best = bi;
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
    f.floor = floor;
  }
  return f;
}
__device__ __forceinline__ bool keeps(const RowFilter& f, float x) { return usable(x) && key_of(x) >= f.floor; }

// Gumbel-max over the survivors of `f` with noise (seed, step): the exact draw from softmax(l / T) restricted to them.
__device__ int64_t gumbel_draw(const float* l, int64_t V, const RowFilter& f, float temperature, uint64_t seed, uint64_t step) {
  double top = -DBL_MAX;
  int64_t ti = V;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = l[i];
    if (!keeps(f, x)) continue;
    const double score = double(x) / double(temperature) - log(-log(uniform(seed, step, uint64_t(i))));
    if (score > top || (score == top && i < ti)) top = score, ti = i;
  }
  block_argmax(top, ti);
  return ti;
}

// The token cpu::sample_token picks from l[0, V) with *params and noise step `step`; the whole block calls it and
// every thread gets the result.
__device__ int64_t sample_row(const float* l, int64_t V, const SamplingParams* params, uint64_t step) {
  const RowFilter f = row_filter(l, V, params);
  int64_t pick = f.best < V ? f.best : 0;  // all non-finite: token 0 rather than an out-of-range id
  if (params->temperature > 0.0f && f.best < V) {
    const int64_t ti = gumbel_draw(l, V, f, params->temperature, params->seed, step);
    if (ti < V) pick = ti;
  }
  return pick;
}

__device__ double block_sum_d(double x) {
  __shared__ double part[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < kThreads / 32; w++) s += part[w];
  return s;
}
// Z = the sum of exp((l - m) / T) over the survivors (in double, as cpu::sample_probs).
__device__ double row_mass(const float* l, int64_t V, const RowFilter& f, double T) {
  double z = 0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads)
    if (keeps(f, l[i])) z += exp((double(l[i]) - double(f.m)) / T);
  return block_sum_d(z);
}

// Backend::spec_verify: block i verifies sequence i's K drafts (cpu::spec_verify_one, row by row).
__global__ void __launch_bounds__(kThreads) spec_verify_kernel(const float* target, const float* draft, int draft_stride, const int32_t* src,
                                   const int32_t* tokens, const SamplingParams* params, const int32_t* steps, int32_t* out,
                                   int K, int64_t V) {
  grid_wait();
  grid_launch_dependents();
  const int i = blockIdx.x;
  const SamplingParams* p = params + i;
  const double T = p->temperature;
  const uint64_t step = uint64_t(steps[i]);
  const int32_t* d = tokens + int64_t(i) * (K + 1) + 1;
  const float* trow = target + int64_t(i) * (K + 1) * V;
  __shared__ double s_pd;
  int a = 0;
  int64_t last = -1;
  for (; a < K; a++) {
    const float* lt = trow + int64_t(a) * V;
    const RowFilter ft = row_filter(lt, V, p);
    if (T == 0.0) {
      if (int64_t(d[a]) == ft.best) continue;
      last = ft.best;
      break;
    }
    const float* lq = draft + (int64_t(a) * draft_stride + src[i]) * V;
    const RowFilter fq = row_filter(lq, V, p);
    const double zt = row_mass(lt, V, ft, T), zq = row_mass(lq, V, fq, T);
    const int64_t dd = d[a];
    const bool in_vocab = dd >= 0 && dd < V;  // a draft outside the vocabulary (never sampled) is rejected
    __syncthreads();
    if (threadIdx.x == 0) {
      const double pd = in_vocab && keeps(ft, lt[dd]) ? exp((double(lt[dd]) - double(ft.m)) / T) / zt : 0.0;
      const double qd = in_vocab && keeps(fq, lq[dd]) ? exp((double(lq[dd]) - double(fq.m)) / T) / zq : 1.0;
      s_pd = uniform(p->seed, step + uint64_t(a), kSpecAcceptIndex) * qd < pd ? 1.0 : 0.0;
    }
    __syncthreads();
    if (s_pd != 0.0) continue;
    // rejected: Gumbel-max over log(max(0, p - q))
    double top = -DBL_MAX;
    int64_t ti = V;
    for (int64_t x = threadIdx.x; x < V; x += kThreads) {
      const double px = keeps(ft, lt[x]) ? exp((double(lt[x]) - double(ft.m)) / T) / zt : 0.0;
      const double qx = keeps(fq, lq[x]) ? exp((double(lq[x]) - double(fq.m)) / T) / zq : 0.0;
      const double r = px - qx;
      if (!(r > 0)) continue;
      const double score = log(r) - log(-log(uniform(p->seed ^ kSpecResidualSalt, step + uint64_t(a), uint64_t(x))));
      if (score > top || (score == top && x < ti)) top = score, ti = x;
    }
    block_argmax(top, ti);
    last = ti < V ? ti : sample_row(lt, V, p, step + uint64_t(a));
    break;
  }
  if (a == K) last = sample_row(trow + int64_t(K) * V, V, p, step + uint64_t(K));
  if (threadIdx.x != 0) return;
  int32_t* o = out + int64_t(i) * (K + 2);
  o[0] = a;
  for (int j = 0; j < a; j++) o[1 + j] = d[j];
  for (int j = a; j <= K; j++) o[1 + j] = int32_t(last);
}

// Backend::spec_prepare: thread i prepares sequence i.
__global__ void spec_prepare_kernel(const int32_t* result, const int32_t* steps, int32_t* base, const int32_t* drafts,
                                    int32_t* tokens, int32_t* pos, int32_t* seq, int32_t* logit_idx, int32_t* steps_out,
                                    int m, int K, int j) {
  grid_wait();
  grid_launch_dependents();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= m) return;
  const int32_t a = result[int64_t(i) * (K + 2)];
  steps_out[i] = steps[i] + a + 1 + j;
  if (j == 0) {
    for (int r = 0; r <= K; r++) tokens[int64_t(i) * (K + 1) + r] = result[int64_t(i) * (K + 2) + 1 + r];
    logit_idx[i] = i * (K + 1) + a;
    base[i] = pos[int64_t(i) * (K + 1)] + a;
  } else {
    tokens[i] = drafts[i];
    pos[i] = base[i] + j;
    seq[i] = i;
  }
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

void spec_verify(const float* target, const float* draft, int draft_stride, const int32_t* src, const int32_t* tokens,
                 const void* params, const int32_t* steps, int32_t* out, int m, int K, int64_t V, cudaStream_t s) {
  launch(spec_verify_kernel, dim3(m), dim3(kThreads), 0, s, true, target, draft, draft_stride, src, tokens,
         static_cast<const SamplingParams*>(params), steps, out, K, V);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void spec_prepare(const int32_t* result, const int32_t* steps, int32_t* base, const int32_t* drafts, int32_t* tokens,
                  int32_t* pos, int32_t* seq, int32_t* logit_idx, int32_t* steps_out, int m, int K, int j, cudaStream_t s) {
  launch(spec_prepare_kernel, dim3((m + 127) / 128), dim3(128), 0, s, true, result, steps, base, drafts, tokens, pos, seq,
         logit_idx, steps_out, m, K, j);
  TRELLM_CUDA_LAUNCH_CHECK();
}

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
