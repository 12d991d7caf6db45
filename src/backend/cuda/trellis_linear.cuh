// Dense trellis kernels (internal): fused GEMV (m <= 8), tensor-core GEMM (m > 8), dequantize -> bf16.
// Templated on K only; the codebook is a warp-uniform branch per decoded tile (trellis_device.cuh). Each K
// is instantiated in its own translation unit (trellis_k<K>.cu) to keep CI's 2-core build parallel.
#pragma once
#include <algorithm>

#include <cooperative_groups.h>

#include "backend/cuda/pdl.cuh"
#include "backend/cuda/trellis_device.cuh"
#include "backend/cuda/trellis_plan.h"

namespace trellm::cuda::tk {

struct LinearArgs {
  DeviceTrellis w;
  const float* x;     // [m, in] f32 (GEMV, xform)
  const __half* xh;   // [m, in_padded] fp16, transformed (GEMM)
  float* y;           // [m, out] f32
  int m;
  int splits;         // k-splits over blocks (>= 1)
  int a_pitch;        // GEMV: halves per A row in shared memory
  float* partial;     // [splits, m, ldp] f32
  int* counters;      // arrival counters (zero at rest)
  // GEMV pair (trellis_matmul_pair): column groups >= groups1 belong to w2/y2 (same K and in_padded).
  // A single product has groups1 = w.out_padded / 128 and ldp = w.out_padded.
  DeviceTrellis w2;
  float* y2;
  int groups1;
  int ldp;            // partial row stride: the padded widths of both products
  // GEMV with the input RMS-normalised first (trellis_matmul_normed): x_row ← norm_w ⊙ x_row · rsqrt(mean x² + eps).
  const float* norm_w;
  float norm_eps;
  // GEMV: k tiles of each tile's first chunk decoded before the wait (gemv_decode_ahead, <= kMaxDecodeAhead),
  // kDecodedTileBytes of shared memory each after the ring and the rows. 0: none.
  int ahead = 0;
  // gemv_cluster_kernel's tail: 1 = pull (split 0 reads the splits' shared memory after a cluster barrier with
  // release/acquire), 2 = push (the splits st.async their sums into split 0's slots, kClusterSlotBytes a row and
  // split after the decoded tiles, and complete a transaction count on its mbarrier: no cluster-scope fence).
  int cluster_mode = 0;
};

// ---- GEMV split-k tail in a cluster (gemv_cluster_kernel) ------------------------------------------------------
constexpr int kClusterPushMaxRows = 2;  // push mode's slots: splits x rows x 512 B (16 KB at 16 x 2)

// Push mode, before the PDL wait (all threads of every block): split 0's mbarrier expects the other splits' bytes.
__device__ __forceinline__ void cluster_begin(const LinearArgs& p, int z, uint64_t* bar) {
  if (p.cluster_mode == 2) cluster_push_begin(bar, z == 0, uint32_t((p.splits - 1) * p.m * kClusterSlotBytes));
}

// After the main loop, all threads of every block of the group's cluster (rank z = the block's split). red: free
// shared memory for m x 128 floats (the ring, whose last reads the barrier below waits for); slots, bar: push
// mode's (split 0's). Returns true in split 0, which stored y.
__device__ __forceinline__ bool cluster_tail(const LinearArgs& p, const DeviceTrellis& w, float* y, int group, int z,
                                             const float acc[4], float* red, float* slots, uint64_t* bar) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, cq = lane & 3;
  if (p.cluster_mode == 2) {
    if (z != 0) {  // into split 0's slot z
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int r = 2 * cq + h;
        if (r < p.m) {
          const float* at = slots + (z * p.m + r) * kGroupCols + warp * 16 + g;
          cluster_push(at, acc[h], bar);
          cluster_push(at + 8, acc[2 + h], bar);
        }
      }
      clocks::mark_point(clocks::kArrived);
      clocks::mark_point(clocks::kStored);
      return false;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = 2 * cq + h;
      if (r < p.m) slots[r * kGroupCols + warp * 16 + g] = acc[h], slots[r * kGroupCols + warp * 16 + g + 8] = acc[2 + h];
    }
    cluster_push_wait(bar);
    __syncthreads();  // split 0's own slot, written by all its warps
    clocks::mark_point(clocks::kArrived);
    for (int r = warp; r < p.m; r += kWarps) {
      float v[4];
      sum_slots(v, slots + r * kGroupCols, p.splits, p.m * kGroupCols);
      out_transform(v, w, group * kGroupCols);
      store_row4(y + int64_t(r) * w.out, group * kGroupCols + 4 * lane, w.out, v);
    }
    clocks::mark_point(clocks::kStored);
    return true;
  }
  cp_wait<0>();
  __syncthreads();  // every warp is past its last read of the ring
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int r = 2 * cq + h;
    if (r < p.m) {
      red[r * kGroupCols + warp * 16 + g] = acc[h];
      red[r * kGroupCols + warp * 16 + g + 8] = acc[2 + h];
    }
  }
  cluster.sync();  // arrive.release / wait.acquire: every split's sums are in its shared memory
  clocks::mark_point(clocks::kArrived);
  if (z == 0) {
    for (int r = warp; r < p.m; r += kWarps) {
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      for (int q0 = 0; q0 < p.splits; q0 += 8) {
        float4 t[8];  // unpredicated (past the last split: it again, not added), so all 8 are in flight
#pragma unroll
        for (int i = 0; i < 8; i++)
          t[i] = *reinterpret_cast<const float4*>(cluster.map_shared_rank(red, unsigned(min(q0 + i, p.splits - 1))) +
                                                  r * kGroupCols + 4 * lane);
#pragma unroll
        for (int i = 0; i < 8; i++)
          if (q0 + i < p.splits) v[0] += t[i].x, v[1] += t[i].y, v[2] += t[i].z, v[3] += t[i].w;
      }
      out_transform(v, w, group * kGroupCols);
      store_row4(y + int64_t(r) * w.out, group * kGroupCols + 4 * lane, w.out, v);
    }
  }
  // Split 0's reads are done before any block of the cluster exits (its shared memory goes). Relaxed: it orders
  // no data, and a release would wait for split 0's y stores.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
  clocks::mark_point(clocks::kStored);
  return z == 0;
}

