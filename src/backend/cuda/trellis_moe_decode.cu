// MoE decode variant (m <= 8 tokens): one job per (token, slot), the shared expert being slot top_k.
//  gateup_decode_kernel  grid (J, inter_p/128, 2·s_gu): gate (z < s_gu) or up, one k-split each; the last
//                        of the 2·s_gu blocks of a (job, column group) sums the partials, applies both output
//                        transforms, SwiGLU, and the down projection's input transform -> a_d[job] (fp16).
//  down_decode_kernel    grid (J, hidden_p/128, s_d): the last of the jpt·s_d blocks of a (token, column
//                        group) applies each job's output transform, its routing weight, and sums the
//                        token's jobs in slot order -> out (no atomics on data: deterministic).
//  moe_decode_kernel     both in one launch (TRELLM_MOE_DECODE=one; not yet measured on a GPU): blocks take a
//                        ticket in the order they start, the first J·(inter_p/128)·2·s_gu tickets are gate/up
//                        blocks, the rest down blocks. A down block loads its job's weights at once (the router
//                        ran before this kernel) and waits only for its own job's a_d, counted in global memory
//                        (ready[j]: one arrival per gate/up column group). The kernel boundary between the two
//                        (a drain, a PDL wait and the down weights' first round trip) leaves the critical path.
//                        Deadlock-free: a down block waits only on blocks with earlier tickets, which are
//                        running or done and wait on nothing. Same arithmetic in the same order: bit-identical.
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/trellis_moe.cuh"

namespace trellm::cuda::tk {

namespace {
__device__ __forceinline__ void prefetch_job(const DeviceTrellis& w, int group, int c0, int nck, uint32_t* Bs) {
  with_k(w.K, [&](auto kc) { gemv_prefetch<decltype(kc)::value>(w, group, c0, nck, Bs); });
}

// The start of a job's block, around the PDL wait: the shared expert's weights are known before the router has
// run, so its blocks start loading them while the router is still running; a routed job needs the router's ids
// and loads after the wait. Returns the job's (gate, up, down) descriptors; projection `which` is loading.
__device__ __forceinline__ const DeviceTrellis* start_job(const MoeArgs& a, int token, int slot, int which, int group,
                                                          int c0, int nck, uint32_t* Bs) {
  const bool early = slot >= a.top_k;
  if (early) prefetch_job(a.shared[which], group, c0, nck, Bs);
  grid_launch_dependents();
  grid_wait();
  const DeviceTrellis* d3 = job_desc(a, token, slot);
  if (size_t(kStagesGemv) * 2048 * d3[which].K > size_t(a.ring_bytes)) __trap();  // K above the host's max_k
  if (!early) prefetch_job(d3[which], group, c0, nck, Bs);
  return d3;
}

// Waits (thread 0 polls, the block follows) until *count reaches target, then adds this block's arrival; the
// arrival that completes target + waiters resets the counter, so the workspace is left at zero. A count that
// never comes (a wrong plan) traps after 2^26 polls (at least 4 s) instead of hanging the GPU.
__device__ __forceinline__ void wait_then_arrive(int* count, int target, int waiters) {
  if (threadIdx.x == 0) {
    int v, spins = 0;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(count) : "memory");
      if (v >= target) break;
      __nanosleep(64);
      if (++spins > (1 << 26)) __trap();
    }
    if (atomicAdd(count, 1) == target + waiters - 1) atomicExch(count, 0);
  }
  __syncthreads();
}

// A one-row GEMV block's partial (row 0 of gemv_mainloop's acc: column warp·16 + lane/4, and + 8) at row `pr`.
__device__ __forceinline__ void store_partial_row0(float* pr, const float acc[4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if ((lane & 3) == 0) {
    pr[warp * 16 + (lane >> 2)] = acc[0];
    pr[warp * 16 + (lane >> 2) + 8] = acc[2];
  }
}
}  // namespace

