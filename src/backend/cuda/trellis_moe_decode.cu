// MoE decode variant (m <= 8 tokens): one job per (token, slot), the shared expert being slot top_k.
//  gateup_decode_kernel  grid (J, inter_p/128, 2·s_gu): gate (z < s_gu) or up, one k-split each; the last
//                        of the 2·s_gu blocks of a (job, column group) sums the partials, applies both output
//                        transforms, SwiGLU, and the down projection's input transform -> a_d[job] (fp16).
//  down_decode_kernel    grid (J, hidden_p/128, s_d): the last of the jpt·s_d blocks of a (token, column
//                        group) applies each job's output transform, its routing weight, and sums the
//                        token's jobs in slot order -> out (no atomics on data: deterministic). It loads its
//                        weights before its wait, the router being done, and may decode MoeArgs::ahead k
//                        tiles there too (off by default, trellis_moe.cu). With MoeArgs::res_h, the last of
//                        a token's column groups then runs the residual step after the experts on the whole
//                        row (add_rms_norm_row, as add_rms_norm_kernel): one kernel boundary a layer fewer.
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope.cuh"
#include "backend/cuda/trellis_moe.cuh"

namespace trellm::cuda::tk {

namespace {
__device__ __forceinline__ void prefetch_job(const DeviceTrellis& w, int group, int c0, int nck, uint32_t* Bs) {
  with_k(w.K, [&](auto kc) { gemv_prefetch<decltype(kc)::value>(w, group, c0, nck, Bs); });
}

// The start of a gate/up block, around the PDL wait: the shared expert's weights are known before the router has
// run, so its blocks start loading them while the router is still running; a routed job needs the router's ids
// and loads after the wait. Returns the job's (gate, up, down) descriptors; projection `which` is loading.
// Its dependents (down) are released only after the wait, so when a down block starts the router, this kernel's
// predecessor, is complete: down reads the routed ids before its own wait (start_down).
__device__ __forceinline__ const DeviceTrellis* start_job(const MoeArgs& a, int token, int slot, int which, int group,
                                                          int c0, int nck, uint32_t* Bs) {
  const bool early = slot >= a.top_k;
  if (early) prefetch_job(a.shared[which], group, c0, nck, Bs);
  grid_wait();
  grid_launch_dependents();
  const DeviceTrellis* d3 = job_desc(a, token, slot);
  if (size_t(kStagesGemv) * 2048 * d3[which].K > size_t(a.ring_bytes)) __trap();  // K above the host's max_k
  if (!early) prefetch_job(d3[which], group, c0, nck, Bs);
  return d3;
}

// The start of a down block: the router's ids are complete (start_job), so the job's weights are loaded and the
// first a.ahead k tiles decoded into D before the wait, which is for gate/up's a_d. The ids are read through L2
// (ld.cg): the router wrote them from other SMs.
__device__ __forceinline__ const DeviceTrellis* start_down(const MoeArgs& a, int token, int slot, int group, int c0, int nck,
                                                           uint32_t* Bs, uint4* D) {
  const DeviceTrellis* d3 = slot < a.top_k ? expert_desc(a, __ldcg(a.ids + token * a.top_k + slot)) : a.shared;
  const DeviceTrellis& w = d3[2];
  if (size_t(kStagesGemv) * 2048 * w.K > size_t(a.ring_bytes)) __trap();  // K above the host's max_k
  with_k(w.K, [&](auto kc) {
    gemv_prefetch<decltype(kc)::value>(w, group, c0, nck, Bs);
    if (a.ahead > 0) gemv_decode_ahead<decltype(kc)::value>(w, Bs, a.ahead, D);
  });
  grid_launch_dependents();
  grid_wait();
  return d3;
}

// A one-row GEMV block's partial (row 0 of gemv_mainloop's acc: column warp·16 + lane/4, and + 8) at row `pr`.
__device__ __forceinline__ void store_partial_row0(float* pr, const float acc[4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if ((lane & 3) == 0) {
    pr[warp * 16 + (lane >> 2)] = acc[0];
    pr[warp * 16 + (lane >> 2) + 8] = acc[2];
  }
}

// The cluster tails' hand-over (slots: [blocks][128] f32 at the same offset in every block, bar: the first
// block's mbarrier, cluster_push_begin'd): block q > 0 of the cluster pushes its row-0 partial into the first
// block's slot q and returns false; the first block writes slot 0 and returns true once every slot has landed.
__device__ __forceinline__ bool push_or_collect_row0(float* slots, int q, const float acc[4], const uint64_t* bar) {
  if (q != 0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if ((lane & 3) == 0) {
      const float* at = slots + q * kGroupCols + warp * 16 + (lane >> 2);
      cluster_push(at, acc[0], bar);
      cluster_push(at + 8, acc[2], bar);
    }
    return false;
  }
  store_partial_row0(slots, acc);
  cluster_push_wait(bar);
  __syncthreads();  // slot 0, written by all warps
  return true;
}
}  // namespace

template <bool kCluster>
__device__ __forceinline__ void gateup_decode(const MoeArgs& a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int flag;
  const int j = blockIdx.x, group = blockIdx.y, which = blockIdx.z / a.s_gu, z = blockIdx.z % a.s_gu;
  const int token = j / a.jpt, slot = j - token * a.jpt;
  const int chunks = a.hidden_p / kChunk;
  const int c0 = z * chunks / a.s_gu, nck = (z + 1) * chunks / a.s_gu - c0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t* Bs = reinterpret_cast<uint32_t*>(smem);
  __half* As = reinterpret_cast<__half*>(smem + a.ring_bytes);
  const int a_pitch = (chunks + a.s_gu - 1) / a.s_gu * kChunk + 8;  // row 1: zeros (gemv_mainloop_cb)
  float* const slots = reinterpret_cast<float*>(smem + a.ring_bytes + size_t(2) * a_pitch * 2);  // gu_cluster
  __shared__ uint64_t cbar;
  if constexpr (kCluster) cluster_push_begin(&cbar, blockIdx.z == 0, uint32_t(2 * a.s_gu - 1) * kClusterSlotBytes);
  const DeviceTrellis* d3 = start_job(a, token, slot, which, group, c0, nck, Bs);
  const DeviceTrellis w = d3[which];
  for (int c = warp; c < nck; c += kWarps)
    xform_chunk_warp(As + c * kChunk, a.x + int64_t(token) * a.hidden, a.hidden, w.suh, (c0 + c) * kChunk);
  zero_gemv_row(As, a_pitch, 1, nck * kChunk);
  clocks::mark_point(clocks::kInputs);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  with_k(w.K, [&](auto kc) { gemv_mainloop<decltype(kc)::value>(w, group, c0, nck, As, a_pitch, 1, Bs, acc); });
  clocks::mark_point(clocks::kMath);
  const int64_t zs = a.inter_p;  // split stride
  float* pbase = a.p_gu + (int64_t(j) * 2 * a.s_gu) * zs + group * kGroupCols;
  const int q = which * a.s_gu + z;  // the block's partial: gate splits, then up's
  if constexpr (kCluster) {
    if (!push_or_collect_row0(slots, q, acc, &cbar)) {
      clocks::mark_point(clocks::kArrived);
      return;
    }
  } else {
    store_partial_row0(pbase + int64_t(q) * zs, acc);
    const int groups = a.inter_p / kGroupCols;
    if (!arrive_last(a.cnt_gu + j * groups + group, 2 * a.s_gu, &flag)) {
      clocks::mark_point(clocks::kArrived);
      return;
    }
  }
  clocks::mark_point(clocks::kArrived);
  // Warp 0: gate, warp 1: up (in parallel: each is a chain of dependent L2 round trips), then SwiGLU and
  // the down input transform by warp 0.
  cp_wait<0>();
  float* gu = reinterpret_cast<float*>(smem);  // [2][128], the B ring is free now
  if (warp < 2) {
    float v[4];
    if constexpr (kCluster) {
      sum_slots(v, slots + warp * a.s_gu * kGroupCols, a.s_gu, kGroupCols);
    } else {
      sum_partials(v, pbase + int64_t(warp) * a.s_gu * zs + 4 * lane, a.s_gu, zs);
    }
    out_transform(v, d3[warp], group * kGroupCols);
    *reinterpret_cast<float4*>(gu + warp * kGroupCols + 4 * lane) = make_float4(v[0], v[1], v[2], v[3]);
  }
  __syncthreads();
  if (warp != 0) return;
  const float4 g4 = *reinterpret_cast<const float4*>(gu + 4 * lane), u4 = *reinterpret_cast<const float4*>(gu + kGroupCols + 4 * lane);
  const float g[4] = {g4.x, g4.y, g4.z, g4.w}, u[4] = {u4.x, u4.y, u4.z, u4.w};
  float h[4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int c = group * kGroupCols + 4 * lane + i;
    h[i] = c < a.inter ? g[i] / (1.0f + expf(-g[i])) * u[i] : 0.0f;  // silu(g)·u, as CpuBackend::silu_mul
  }
  xform_regs_warp(h, d3[2].suh, group * kGroupCols, a.a_d + int64_t(j) * a.inter_p + group * kGroupCols);
  clocks::mark_point(clocks::kStored);
}

__global__ void __launch_bounds__(kThreads, 4) down_decode_kernel(const MoeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int flag;
  const int j = blockIdx.x, group = blockIdx.y, z = blockIdx.z;
  const int token = j / a.jpt, slot = j - token * a.jpt;
  const int chunks = a.inter_p / kChunk;
  const int c0 = z * chunks / a.s_d, nck = (z + 1) * chunks / a.s_d - c0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t* Bs = reinterpret_cast<uint32_t*>(smem);
  __half* As = reinterpret_cast<__half*>(smem + a.ring_bytes);
  const int a_pitch = (chunks + a.s_d - 1) / a.s_d * kChunk + 8;
  uint4* D = reinterpret_cast<uint4*>(smem + a.ring_bytes + size_t(2) * a_pitch * 2);  // after the A row and the zero row
  const DeviceTrellis w = start_down(a, token, slot, group, c0, nck, Bs, D)[2];
  {  // A row: this job's transformed down input, k range [c0, c0 + nck) chunks (16 B per thread and step)
    const uint4* src = reinterpret_cast<const uint4*>(a.a_d + int64_t(j) * a.inter_p + c0 * kChunk);
    uint4* dst = reinterpret_cast<uint4*>(As);
    for (int i = threadIdx.x; i < nck * kChunk / 8; i += kThreads) dst[i] = src[i];
  }
  zero_gemv_row(As, a_pitch, 1, nck * kChunk);
  clocks::mark_point(clocks::kInputs);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  with_k(w.K, [&](auto kc) { gemv_mainloop<decltype(kc)::value>(w, group, c0, nck, As, a_pitch, 1, Bs, acc, D, a.ahead); });
  clocks::mark_point(clocks::kMath);
  const int64_t zs = a.hidden_p;
  const int groups = a.hidden_p / kGroupCols;
  store_partial_row0(a.p_d + (int64_t(j) * a.s_d + z) * zs + group * kGroupCols, acc);
  const bool last = arrive_last(a.cnt_d + token * groups + group, a.jpt * a.s_d, &flag);
  clocks::mark_point(clocks::kArrived);
  if (!last) return;
  // One warp per job of the token (each a chain of dependent loads: id -> descriptor -> svh), weighted
  // contributions staged in shared memory, then summed in slot order by warp 0 (deterministic).
  cp_wait<0>();
  float* contrib = reinterpret_cast<float*>(smem);  // [jpt][128]; the B ring (64 KB) is free now
  for (int s = warp; s < a.jpt; s += kWarps) {
    const int jj = token * a.jpt + s;
    float v[4];
    sum_partials(v, a.p_d + int64_t(jj) * a.s_d * zs + group * kGroupCols + 4 * lane, a.s_d, zs);
    out_transform(v, job_desc(a, token, s)[2], group * kGroupCols);
    const float wt = s < a.top_k ? a.wts[token * a.top_k + s] : 1.0f;
    *reinterpret_cast<float4*>(contrib + s * kGroupCols + 4 * lane) = make_float4(wt * v[0], wt * v[1], wt * v[2], wt * v[3]);
  }
  __syncthreads();
  if (warp == 0) {
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < a.jpt; s++) {
      const float4 c = *reinterpret_cast<const float4*>(contrib + s * kGroupCols + 4 * lane);
      sum[0] += c.x, sum[1] += c.y, sum[2] += c.z, sum[3] += c.w;
    }
    store_row4(a.out + int64_t(token) * a.hidden, group * kGroupCols + 4 * lane, a.hidden, sum);
    clocks::mark_point(clocks::kStored);
  }
  if (!a.res_h) return;
  // The residual step, by the token's last column group to be stored: arrive_last orders every group's out
  // stores (warp 0's, through its barrier) before this block's loads.
  if (!arrive_last(a.cnt_r + token, groups, &flag)) return;
  const int64_t row = int64_t(token) * a.hidden;
  add_rms_norm_row(a.res_h + row, a.out + row, a.res_w, a.res_x + row, a.hidden, a.res_eps);
}

__global__ void __launch_bounds__(kThreads, 4) gateup_decode_kernel(const MoeArgs a) { gateup_decode<false>(a); }
__global__ void __launch_bounds__(kThreads, 4) gateup_decode_cluster_kernel(const MoeArgs a) { gateup_decode<true>(a); }

}  // namespace trellm::cuda::tk