// ---- GEMV: grid (out_padded/128, splits), 256 threads --------------------------------------------------------
// One block's tile: column group bx (the pair's second product from groups1 on) over k-split z. `wait` runs once
// the tile's weights are on their way and before anything that reads another kernel's (or tile's) output: the
// PDL wait in gemv_kernel, the step runner's counter wait in the persistent kernel. Returns true in the block
// that summed the group's partials and stored y (the last split to arrive).
//
// kCluster: the group's splits are one thread-block cluster (grid.y = splits <= kMaxCluster, rank = split), and
// split 0 adds their sums in split order, the same order and bits as sum_partials (cluster_tail: pushed into its
// shared memory, or read from theirs). This replaces the partial stores, the acq_rel ticket and the L2 reads of
// the split-k tail (the kernel clocks' 0.9 + 2.1 µs of a 3-bit GEMV's 8.8, H100, 2026-12-07).
template <int K, bool kCluster = false, typename Wait>
__device__ __forceinline__ bool gemv_tile(const LinearArgs& p, int bx, int z, unsigned char* smem, Wait wait) {
  __shared__ int flag;
  const bool second = bx >= p.groups1;  // the pair's second product
  const DeviceTrellis w = second ? p.w2 : p.w;
  float* const y = second ? p.y2 : p.y;
  const int gcol = bx * kGroupCols;  // column offset in the partial rows (both products)
  const int group = second ? bx - p.groups1 : bx, chunks = w.in_padded / kChunk;
  const int c0 = z * chunks / p.splits, nck = (z + 1) * chunks / p.splits - c0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t* Bs = reinterpret_cast<uint32_t*>(smem);
  __half* As = reinterpret_cast<__half*>(smem + kStagesGemv * chunk_words<K>() * 4);
  uint4* D = reinterpret_cast<uint4*>(smem + kStagesGemv * chunk_words<K>() * 4 + size_t(p.m + 1) * p.a_pitch * 2);
  __shared__ uint64_t cluster_bar;
  if constexpr (kCluster) cluster_begin(p, z, &cluster_bar);
  gemv_prefetch<K>(w, group, c0, nck, Bs);  // weights only: may run before the producers of x are done
  if (p.ahead > 0) gemv_decode_ahead<K>(w, Bs, p.ahead, D);  // so may their decode
  wait();  // x, the partials and the counters belong to the producers
  // Prologue (overlaps the first stages' loads): x_h for this block's k range, rows < m, and the zero row m.
  __shared__ float rnorm[kGemvMaxRows];
  if (p.norm_w) {  // every block reads its rows in full for the RMS (768 floats for q_b: L2 hits)
    if (warp < p.m) {
      const float* xr = p.x + int64_t(warp) * w.in;
      float ss = 0.0f;
      for (int k = lane; k < w.in; k += 32) ss += xr[k] * xr[k];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) rnorm[warp] = rsqrtf(ss / float(w.in) + p.norm_eps);
    }
    __syncthreads();
  }
  for (int t = warp; t < p.m * nck; t += kWarps) {
    const int r = t / nck, c = t - r * nck;
    xform_chunk_warp(As + r * p.a_pitch + c * kChunk, p.x + int64_t(r) * w.in, w.in, w.suh, (c0 + c) * kChunk,
                     p.norm_w, p.norm_w ? rnorm[r] : 1.0f);
  }
  zero_gemv_row(As, p.a_pitch, p.m, nck * kChunk);
  clocks::mark_point(clocks::kInputs);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  gemv_mainloop<K>(w, group, c0, nck, As, p.a_pitch, p.m, Bs, acc, D, p.ahead);  // its first barrier publishes As
  clocks::mark_point(clocks::kMath);
  // acc: columns warp·16 + lane/4 (+8) of rows 2(lane%4) and 2(lane%4) + 1
  const int g = lane >> 2, cq = lane & 3;
  if constexpr (kCluster) {
    return cluster_tail(p, w, y, group, z, acc, reinterpret_cast<float*>(Bs),
                        reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(D) + size_t(p.ahead) * kDecodedTileBytes),
                        &cluster_bar);
  } else {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = 2 * cq + h;
      if (r < p.m) {
        float* pr = p.partial + (int64_t(z) * p.m + r) * p.ldp + gcol + warp * 16 + g;
        pr[0] = acc[h];
        pr[8] = acc[2 + h];
      }
    }
    const bool last = arrive_last(p.counters + bx, p.splits, &flag);
    clocks::mark_point(clocks::kArrived);
    if (!last) return false;
    cp_wait<0>();  // the ring is free now: the sums' scratch
    float v[4];
    const int r = sum_partials_rows(v, p.partial + gcol + 4 * lane, p.ldp, p.m, p.splits, int64_t(p.m) * p.ldp,
                                    reinterpret_cast<float*>(Bs));
    if (r >= 0) {
      out_transform(v, w, group * kGroupCols);
      store_row4(y + int64_t(r) * w.out, group * kGroupCols + 4 * lane, w.out, v);
    }
    clocks::mark_point(clocks::kStored);
    return true;
  }
}