// Gate or up (which) of job j, column group `group`, k-split z. one_kernel: the last block of the (job, group)
// also counts a_d's columns as ready for the down blocks of the same launch.
__device__ __forceinline__ void gateup_block(const MoeArgs& a, int j, int group, int which, int z, unsigned char* smem,
                                             int* flag, bool one_kernel) {
  const int token = j / a.jpt, slot = j - token * a.jpt;
  const int chunks = a.hidden_p / kChunk;
  const int c0 = z * chunks / a.s_gu, nck = (z + 1) * chunks / a.s_gu - c0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t* Bs = reinterpret_cast<uint32_t*>(smem);
  __half* As = reinterpret_cast<__half*>(smem + a.ring_bytes);
  const int a_pitch = (chunks + a.s_gu - 1) / a.s_gu * kChunk + 8;  // row 1: zeros (gemv_mainloop_cb)
  const DeviceTrellis* d3 = start_job(a, token, slot, which, group, c0, nck, Bs);
  const DeviceTrellis w = d3[which];
  for (int c = warp; c < nck; c += kWarps)
    xform_chunk_warp(As + c * kChunk, a.x + int64_t(token) * a.hidden, a.hidden, w.suh, (c0 + c) * kChunk);
  zero_gemv_row(As, a_pitch, 1, nck * kChunk);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  with_k(w.K, [&](auto kc) { gemv_mainloop<decltype(kc)::value>(w, group, c0, nck, As, a_pitch, 1, Bs, acc); });
  const int64_t zs = a.inter_p;  // split stride
  float* pbase = a.p_gu + (int64_t(j) * 2 * a.s_gu) * zs + group * kGroupCols;
  store_partial_row0(pbase + (int64_t(which) * a.s_gu + z) * zs, acc);
  const int groups = a.inter_p / kGroupCols;
  if (!arrive_last(a.cnt_gu + j * groups + group, 2 * a.s_gu, flag)) return;
  // Warp 0: gate, warp 1: up (in parallel: each is a chain of dependent L2 round trips), then SwiGLU and
  // the down input transform by warp 0.
  cp_wait<0>();
  float* gu = reinterpret_cast<float*>(smem);  // [2][128], the B ring is free now
  if (warp < 2) {
    float v[4];
    sum_partials(v, pbase + int64_t(warp) * a.s_gu * zs + 4 * lane, a.s_gu, zs);
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
  if (one_kernel) {  // release: every lane's a_d stores, then the count (wait_then_arrive acquires it)
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicAdd(a.ready + j, 1);
  }
}

__global__ void __launch_bounds__(kThreads, 4) gateup_decode_kernel(const MoeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int flag;
  gateup_block(a, blockIdx.x, blockIdx.y, blockIdx.z / a.s_gu, blockIdx.z % a.s_gu, smem, &flag, false);
}

// Down of job j, column group `group`, k-split z. one_kernel: a_d[j] is written during this launch; wait for it.
__device__ __forceinline__ void down_block(const MoeArgs& a, int j, int group, int z, unsigned char* smem, int* flag,
                                           bool one_kernel) {
  const int token = j / a.jpt, slot = j - token * a.jpt;
  const int chunks = a.inter_p / kChunk;
  const int c0 = z * chunks / a.s_d, nck = (z + 1) * chunks / a.s_d - c0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t* Bs = reinterpret_cast<uint32_t*>(smem);
  __half* As = reinterpret_cast<__half*>(smem + a.ring_bytes);
  const int a_pitch = (chunks + a.s_d - 1) / a.s_d * kChunk + 8;
  const DeviceTrellis w = start_job(a, token, slot, 2, group, c0, nck, Bs)[2];  // the weights load meanwhile
  if (one_kernel) wait_then_arrive(a.ready + j, a.inter_p / kGroupCols, (a.hidden_p / kGroupCols) * a.s_d);
  {  // A row: this job's transformed down input, k range [c0, c0 + nck) chunks (16 B per thread and step; L2, as
     // other SMs wrote it during this launch)
    const uint4* src = reinterpret_cast<const uint4*>(a.a_d + int64_t(j) * a.inter_p + c0 * kChunk);
    uint4* dst = reinterpret_cast<uint4*>(As);
    for (int i = threadIdx.x; i < nck * kChunk / 8; i += kThreads) dst[i] = __ldcg(src + i);
  }
  zero_gemv_row(As, a_pitch, 1, nck * kChunk);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  with_k(w.K, [&](auto kc) { gemv_mainloop<decltype(kc)::value>(w, group, c0, nck, As, a_pitch, 1, Bs, acc); });
  const int64_t zs = a.hidden_p;
  store_partial_row0(a.p_d + (int64_t(j) * a.s_d + z) * zs + group * kGroupCols, acc);
  const int groups = a.hidden_p / kGroupCols;
  if (!arrive_last(a.cnt_d + token * groups + group, a.jpt * a.s_d, flag)) return;
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
  if (warp != 0) return;
  float sum[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < a.jpt; s++) {
    const float4 c = *reinterpret_cast<const float4*>(contrib + s * kGroupCols + 4 * lane);
    sum[0] += c.x, sum[1] += c.y, sum[2] += c.z, sum[3] += c.w;
  }
  store_row4(a.out + int64_t(token) * a.hidden, group * kGroupCols + 4 * lane, a.hidden, sum);
}

__global__ void __launch_bounds__(kThreads, 4) down_decode_kernel(const MoeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int flag;
  down_block(a, blockIdx.x, blockIdx.y, blockIdx.z, smem, &flag, false);
}

__global__ void __launch_bounds__(kThreads, 4) moe_decode_kernel(const MoeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int flag, ticket;
  const int J = a.m * a.jpt, gi = a.inter_p / kGroupCols, gh = a.hidden_p / kGroupCols;
  const int n_gu = J * gi * 2 * a.s_gu, n = n_gu + J * gh * a.s_d;
  // The ticket after the PDL wait: the counters are this launch's from here on (the previous MoE launch has ended).
  grid_launch_dependents();
  grid_wait();
  if (threadIdx.x == 0) {
    const int t = atomicAdd(a.ticket, 1);
    if (t == n - 1) atomicExch(a.ticket, 0);  // every block has its ticket: leave the counter at zero
    ticket = t;
  }
  __syncthreads();
  const int t = ticket;
  if (t < n_gu) {  // the two-kernel grid's order: job fastest, then column group, then split
    const int zz = t / (J * gi);
    gateup_block(a, t % J, t / J % gi, zz / a.s_gu, zz % a.s_gu, smem, &flag, true);
  } else {
    const int u = t - n_gu;
    down_block(a, u % J, u / J % gh, u / (J * gh), smem, &flag, true);
  }
}

}  // namespace trellm::cuda::tk
