// What the two MLA attention kernels share (mla_attend.cu: the prefill kernel and the combine;
// mla_attend_decode.cu: the decode kernel): their parameters and how a context is cut into splits.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/kv_pages.h"
#include "backend/cuda/mla.h"
#include "backend/cuda/mla_common.cuh"

namespace trellm::cuda::mla {

struct AttendParams {
  const __nv_bfloat16* qb;     // [rows, 576]
  const __nv_bfloat16* cache;  // pool [blocks * 64, 576]
  const int32_t* pos;          // [n]
  KvPages pages;               // query row i's block table: pages.table(i)
  int rows, heads, group_rows, groups, splits;  // group g = rows [g * group_rows, (g + 1) * group_rows)
  float scale_log2;            // softmax scale * log2(e): scores live in the log2 domain (exp2f)
  int reverse;                 // 1: heaviest (latest) row groups first, for causal prefill load balance
  __nv_bfloat16* part_o;       // [groups, splits, 32, 512] unnormalised partial outputs (bf16: half the traffic)
  float* part_ml;              // [groups, splits, 32, 2]   (max, sum) per row
  float* out_f32;              // splits == 1: normalised o_lat [rows, 512] (decode) ...
  __nv_bfloat16* out_bf16;     // ... or bf16 (prefill)
  int l2_ahead = 1;            // decode v3: a split's tiles asked into L2 this many ahead of use (mla_attend_decode.cu)
};

// Tiles [tb, te) of a split; T = last visible key of the group + 1. The attention kernels and the combine run
// the same arithmetic, so they agree on how many splits hold data.
struct SplitRange {
  int ntiles, tps, active;
};
__device__ __forceinline__ SplitRange split_range(int T, int splits) {
  SplitRange r;
  r.ntiles = (T + kKeysPerTile - 1) / kKeysPerTile;
  r.tps = (r.ntiles + splits - 1) / splits;
  r.active = (r.ntiles + r.tps - 1) / r.tps;
  return r;
}

// The context length of row group `group` as the attention split it: its rows' largest position + 1. Warp 0
// computes it into *t_s, every thread returns it (the barrier is inside).
__device__ __forceinline__ int group_context(const int32_t* pos, int group, int group_rows, int rows, int heads, int* t_s) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, gr = group * group_rows + lane;
    int pm = lane < group_rows && gr < rows ? __ldg(pos + gr / heads) : -1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) pm = max(pm, __shfl_xor_sync(0xffffffffu, pm, o));
    if (lane == 0) *t_s = pm + 1;
  }
  __syncthreads();
  return *t_s;
}

// The merge weights of one row's split partials (the combine kernel and the decode's output projection):
// w_s[s] = 2^(m_s - M) for the `active` splits that hold data, M = max m_s; returns L = sum_s w_s l_s, so that
// o = sum_s w_s O_s / L. ml: the row's (m, l) in split 0, split s at + s * 64 floats. All kThreads threads
// call it; red holds kThreads / 32 floats; w_s is readable on return.
template <int kThreads>
__device__ __forceinline__ float split_weights(const float* ml, int active, float* w_s, float* red) {
  constexpr int kWarps = kThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float M = -INFINITY;
  for (int s = tid; s < active; s += kThreads) M = fmaxf(M, ml[size_t(s) * kRowsPerCta * 2]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  if (lane == 0) red[warp] = M;
  __syncthreads();
  M = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; w++) M = fmaxf(M, red[w]);
  __syncthreads();  // red is reused below
  float L = 0.0f;
  for (int s = tid; s < active; s += kThreads) {
    const float w = exp2f(ml[size_t(s) * kRowsPerCta * 2] - M);
    w_s[s] = w;
    L += w * ml[size_t(s) * kRowsPerCta * 2 + 1];
  }
  L = dev::warp_sum(L);
  if (lane == 0) red[warp] = L;
  __syncthreads();
  L = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; w++) L += red[w];
  return L;
}

// The decode kernel (mla_attend_decode.cu) over grid (groups, splits); writes what the prefill kernel writes
// (o_lat, or the partials the combine merges). Takes groups of <= 32 rows of one sequence each.
void launch_attend_decode(const AttendParams& P, cudaStream_t s, bool pdl);

}  // namespace trellm::cuda::mla