template <int K>
__global__ void __launch_bounds__(kThreads, 4) gemv_kernel(const LinearArgs p) {
  extern __shared__ __align__(16) unsigned char smem[];
  gemv_tile<K>(p, int(blockIdx.x), int(blockIdx.y), smem, [] {
    grid_launch_dependents();
    grid_wait();
  });
}
// The same GEMV with the split-k tail in a cluster of the group's splits (launched with cluster dims (1, splits)).
template <int K>
__global__ void __launch_bounds__(kThreads, 4) gemv_cluster_kernel(const LinearArgs p) {
  extern __shared__ __align__(16) unsigned char smem[];
  gemv_tile<K, true>(p, int(blockIdx.x), int(blockIdx.y), smem, [] {
    grid_launch_dependents();
    grid_wait();
  });
}

// ---- input transform for the GEMM: grid (m, ceil(chunks/8)), a warp per 128-chunk --------------------------------
__global__ void __launch_bounds__(kThreads) xform_kernel(const LinearArgs p);

// ---- GEMM: grid (out_padded/128, ceil(m/(16·MT)), splits), 256 threads; MT = 8 (1 block/SM) or 2 (2/SM) ----
template <int K, int MT>
__global__ void __launch_bounds__(kThreads, MT == kMT ? 1 : 2) gemm_kernel(const LinearArgs p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int flag;
  const DeviceTrellis& w = p.w;
  const int group = blockIdx.x, mc = blockIdx.y, z = blockIdx.z, chunks = w.in_padded / kChunk;
  const int c0 = z * chunks / p.splits, nck = (z + 1) * chunks / p.splits - c0;
  const int row0 = mc * MT * 16, rows = min(MT * 16, p.m - row0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc[MT][2][4];
  gemm_mainloop<K, MT>(w, p.xh + int64_t(row0) * w.in_padded, w.in_padded, rows, group, c0, nck, smem, acc);
  if (p.splits == 1) {
    float* Ys = reinterpret_cast<float*>(smem);
    store_acc_tile<MT>(acc, Ys, kYPitch, rows);
    __syncthreads();
    for (int r = warp; r < rows; r += kWarps) {
      const float4 t = *reinterpret_cast<const float4*>(Ys + r * kYPitch + 4 * lane);
      float v[4] = {t.x, t.y, t.z, t.w};
      out_transform(v, w, group * kGroupCols);
      store_row4(p.y + int64_t(row0 + r) * w.out, group * kGroupCols + 4 * lane, w.out, v);
    }
    return;
  }
  store_acc_tile<MT>(acc, p.partial + (int64_t(z) * p.m + row0) * w.out_padded + group * kGroupCols, w.out_padded, rows);
  if (!arrive_last(p.counters + mc * (w.out_padded / kGroupCols) + group, p.splits, &flag)) return;
  for (int r = warp; r < rows; r += kWarps) {
    float v[4];
    sum_partials(v, p.partial + int64_t(row0 + r) * w.out_padded + group * kGroupCols + 4 * lane, p.splits,
                 int64_t(p.m) * w.out_padded);
    out_transform(v, w, group * kGroupCols);
    store_row4(p.y + int64_t(row0 + r) * w.out, group * kGroupCols + 4 * lane, w.out, v);
  }
}

// ---- dequantize: grid (out_padded/128, in_padded/128), one 128×128 block per CTA --------------------------------
// Phase A: warp w decodes tile column w (8 tiles down k) into registers and runs the k-butterflies that are
//          lane-local (k bits 0, 3, 4, 5, 6), then stores S[n][k] (f32, pitch 136: conflict-free float2).
// Phase B: thread = 8 consecutive k × 8 consecutive n: k bits 1, 2; ·1/√128; n bits 0, 1, 2.
// Phase C: thread = 4 consecutive k × 16 n (n = nl + 8b): n bits 3..6; ·1/√128 ·suh ·svh; bf16; 8-byte stores.
// The column transform is exact in any order (Q values are multiples of 2^-13 below 4: 128-term sums fit
// fp32's 24 bits), and the row transform runs its stages in the reference's order, so every rounding is
// the reference's: the output equals trellis::dequantize_hf_bf16.
constexpr int kSPitch = kChunk + 8;
// Column swizzle of S: flip k bit 2 where k bit 5 is set. Phase B's quarter-warps (8 threads reading 16 B at
// a 32 B stride) then hit 8 distinct 4-bank groups; phases A and C see a warp-uniform flip (no conflicts).
__device__ __forceinline__ int sk(int k) { return k ^ (((k >> 5) & 1) << 2); }
template <int K>
constexpr size_t dequant_smem_bytes() {
  return size_t(kGroupCols) * kSPitch * 4 + 2 * chunk_words<K>() * 4;  // S + double-buffered codes
}

template <int K>
__device__ __forceinline__ void decode8f(const uint32_t* W, int lane, int cb, float f[8]) {
  uint32_t b[4];
  decode_frag<K>(W, lane, cb, b);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const __half2 h = *reinterpret_cast<const __half2*>(&b[i]);
    f[2 * i] = __low2float(h);
    f[2 * i + 1] = __high2float(h);
  }
}

