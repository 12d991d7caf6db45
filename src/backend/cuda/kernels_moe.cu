// MoE kernels: the sigmoid router (same semantics and tie rule as CpuBackend::moe_route) and, for dense
// (unquantized) experts, per-(token, slot) GEMV-style expert FFNs. Trellis-coded experts use the fused
// kernels of trellis_kernels.h instead.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"

namespace trellm::cuda {

namespace {

constexpr int kMaxExperts = 512;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// block per token, 256 threads
template <typename G>
__global__ void route_kernel(const float* x, const G* gate, const float* bias, int hidden, int E, int top_k, int n_group,
                             int topk_group, bool norm, float scale, float* weights, int32_t* ids) {
  __shared__ float s[kMaxExperts], choice[kMaxExperts];
  extern __shared__ float xs[];  // the token's activations, read by every warp
  const int i = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int k = threadIdx.x; k < hidden; k += blockDim.x) xs[k] = x[int64_t(i) * hidden + k];
  __syncthreads();
  for (int e = warp; e < E; e += nw) {
    // Four independent partial sums keep several weight loads in flight (one dependent chain was 137 us/layer).
    float d0 = 0, d1 = 0, d2 = 0, d3 = 0;
    const int64_t row = int64_t(e) * hidden;
    int k = lane;
    for (; k + 96 < hidden; k += 128) {
      d0 += ld(gate, row + k) * xs[k];
      d1 += ld(gate, row + k + 32) * xs[k + 32];
      d2 += ld(gate, row + k + 64) * xs[k + 64];
      d3 += ld(gate, row + k + 96) * xs[k + 96];
    }
    for (; k < hidden; k += 32) d0 += ld(gate, row + k) * xs[k];
    float d = warp_sum((d0 + d1) + (d2 + d3));
    if (lane == 0) {
      s[e] = 1.0f / (1.0f + expf(-d));
      choice[e] = s[e] + (bias ? bias[e] : 0.0f);
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (n_group > 1) {  // keep the topk_group groups whose two best choice scores sum highest
    const int gs = E / n_group;
    bool keep[64];
    float gscore[64];
    for (int g = 0; g < n_group; g++) {
      float b1 = -FLT_MAX, b2 = -FLT_MAX;
      for (int e = g * gs; e < (g + 1) * gs; e++) {
        if (choice[e] > b1) b2 = b1, b1 = choice[e];
        else if (choice[e] > b2) b2 = choice[e];
      }
      gscore[g] = b1 + (gs > 1 ? b2 : 0.0f);
      keep[g] = false;
    }
    for (int r = 0; r < topk_group; r++) {  // stable: ties keep the lower group index
      int best = -1;
      for (int g = 0; g < n_group; g++)
        if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
      keep[best] = true;
    }
    for (int g = 0; g < n_group; g++)
      if (!keep[g])
        for (int e = g * gs; e < (g + 1) * gs; e++) choice[e] = -INFINITY;
  }
  float sum = 0;
  int picked[16];
  for (int k = 0; k < top_k; k++) {  // highest choice first; ties go to the lower expert index
    int best = -1;
    for (int e = 0; e < E; e++) {
      bool taken = false;
      for (int q = 0; q < k; q++) taken |= picked[q] == e;
      if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
    }
    picked[k] = best;
    sum += s[best];
  }
  const float nrm = norm ? 1.0f / (sum + 1e-20f) : 1.0f;
  for (int k = 0; k < top_k; k++) {
    ids[int64_t(i) * top_k + k] = picked[k];
    weights[int64_t(i) * top_k + k] = s[picked[k]] * nrm * scale;
  }
}

struct Job {
  int expert, token;
  float w;
};
__device__ __forceinline__ Job job_of(int j, const DenseMoeArgs& a, const int32_t* ids, const float* wts) {
  if (j < a.m * a.top_k) return {ids[j], j / a.top_k, wts[j]};
  return {a.n_experts, j - a.m * a.top_k, 1.0f};
}

// act[j, r] = silu(gate_r · x) * (up_r · x)        grid (jobs, ceil(max_inter / 8)), block 256 (warp per r)
template <typename W>
__global__ void gate_up_kernel(DenseMoeArgs a, const float* x, const int32_t* ids, const float* wts, float* act, int act_ld) {
  const Job jb = job_of(blockIdx.x, a, ids, wts);
  const int inter = jb.expert == a.n_experts ? a.shared_inter : a.inter;
  const int r = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (r >= inter) return;
  const W* g = static_cast<const W*>(a.weights[jb.expert * 3 + 0]) + int64_t(r) * a.hidden;
  const W* u = static_cast<const W*>(a.weights[jb.expert * 3 + 1]) + int64_t(r) * a.hidden;
  const float* xi = x + int64_t(jb.token) * a.hidden;
  float sg = 0, su = 0;
  for (int k = lane; k < a.hidden; k += 32) {
    sg += ld(g, k) * xi[k];
    su += ld(u, k) * xi[k];
  }
  sg = warp_sum(sg);
  su = warp_sum(su);
  if (lane == 0) act[int64_t(blockIdx.x) * act_ld + r] = sg / (1.0f + expf(-sg)) * su;
}

// part[j, o] = w_j · (down_o · act[j])              grid (jobs, ceil(hidden / 8)), block 256
template <typename W>
__global__ void down_kernel(DenseMoeArgs a, const int32_t* ids, const float* wts, const float* act, int act_ld, float* part) {
  const Job jb = job_of(blockIdx.x, a, ids, wts);
  const int inter = jb.expert == a.n_experts ? a.shared_inter : a.inter;
  const int o = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (o >= a.hidden) return;
  const W* d = static_cast<const W*>(a.weights[jb.expert * 3 + 2]) + int64_t(o) * inter;
  const float* ai = act + int64_t(blockIdx.x) * act_ld;
  float s = 0;
  for (int k = lane; k < inter; k += 32) s += ld(d, k) * ai[k];
  s = warp_sum(s);
  if (lane == 0) part[int64_t(blockIdx.x) * a.hidden + o] = jb.w * s;
}

// out[i, o] = Σ_k part[i*K + k, o] + part[shared job of i, o]     grid m, block 256
__global__ void combine_kernel(DenseMoeArgs a, const float* part, float* out) {
  const int i = blockIdx.x;
  for (int o = threadIdx.x; o < a.hidden; o += blockDim.x) {
    float s = 0;
    for (int k = 0; k < a.top_k; k++) s += part[(int64_t(i) * a.top_k + k) * a.hidden + o];
    if (a.has_shared) s += part[(int64_t(a.m) * a.top_k + i) * a.hidden + o];
    out[int64_t(i) * a.hidden + o] = s;
  }
}

template <typename W>
void run_dense(const DenseMoeArgs& a, const float* x, const int32_t* ids, const float* wts, float* act, float* part,
               float* out, cudaStream_t s) {
  const int jobs = a.m * a.top_k + (a.has_shared ? a.m : 0);
  const int max_inter = std::max(a.inter, a.has_shared ? a.shared_inter : 0);
  gate_up_kernel<W><<<dim3(jobs, (max_inter + 7) / 8), 256, 0, s>>>(a, x, ids, wts, act, max_inter);
  TRELLM_CUDA_LAUNCH_CHECK();
  down_kernel<W><<<dim3(jobs, (a.hidden + 7) / 8), 256, 0, s>>>(a, ids, wts, act, max_inter, part);
  TRELLM_CUDA_LAUNCH_CHECK();
  combine_kernel<<<a.m, 256, 0, s>>>(a, part, out);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace

void moe_route(const float* x, const void* gate, DType dt, const float* bias, int m, int hidden, int E, int top_k,
               int n_group, int topk_group, bool norm, float scale, float* weights, int32_t* ids, cudaStream_t s) {
  TRELLM_ASSERT(E <= kMaxExperts && top_k <= 16 && n_group <= 64 && hidden <= 8192, "router limits: E ", E, " top_k ", top_k);
  const size_t smem = size_t(hidden) * sizeof(float);
  switch (dt) {
    case DType::BF16:
      route_kernel<<<m, 256, smem, s>>>(x, static_cast<const __nv_bfloat16*>(gate), bias, hidden, E, top_k, n_group, topk_group, norm, scale, weights, ids);
      break;
    case DType::F16:
      route_kernel<<<m, 256, smem, s>>>(x, static_cast<const __half*>(gate), bias, hidden, E, top_k, n_group, topk_group, norm, scale, weights, ids);
      break;
    case DType::F32:
      route_kernel<<<m, 256, smem, s>>>(x, static_cast<const float*>(gate), bias, hidden, E, top_k, n_group, topk_group, norm, scale, weights, ids);
      break;
    default: TRELLM_ASSERT(false, "moe_route: gate dtype ", dtype_name(dt));
  }
  TRELLM_CUDA_LAUNCH_CHECK();
}

namespace {
__global__ void moe_scatter_add_kernel(float* out, const float* y, const int32_t* slots, const float* wts, int top_k,
                                       int hidden) {
  const int r = int(blockIdx.x), slot = slots[r];
  const float w = wts[slot];
  float* o = out + int64_t(slot / top_k) * hidden;
  const float* yr = y + int64_t(r) * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = fmaf(w, yr[j], o[j]);  // cpu::axpy's fma
}
}  // namespace

void moe_scatter_add(float* out, const float* y, const int32_t* slots, const float* wts, int m, int top_k, int hidden,
                     cudaStream_t s) {
  if (m == 0) return;
  moe_scatter_add_kernel<<<m, 256, 0, s>>>(out, y, slots, wts, top_k, hidden);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void moe_dense(const DenseMoeArgs& a, const float* x, const int32_t* ids, const float* wts, float* act, float* part,
               float* out, cudaStream_t s) {
  switch (a.dtype) {
    case DType::BF16: return run_dense<__nv_bfloat16>(a, x, ids, wts, act, part, out, s);
    case DType::F16: return run_dense<__half>(a, x, ids, wts, act, part, out, s);
    case DType::F32: return run_dense<float>(a, x, ids, wts, act, part, out, s);
    default: TRELLM_ASSERT(false, "moe_dense: dtype ", dtype_name(a.dtype));
  }
}

}  // namespace trellm::cuda