__device__ __forceinline__ void bfly(float& a, float& b) {
  const float x = a, y = b;
  a = x + y;
  b = x - y;
}

// Persistent: grid = min(blocks, 2 per SM); each CTA walks 128×128 blocks b, b + gridDim.x, ... and
// prefetches the next block's codes (cp.async, second buffer) while it transforms the current one
// (v2, one block per CTA: 444-577 GElem/s, the load latency exposed between phases).
template <int K>
__global__ void __launch_bounds__(kThreads, 2) dequant_kernel(const DeviceTrellis w, __nv_bfloat16* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* S = reinterpret_cast<float*>(smem);
  uint32_t* Bbuf = reinterpret_cast<uint32_t*>(smem + size_t(kGroupCols) * kSPitch * 4);
  const int groups_n = w.out_padded / kGroupCols, nblocks = groups_n * (w.in_padded / kChunk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = threadIdx.x;
  int b = blockIdx.x;
  if (b < nblocks) load_b_chunk<K>(Bbuf, w.trellis, w.out_padded / 16, (b / groups_n) * 8, (b % groups_n) * 8);
  cp_commit();
  for (int it = 0; b < nblocks; b += gridDim.x, it++) {
  const int bj = b % groups_n, bi = b / groups_n;  // n group, k chunk
  const uint32_t* Bs = Bbuf + (it & 1) * chunk_words<K>();
  {
    const int nb = b + gridDim.x;
    if (nb < nblocks)
      load_b_chunk<K>(Bbuf + ((it + 1) & 1) * chunk_words<K>(), w.trellis, w.out_padded / 16, (nb / groups_n) * 8,
                      (nb % groups_n) * 8);
    cp_commit();
  }
  cp_wait<1>();
  __syncthreads();
  {  // Phase A
    float v[8][8];
#pragma unroll
    for (int tt = 0; tt < 8; tt++) decode8f<K>(Bs + (tt * 8 + warp) * 8 * K, lane, w.codebook, v[tt]);
#pragma unroll
    for (int tt = 0; tt < 8; tt++) {
      bfly(v[tt][0], v[tt][1]), bfly(v[tt][2], v[tt][3]), bfly(v[tt][4], v[tt][5]), bfly(v[tt][6], v[tt][7]);  // k bit 0
      bfly(v[tt][0], v[tt][2]), bfly(v[tt][1], v[tt][3]), bfly(v[tt][4], v[tt][6]), bfly(v[tt][5], v[tt][7]);  // k bit 3
    }
#pragma unroll
    for (int h = 1; h < 8; h <<= 1)  // k bits 4, 5, 6 (tile row bits)
#pragma unroll
      for (int tt = 0; tt < 8; tt++)
        if (!(tt & h))
#pragma unroll
          for (int j = 0; j < 8; j++) bfly(v[tt][j], v[tt + h][j]);
    const int n0 = warp * 16 + (lane >> 2), kb = 2 * (lane & 3);
#pragma unroll
    for (int tt = 0; tt < 8; tt++)
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        const int n = n0 + 8 * (j >> 2), k = tt * 16 + kb + 8 * ((j >> 1) & 1);
        *reinterpret_cast<float2*>(S + n * kSPitch + sk(k)) = make_float2(v[tt][j], v[tt][j + 1]);
      }
  }
  __syncthreads();
  {  // Phase B
    const int kg = tid & 15, ng = tid >> 4;
    float u[8][8];  // [n bits 0..2][k bits 0..2]
#pragma unroll
    for (int b = 0; b < 8; b++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const float4 t = *reinterpret_cast<const float4*>(S + (ng * 8 + b) * kSPitch + sk(kg * 8 + 4 * h));
        u[b][4 * h] = t.x, u[b][4 * h + 1] = t.y, u[b][4 * h + 2] = t.z, u[b][4 * h + 3] = t.w;
      }
#pragma unroll
    for (int b = 0; b < 8; b++) {
      bfly(u[b][0], u[b][2]), bfly(u[b][1], u[b][3]), bfly(u[b][4], u[b][6]), bfly(u[b][5], u[b][7]);  // k bit 1
      bfly(u[b][0], u[b][4]), bfly(u[b][1], u[b][5]), bfly(u[b][2], u[b][6]), bfly(u[b][3], u[b][7]);  // k bit 2
#pragma unroll
      for (int a = 0; a < 8; a++) u[b][a] = __fmul_rn(u[b][a], kHs);
    }
#pragma unroll
    for (int h = 1; h < 8; h <<= 1)  // n bits 0, 1, 2 in order
#pragma unroll
      for (int b = 0; b < 8; b++)
        if (!(b & h))
#pragma unroll
          for (int a = 0; a < 8; a++) bfly(u[b][a], u[b + h][a]);
#pragma unroll
    for (int b = 0; b < 8; b++)
#pragma unroll
      for (int h = 0; h < 2; h++)
        *reinterpret_cast<float4*>(S + (ng * 8 + b) * kSPitch + sk(kg * 8 + 4 * h)) =
            make_float4(u[b][4 * h], u[b][4 * h + 1], u[b][4 * h + 2], u[b][4 * h + 3]);
  }
  __syncthreads();
  {  // Phase C
    const int kq = tid & 31, nl = tid >> 5;
    float u[16][4];  // [n bits 3..6][k bits 0..1]
#pragma unroll
    for (int b = 0; b < 16; b++) {
      const float4 t = *reinterpret_cast<const float4*>(S + (nl + 8 * b) * kSPitch + sk(4 * kq));
      u[b][0] = t.x, u[b][1] = t.y, u[b][2] = t.z, u[b][3] = t.w;
    }
#pragma unroll
    for (int h = 1; h < 16; h <<= 1)  // n bits 3, 4, 5, 6 in order
#pragma unroll
      for (int b = 0; b < 16; b++)
        if (!(b & h))
#pragma unroll
          for (int a = 0; a < 4; a++) bfly(u[b][a], u[b + h][a]);
    const int k0 = bi * kChunk + 4 * kq;
    float su[4];
#pragma unroll
    for (int a = 0; a < 4; a++) su[a] = __half2float(__ushort_as_half(w.suh[k0 + a]));
    const bool vec = (w.in & 3) == 0 && k0 + 3 < w.in;
#pragma unroll
    for (int b = 0; b < 16; b++) {
      const int n = bj * kGroupCols + nl + 8 * b;
      if (n >= w.out) continue;
      const float sv = __half2float(__ushort_as_half(w.svh[n]));
      __nv_bfloat16 o[4];
#pragma unroll
      for (int a = 0; a < 4; a++) o[a] = __float2bfloat16_rn(__fmul_rn(__fmul_rn(__fmul_rn(u[b][a], kHs), su[a]), sv));
      __nv_bfloat16* dst = out + int64_t(n) * w.in + k0;
      if (vec) {
        uint2 pk;
        pk.x = uint32_t(__bfloat16_as_ushort(o[0])) | (uint32_t(__bfloat16_as_ushort(o[1])) << 16);
        pk.y = uint32_t(__bfloat16_as_ushort(o[2])) | (uint32_t(__bfloat16_as_ushort(o[3])) << 16);
        *reinterpret_cast<uint2*>(dst) = pk;
      } else {
#pragma unroll
        for (int a = 0; a < 4; a++)
          if (k0 + a < w.in) dst[a] = o[a];
      }
    }
  }
  __syncthreads();  // S and this code buffer are rewritten next iteration
  }
  cp_wait<0>();
}

// ---- host launchers, instantiated per K in trellis_k<K>.cu ------------------------------------------------------
template <int K>
void launch_gemv(const LinearArgs& a, size_t smem, cudaStream_t s, int cluster_max);
template <int K>
void launch_gemm(const LinearArgs& a, int mchunks, int mt, cudaStream_t s);
template <int K>
void launch_dequant(const DeviceTrellis& w, __nv_bfloat16* out, cudaStream_t s);

#define TRELLM_INSTANTIATE_LINEAR(K)                                                                          \
  template <>                                                                                                 \
  void launch_gemv<K>(const LinearArgs& a, size_t smem, cudaStream_t s, int cluster_max) {                     \
    static const bool once = [] {                                                                             \
      cudaFuncSetAttribute(gemv_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, 160 * 1024);           \
      cudaFuncSetAttribute(gemv_cluster_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, 160 * 1024);   \
      cudaFuncSetAttribute(gemv_cluster_kernel<K>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);         \
      (void)cudaGetLastError();                                                                               \
      return true;                                                                                            \
    }();                                                                                                      \
    (void)once;                                                                                               \
    const dim3 grid(a.ldp / kGroupCols, a.splits);                                                            \
    const size_t csmem = smem + (a.cluster_mode == 2 ? size_t(a.splits) * a.m * kClusterSlotBytes : 0);       \
    const void* ck = reinterpret_cast<const void*>(gemv_cluster_kernel<K>);                                   \
    if (a.cluster_mode != 0 && use_cluster(a.splits, cluster_max, ck, csmem, [&] {                           \
          return clusters_fit(ck, grid, dim3(kThreads), csmem, dim3(1, a.splits));                            \
        }))                                                                                                   \
      launch_clustered(gemv_cluster_kernel<K>, grid, dim3(kThreads), csmem, s, true, dim3(1, a.splits), a);  \
    else                                                                                                      \
      launch(gemv_kernel<K>, grid, dim3(kThreads), smem, s, true, a);                                         \
  }                                                                                                           \
  template <>                                                                                                 \
  void launch_gemm<K>(const LinearArgs& a, int mchunks, int mt, cudaStream_t s) {                             \
    static const bool once = [] {                                                                             \
      cudaFuncSetAttribute(gemm_kernel<K, kMT>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(gemm_smem_bytes<K, kMT>())); \
      cudaFuncSetAttribute(gemm_kernel<K, kMTSmall>, cudaFuncAttributeMaxDynamicSharedMemorySize,             \
                           int(gemm_smem_bytes<K, kMTSmall>()));                                              \
      return true;                                                                                            \
    }();                                                                                                      \
    (void)once;                                                                                               \
    const dim3 grid(a.w.out_padded / kGroupCols, mchunks, a.splits);                                          \
    /* no PDL on the GEMM path: at m = 32 it cost +27..35 % (5120-wide shapes, H200, same run) */            \
    if (mt == kMT) launch(gemm_kernel<K, kMT>, grid, dim3(kThreads), gemm_smem_bytes<K, kMT>(), s, false, a); \
    else launch(gemm_kernel<K, kMTSmall>, grid, dim3(kThreads), gemm_smem_bytes<K, kMTSmall>(), s, false, a); \
  }                                                                                                           \
  template <>                                                                                                 \
  void launch_dequant<K>(const DeviceTrellis& w, __nv_bfloat16* out, cudaStream_t s) {                        \
    static const bool once = [] {                                                                             \
      cudaFuncSetAttribute(dequant_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dequant_smem_bytes<K>())); \
      return true;                                                                                            \
    }();                                                                                                      \
    (void)once;                                                                                               \
    const int blocks = (w.out_padded / kGroupCols) * (w.in_padded / kChunk);                                 \
    dequant_kernel<K><<<std::min(blocks, 2 * sm_count()), kThreads, dequant_smem_bytes<K>(), s>>>(w, out);   \
  }

}  // namespace trellm::cuda::tk
