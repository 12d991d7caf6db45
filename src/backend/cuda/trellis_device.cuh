// Device building blocks shared by the trellis kernels (internal; included by .cu files only).
//
// Block shape used everywhere: 256 threads = 8 warps; a block owns one 128-column output group (8 tiles,
// one output-Hadamard block) and walks k in 128-row chunks (8 tiles, one input-Hadamard block). Warp w
// owns tile column tn = 8·group + w: per 16-row k step it decodes one tile (8 states per lane, the mma
// B-fragment pair of §1.2) and issues two mma.m16n8k16 per 16-row M tile.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "backend/cuda/trellis_kernels.h"
#include "core/error.h"
#include "quant/trellis_decode.h"

namespace trellm::cuda::tk {

using trellis::Codebook;

// Calls f(std::integral_constant<int, K>{}) for K = 2..8, on the host (picking a kernel instance) or on the device
// (the MoE kernels read K per expert). Anything else fails on the host and traps on the device; the descriptor
// checks reject it before a launch.
#pragma nv_exec_check_disable
template <class F>
__host__ __device__ __forceinline__ void with_k(int K, F&& f) {
  switch (K) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default:
#ifdef __CUDA_ARCH__
      __trap();
#else
      fail("trellis kernels: K = ", K, " not supported (2..8)");
#endif
  }
}

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroupCols = 128;  // output columns per block
constexpr int kChunk = 128;      // k rows per pipeline stage
constexpr float kHs = 0.08838834764831845f;  // 1/sqrt(128), the same float as trellis::kHadamardScale

// Words (uint32) of one staged chunk: 8 tile rows × 8 tiles × 8K words = 2 KiB · K.
template <int K>
constexpr int chunk_words() { return 8 * 8 * 8 * K; }

// ---- PTX wrappers -----------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// 16-byte async copy global -> shared; pred false zero-fills (src-size 0, nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---- split-k sums pushed into one block of a thread-block cluster (the GEMV's and gate/up's cluster tails) ----
// The splits of one output group run as one cluster; each st.asyncs its sums into the leader's shared memory,
// which completes that many bytes of the leader's mbarrier transaction count, and the leader waits for the count
// alone: no ticket in global memory, no cluster-scope fence (a release at cluster scope is a MEMBAR.GPU in SASS).
constexpr int kClusterSlotBytes = 128 * 4;  // one split's sums of one row of a 128-column group

__device__ __forceinline__ uint32_t cluster_addr(const void* p, unsigned rank) {  // shared::cluster address
  uint32_t a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_addr(p)), "r"(rank));
  return a;
}
// All threads of every block of the cluster, before anything is pushed: the leader's mbarrier expects tx bytes,
// and its initialisation is visible in the cluster when this returns.
__device__ __forceinline__ void cluster_push_begin(uint64_t* bar, bool leader, uint32_t tx) {
  if (leader && threadIdx.x == 0) {
    const uint32_t b = smem_addr(bar);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(b) : "memory");
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(b), "r"(tx) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
// Stores v at `at` (an address of this block's shared memory: the same offset in the leader, rank 0) in the leader,
// completing 4 bytes of its mbarrier `bar` (the same offset too).
__device__ __forceinline__ void cluster_push(const float* at, float v, const uint64_t* bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(cluster_addr(at, 0)),
               "r"(__float_as_uint(v)), "r"(cluster_addr(bar, 0)) : "memory");
}
// Sum of n slots' 4 columns 4·lane.. at `first`, `stride` floats apart, in slot order (as sum_partials: the same bits).
__device__ __forceinline__ void sum_slots(float v[4], const float* first, int n, int stride) {
  const int lane = threadIdx.x & 31;
  v[0] = v[1] = v[2] = v[3] = 0.0f;
  for (int i = 0; i < n; i++) {
    const float4 t = *reinterpret_cast<const float4*>(first + i * stride + 4 * lane);
    v[0] += t.x, v[1] += t.y, v[2] += t.z, v[3] += t.w;
  }
}
// The leader, after its own slots: returns once every pushed byte has landed (phase 0 of bar complete).
__device__ __forceinline__ void cluster_push_wait(const uint64_t* bar) {
  const uint32_t b = smem_addr(bar);
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(b) : "memory");
}

// D += A·B, m16n8k16, fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t a[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_addr(p)));
}

// ---- trellis decode into B fragments ------------------------------------------------------------------------

template <Codebook CB>
__device__ __forceinline__ void decode8(const uint32_t st[8], uint32_t b[4]) {
#pragma unroll
  for (int i = 0; i < 4; i++) b[i] = trellis::decode_pair<CB>(st[2 * i], st[2 * i + 1]);
}

// Lane `lane` of a warp decodes its 8 positions of the tile whose 8K words start at W (shared memory):
// b[0..1] = B fragment of columns 0..7 (k = 2c, 2c+1 | 2c+8, 2c+9), b[2..3] = columns 8..15.
// The codebook is a warp-uniform runtime branch (one per 8 states): 3 template instances per K avoided.
template <int K>
__device__ __forceinline__ void decode_frag(const uint32_t* W, int lane, int cb, uint32_t b[4]) {
  uint32_t st[8];
  trellis::lane_states(W, K, lane, st);
  if (cb == int(Codebook::Inst3)) decode8<Codebook::Inst3>(st, b);
  else if (cb == int(Codebook::Mcg)) decode8<Codebook::Mcg>(st, b);
  else decode8<Codebook::Mul1>(st, b);
}

// Stage one 128-row chunk of a 128-column group: tile rows tk0..tk0+7, tiles tn0..tn0+7 (each tile row's 8
// tiles are contiguous in the checkpoint: 8·32K bytes). dst gets [row][tile][8K words].
template <int K>
__device__ __forceinline__ void load_b_chunk(uint32_t* dst, const uint16_t* trellis, int tiles_n, int tk0, int tn0) {
  constexpr int kRow16 = 16 * K;  // 16-byte pieces per tile row (8 tiles × 32K bytes / 16)
  for (int i = threadIdx.x; i < 8 * kRow16; i += kThreads) {
    const int r = i / kRow16, o = i - r * kRow16;
    const uint16_t* src = trellis + (int64_t(tk0 + r) * tiles_n + tn0) * (16 * K) + o * 8;
    cp_async16(dst + r * (64 * K) + o * 4, src);
  }
}

// ---- 128-point Hadamard across a warp -----------------------------------------------------------------------
// Lane l holds elements 4l..4l+3. Stages in the reference's order (h = 1, 2, 4, ..., 64); at each stage the
// lower index gets a+b and the upper a-b, exactly like trellis::fwht128, so results are bit-identical.
__device__ __forceinline__ void fwht128_warp(float v[4]) {
  const int lane = threadIdx.x & 31;
  float a = v[0], b = v[1], c = v[2], d = v[3];
  v[0] = a + b, v[1] = a - b, v[2] = c + d, v[3] = c - d;  // h = 1
  a = v[0], b = v[1], c = v[2], d = v[3];
  v[0] = a + c, v[1] = b + d, v[2] = a - c, v[3] = b - d;  // h = 2
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {  // h = 4m: partner lane l ^ m
    const bool upper = lane & m;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float o = __shfl_xor_sync(0xffffffffu, v[i], m);
      v[i] = upper ? o - v[i] : v[i] + o;
    }
  }
}

// Four consecutive f32 of a row, k .. k+3, zero past `in`: one 16-byte load when they are in range and aligned
// (four scalar loads strided by 16 bytes across the warp cost four times the L1 requests).
__device__ __forceinline__ void load_row4(const float* row, int k, int in, float v[4]) {
  if (k + 3 < in && (reinterpret_cast<uintptr_t>(row + k) & 15) == 0) {
    const float4 q = *reinterpret_cast<const float4*>(row + k);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = k + i < in ? row[k + i] : 0.0f;
  }
}

// Input transform of one 128-chunk held by a warp (lane l: features k0 + 4l + i, values v = x, f32):
// dst[0..127] = fp16(FWHT(fp16(x ⊙ suh)) · 1/√128), bit-identical to trellis_matmul_ref's steps 1-2.
__device__ __forceinline__ void xform_regs_warp(float v[4], const uint16_t* suh, int k0, __half* dst) {
  const int lane = threadIdx.x & 31;
  const uint16_t* sp = suh + k0 + 4 * lane;
  uint16_t sv[4];
  if ((reinterpret_cast<uintptr_t>(sp) & 7) == 0) {
    const uint2 q = *reinterpret_cast<const uint2*>(sp);
    sv[0] = uint16_t(q.x), sv[1] = uint16_t(q.x >> 16), sv[2] = uint16_t(q.y), sv[3] = uint16_t(q.y >> 16);
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) sv[i] = sp[i];
  }
#pragma unroll
  for (int i = 0; i < 4; i++) v[i] = __half2float(__float2half_rn(__fmul_rn(v[i], __half2float(__ushort_as_half(sv[i])))));
  fwht128_warp(v);
  __half2 h01 = __halves2half2(__float2half_rn(__fmul_rn(v[0], kHs)), __float2half_rn(__fmul_rn(v[1], kHs)));
  __half2 h23 = __halves2half2(__float2half_rn(__fmul_rn(v[2], kHs)), __float2half_rn(__fmul_rn(v[3], kHs)));
  uint2 pk;
  pk.x = *reinterpret_cast<uint32_t*>(&h01);
  pk.y = *reinterpret_cast<uint32_t*>(&h23);
  *reinterpret_cast<uint2*>(dst + 4 * lane) = pk;
}

// Same from an f32 row in memory: x_row real-dim (features >= in read as zero). With norm_w, the row is first
// RMS-normalised as the rms_norm kernels do it: norm_w[k] · (x[k] · rnorm).
__device__ __forceinline__ void xform_chunk_warp(__half* dst, const float* x_row, int in, const uint16_t* suh, int k0,
                                                 const float* norm_w = nullptr, float rnorm = 1.0f) {
  const int lane = threadIdx.x & 31;
  float v[4];
  load_row4(x_row, k0 + 4 * lane, in, v);
  if (norm_w) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int k = k0 + 4 * lane + i;
      v[i] = k < in ? norm_w[k] * (v[i] * rnorm) : 0.0f;
    }
  }
  xform_regs_warp(v, suh, k0, dst);
}

// Output transform of one row's 128-column group held by a warp (v = y_h, lane l: columns col0 + 4l + i):
// v <- FWHT(v)·1/√128 ⊙ svh (+ bias). Returns the columns' values; the caller stores those < out.
__device__ __forceinline__ void out_transform(float v[4], const DeviceTrellis& w, int col0) {
  fwht128_warp(v);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int c = col0 + 4 * lane + i;
    v[i] = __fmul_rn(__fmul_rn(v[i], kHs), __half2float(__ushort_as_half(w.svh[c])));
    if (w.bias && c < w.out) v[i] += w.bias[c];
  }
}

// Stores 4 consecutive f32 (columns col..col+3) of a row, dropping columns >= n.
__device__ __forceinline__ void store_row4(float* row, int col, int n, const float v[4]) {
  if (col + 3 < n && ((reinterpret_cast<uintptr_t>(row + col) & 15) == 0)) {
    *reinterpret_cast<float4*>(row + col) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++)
      if (col + i < n) row[col + i] = v[i];
  }
}

// Split-k arrival: every block of a group calls this after writing its partials. Returns true in exactly
// one block (the last to arrive), which then reads all partials (with __ldcg: written by other SMs) and
// resets the counter, so the workspace is left as it was found (graph replays need no memset).
__device__ __forceinline__ bool arrive_last(int* counter, int arrivals, int* flag_smem) {
  // The block's partial stores come before thread 0's release through the barrier, and the last block's loads
  // come after thread 0's acquire through the second one: one acq_rel atomic instead of a full fence in every
  // thread on arrival and again in the last block (the step runner measured 0.73 us a hop for such fences,
  // bench/results/step_runner.md).
  __syncthreads();
  if (threadIdx.x == 0) {
    int t;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(t) : "l"(counter) : "memory");
    const bool last = t == arrivals - 1;
    if (last) atomicExch(counter, 0);  // zero at rest for the next launch (ordered by the kernel boundary)
    *flag_smem = last;
  }
  __syncthreads();
  return *flag_smem != 0;
}

__device__ __forceinline__ float4 ldcg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

// Sum of `splits` partial rows (stride `split_stride` floats) at column offset col, in split order
// (deterministic). Loads go out 8 at a time: a runtime-trip loop of load+add serialises one L2 round trip
// per split (v2: ~3 µs of the 6.7 µs GEMV at 2048x1536, 12 splits).
__device__ __forceinline__ void sum_partials(float v[4], const float* p, int splits, int64_t split_stride) {
  v[0] = v[1] = v[2] = v[3] = 0.0f;
  if (splits == 1) {  // the prefill GEMM's usual case: one load, not eight of the same
    const float4 q = ldcg4(p);
    v[0] += q.x, v[1] += q.y, v[2] += q.z, v[3] += q.w;
    return;
  }
  for (int z0 = 0; z0 < splits; z0 += 8) {
    float4 t[8];  // unpredicated (past the last split: it again, not added), so all 8 are in flight (SASS)
#pragma unroll
    for (int i = 0; i < 8; i++) t[i] = ldcg4(p + min(z0 + i, splits - 1) * split_stride);
#pragma unroll
    for (int i = 0; i < 8; i++)
      if (z0 + i < splits) v[0] += t[i].x, v[1] += t[i].y, v[2] += t[i].z, v[3] += t[i].w;
  }
}

// sum_partials for the m rows of a GEMV's last block, by all its warps: a row's splits are shared by W = 8, 4, 2
// or 1 warps (m = 1, 2, 3-4, 5-8), warp slice s taking splits s, s + W, ... with their loads out 8 at a time;
// then the W slices' sums are added in slice order (red: 8 x 128 floats of free shared memory). Deterministic.
// At m = 1 with at most 8 splits and at m >= 5 the sums are sum_partials' own, in the same order. The kernel
// clocks (H100, 2026-12-07) put 2.1 µs between a GEMV's last arrival and its stored output with one warp a row:
// at m = 1 the q_a/kv_a pair has 16 splits and o_proj 20, two and three dependent L2 round trips; with 8 warps
// it is one (1.4 µs). Returns the row whose sums warp `row * W` holds in v, -1 in the other warps.
__device__ __forceinline__ int sum_partials_rows(float v[4], const float* p, int64_t row_stride, int m, int splits,
                                                 int64_t split_stride, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int W = m == 1 ? 8 : m == 2 ? 4 : m <= 4 ? 2 : 1;
  const int r = warp / W, s = warp - r * W;
  float a[4] = {0.f, 0.f, 0.f, 0.f};
  if (r < m) {
    const float* pr = p + r * row_stride;
    for (int z0 = s; z0 < splits; z0 += 8 * W) {
      // Unpredicated loads (past the last split: the last one again, not added) so that all 8 are in flight at
      // once: predicated ones were issued one after another at 64 registers (SASS, nvdisasm).
      float4 t[8];
#pragma unroll
      for (int i = 0; i < 8; i++) t[i] = ldcg4(pr + min(z0 + i * W, splits - 1) * split_stride);
#pragma unroll
      for (int i = 0; i < 8; i++)
        if (z0 + i * W < splits) a[0] += t[i].x, a[1] += t[i].y, a[2] += t[i].z, a[3] += t[i].w;
    }
  }
  if (W == 1) {  // block-uniform (m is)
    v[0] = a[0], v[1] = a[1], v[2] = a[2], v[3] = a[3];
    return r < m ? r : -1;
  }
  *reinterpret_cast<float4*>(red + warp * 128 + 4 * lane) = make_float4(a[0], a[1], a[2], a[3]);
  __syncthreads();
  if (r >= m || s != 0) return -1;
  v[0] = v[1] = v[2] = v[3] = 0.0f;
  for (int j = 0; j < W; j++) {
    const float4 q = *reinterpret_cast<const float4*>(red + (warp + j) * 128 + 4 * lane);
    v[0] += q.x, v[1] += q.y, v[2] += q.z, v[3] += q.w;
  }
  return r;
}

// ---- main loops ---------------------------------------------------------------------------------------------

// GEMV loop (m <= 8 rows), operands swapped: D[n][token] += Wᵀ[n][k] · x_h[k][token], so the decoded tile is
// the mma's A operand (16 output columns × 16 k) and the activations its B operand (16 k × 8 tokens). The
// trellis walk order gives lane t exactly the A fragment's 8 positions (n = t/4 + {0, 8}, k = 2(t%4) +
// {0, 1, 8, 9}), so a tile costs one mma.m16n8k16 for up to 8 rows, with no zero A rows to build.
// (v3 had x as A: two mmas per tile, 15 of 16 A rows zero at m = 1, and 4 register moves per tile to
// rebuild the zero A quads: ncu measured 90 executed instructions per tile and 8.6 cycles per issue.)
// As: x_h of rows 0..m-1 and a zero row m (lanes of rows >= m all read it: a broadcast), `a_pitch` halves per
// row (a_pitch/2 ≡ 4 mod 32 words: the lanes' B loads hit distinct banks), chunk-relative columns from 0. The
// trellis words stream through a kStagesGemv-deep cp.async ring. acc: c0/c1 = column warp·16 + t/4 for rows
// 2(t%4), 2(t%4)+1; c2/c3 = column + 8.
// The codebook is a template parameter (the caller switches once per block, not once per tile).
constexpr int kStagesGemv = 4;

// D, ahead: the first `ahead` k tiles of chunk 0 were decoded before the wait (gemv_decode_ahead); their MMAs
// come first, in the same order, so the sums are the same bits.
template <int K, Codebook CB>
__device__ __forceinline__ void gemv_mainloop_cb(const DeviceTrellis& w, int group, int c0, int nck, const __half* As,
                                                 int a_pitch, int m, uint32_t* Bs, float acc[4], const uint4* D, int ahead) {
  constexpr int kCW = chunk_words<K>();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles_n = w.out_padded / 16;
  const uint32_t* Xrow = reinterpret_cast<const uint32_t*>(As + min(lane >> 2, m) * a_pitch) + (lane & 3);
  for (int c = 0; c < nck; c++) {
    cp_wait<kStagesGemv - 2>();
    __syncthreads();
    const int nxt = c + kStagesGemv - 1;
    if (nxt < nck) load_b_chunk<K>(Bs + (nxt % kStagesGemv) * kCW, w.trellis, tiles_n, (c0 + nxt) * 8, group * 8);
    cp_commit();
    const uint32_t* st = Bs + (c % kStagesGemv) * kCW + warp * 8 * K;
    const uint32_t* xc = Xrow + c * (kChunk / 2);
    if (c == 0 && ahead > 0) {  // once, warp-uniform; not unrolled (code size)
#pragma unroll 1
      for (int kk = 0; kk < 8; kk++) {
        uint32_t a[4];
        if (kk < ahead) {
          const uint4 f = D[(kk * kWarps + warp) * 32 + lane];
          a[0] = f.x, a[1] = f.y, a[2] = f.z, a[3] = f.w;
        } else {
          uint32_t s8[8], q[4];
          trellis::lane_states(st + kk * 64 * K, K, lane, s8);
          decode8<CB>(s8, q);
          a[0] = q[0], a[1] = q[2], a[2] = q[1], a[3] = q[3];
        }
        mma16816(acc, a, xc[kk * 8], xc[kk * 8 + 4]);
      }
      continue;
    }
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
      uint32_t s8[8], q[4];
      trellis::lane_states(st + kk * 64 * K, K, lane, s8);
      decode8<CB>(s8, q);  // q: (n, k) = (g, 2c..), (g, 2c+8..), (g+8, 2c..), (g+8, 2c+8..)
      const uint32_t a[4] = {q[0], q[2], q[1], q[3]};
      mma16816(acc, a, xc[kk * 8], xc[kk * 8 + 4]);
    }
  }
}

template <int K>
__device__ __forceinline__ void gemv_mainloop(const DeviceTrellis& w, int group, int c0, int nck, const __half* As,
                                              int a_pitch, int m, uint32_t* Bs, float acc[4], const uint4* D = nullptr,
                                              int ahead = 0) {
  if (w.codebook == int(Codebook::Mcg)) gemv_mainloop_cb<K, Codebook::Mcg>(w, group, c0, nck, As, a_pitch, m, Bs, acc, D, ahead);
  else if (w.codebook == int(Codebook::Inst3)) gemv_mainloop_cb<K, Codebook::Inst3>(w, group, c0, nck, As, a_pitch, m, Bs, acc, D, ahead);
  else gemv_mainloop_cb<K, Codebook::Mul1>(w, group, c0, nck, As, a_pitch, m, Bs, acc, D, ahead);
}

// ---- decode ahead: a GEMV tile's first k tiles decoded before its inputs exist ----------------------------------
// The weights do not depend on the step, so a tile may decode the first `ahead` (<= 8) 16-row k tiles of its
// first chunk while its producers still run (before the PDL or counter wait), into D: per k tile, warp and lane
// the mma A fragment the main loop would build (16 B, conflict-free), 4 KB a k tile. Each lane reads back only
// what it wrote, so D needs no barrier. Chunk 0 stays in its stage until the main loop's first iteration.
constexpr int kDecodedTileBytes = kWarps * 32 * 16;
constexpr int kMaxDecodeAhead = 8;

template <int K, Codebook CB>
__device__ __forceinline__ void gemv_decode_ahead_cb(const uint32_t* Bs, int ahead, uint4* D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  cp_wait<kStagesGemv - 2>();  // chunk 0: the first of the prologue's groups
  __syncthreads();             // every thread's part of it
  const uint32_t* st = Bs + warp * 8 * K;
#pragma unroll 1
  for (int kk = 0; kk < ahead; kk++) {
    uint32_t s8[8], q[4];
    trellis::lane_states(st + kk * 64 * K, K, lane, s8);
    decode8<CB>(s8, q);
    D[(kk * kWarps + warp) * 32 + lane] = make_uint4(q[0], q[2], q[1], q[3]);
  }
}

// After gemv_prefetch; all threads of the block.
template <int K>
__device__ __forceinline__ void gemv_decode_ahead(const DeviceTrellis& w, const uint32_t* Bs, int ahead, uint4* D) {
  if (w.codebook == int(Codebook::Mcg)) gemv_decode_ahead_cb<K, Codebook::Mcg>(Bs, ahead, D);
  else if (w.codebook == int(Codebook::Inst3)) gemv_decode_ahead_cb<K, Codebook::Inst3>(Bs, ahead, D);
  else gemv_decode_ahead_cb<K, Codebook::Mul1>(Bs, ahead, D);
}

// Zeroes row m of a GEMV A buffer (`halves` used, a multiple of 8): the row the loop above reads for rows >= m.
__device__ __forceinline__ void zero_gemv_row(__half* As, int a_pitch, int m, int halves) {
  for (int i = threadIdx.x; i < halves / 8; i += kThreads) reinterpret_cast<uint4*>(As + m * a_pitch)[i] = make_uint4(0, 0, 0, 0);
}

template <int K>
__device__ __forceinline__ void gemv_prefetch(const DeviceTrellis& w, int group, int c0, int nck, uint32_t* Bs) {
  constexpr int kCW = chunk_words<K>();
  for (int s = 0; s < kStagesGemv - 1; s++) {
    if (s < nck) load_b_chunk<K>(Bs + s * kCW, w.trellis, w.out_padded / 16, (c0 + s) * 8, group * 8);
    cp_commit();
  }
}

// 128-row M tile loop: A rows [0, rows) of the tile (fp16, `lda` halves per row, k from 0) stream through
// the same ring as B. 3 stages × (34 KB A + 2K KB B). Warps skip M sub-tiles past `rows`.
constexpr int kStagesGemm = 3;
constexpr int kMT = 8;                         // 16-row M sub-tiles per block (large m): 128 rows
constexpr int kMTSmall = 2;                    // m <= 32: 32 rows, ~2x the resident warps (decode-bound there)
constexpr int kAPitch = kChunk + 8;            // halves: rows 16 B apart mod 128 -> ldmatrix conflict-free
template <int MT>
constexpr int a_stage_halves() { return MT * 16 * kAPitch; }

template <int K, int MT = kMT, int STAGES = kStagesGemm>
constexpr size_t gemm_smem_bytes() {
  const size_t ring = size_t(STAGES) * (a_stage_halves<MT>() * 2 + chunk_words<K>() * 4);
  const size_t ytile = size_t(MT) * 16 * (kGroupCols + 4) * 4;  // the epilogue's f32 tile reuses the ring
  return ring > ytile ? ring : ytile;
}

template <int K, int MT>
__device__ __forceinline__ void gemm_load_stage(const DeviceTrellis& w, const __half* A, int64_t lda, int rows,
                                                int group, int chunk, __half* As, uint32_t* Bs) {
  load_b_chunk<K>(Bs, w.trellis, w.out_padded / 16, chunk * 8, group * 8);
  for (int i = threadIdx.x; i < MT * 16 * 16; i += kThreads) {  // MT·16 rows × 16 pieces of 16 B
    const int r = i >> 4, o = i & 15;
    const bool ok = r < rows;
    cp_async16(As + r * kAPitch + o * 8, A + (ok ? r : 0) * lda + chunk * kChunk + o * 8, ok);
  }
}

// The codebook is a template parameter (one switch per block, in gemm_mainloop below); UNROLL k-steps of the
// loop may be in flight per warp. Why: the grouped MoE GEMM is issue-bound on dependent ALU chains (ncu, 2K
// prompt: "wait" 2.6 and short-scoreboard 1.4 stall cycles per issue, 58 % issue-active, 123 instructions per
// k-step and warp of which 16 mma); UNROLL = 2 helps there at 32-512 tokens (trellis_moe_grouped.cu).
template <int K, Codebook CB, int MT, int STAGES, int UNROLL = 1>
__device__ __forceinline__ void gemm_mainloop_cb(const DeviceTrellis& w, const __half* A, int64_t lda, int rows, int group,
                                                 int c0, int nck, unsigned char* smem, float acc[MT][2][4]) {
  constexpr int kCW = chunk_words<K>();
  constexpr int kAStageHalves = a_stage_halves<MT>();
  __half* As = reinterpret_cast<__half*>(smem);
  uint32_t* Bs = reinterpret_cast<uint32_t*>(smem + size_t(STAGES) * kAStageHalves * 2);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int n = 0; n < 2; n++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[mt][n][i] = 0.0f;
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nck) gemm_load_stage<K, MT>(w, A, lda, rows, group, c0 + s, As + s * kAStageHalves, Bs + s * kCW);
    cp_commit();
  }
  const int mtiles = (rows + 15) >> 4;
  const int lrow = lane & 15, lcol = (lane >> 4) * 8;
  for (int c = 0; c < nck; c++) {
    cp_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = c + STAGES - 1;
    if (nxt < nck)
      gemm_load_stage<K, MT>(w, A, lda, rows, group, c0 + nxt, As + (nxt % STAGES) * kAStageHalves,
                         Bs + (nxt % STAGES) * kCW);
    cp_commit();
    const __half* as = As + (c % STAGES) * kAStageHalves;
    const uint32_t* st = Bs + (c % STAGES) * kCW + warp * 8 * K;
#pragma unroll UNROLL
    for (int kk = 0; kk < 8; kk++) {
      uint32_t s8[8], b[4];
      trellis::lane_states(st + kk * 64 * K, K, lane, s8);
      decode8<CB>(s8, b);
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        if (mt < mtiles) {
          uint32_t a[4];
          ldsm_x4(a, as + (mt * 16 + lrow) * kAPitch + kk * 16 + lcol);
          mma16816(acc[mt][0], a, b[0], b[1]);
          mma16816(acc[mt][1], a, b[2], b[3]);
        }
      }
    }
  }
  cp_wait<0>();
  __syncthreads();  // the ring may now be reused (epilogue staging)
}

template <int K, int MT, int STAGES = kStagesGemm>
__device__ __forceinline__ void gemm_mainloop(const DeviceTrellis& w, const __half* A, int64_t lda, int rows, int group,
                                              int c0, int nck, unsigned char* smem, float acc[MT][2][4]) {
  if (w.codebook == int(Codebook::Mcg)) gemm_mainloop_cb<K, Codebook::Mcg, MT, STAGES>(w, A, lda, rows, group, c0, nck, smem, acc);
  else if (w.codebook == int(Codebook::Inst3))
    gemm_mainloop_cb<K, Codebook::Inst3, MT, STAGES>(w, A, lda, rows, group, c0, nck, smem, acc);
  else gemm_mainloop_cb<K, Codebook::Mul1, MT, STAGES>(w, A, lda, rows, group, c0, nck, smem, acc);
}

// Writes a block's accumulators as an f32 [128 rows][128 cols] tile: to shared memory (pitch kYPitch) or to
// a global partial buffer (row stride ldp), rows >= rows dropped.
constexpr int kYPitch = kGroupCols + 4;

template <int MT>
__device__ __forceinline__ void store_acc_tile(const float acc[MT][2][4], float* dst, int64_t ld, int rows) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gr = lane >> 2, cq = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int n = 0; n < 2; n++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int r = mt * 16 + gr + 8 * h;
        if (r < rows)
          *reinterpret_cast<float2*>(dst + r * ld + warp * 16 + n * 8 + 2 * cq) =
              make_float2(acc[mt][n][2 * h], acc[mt][n][2 * h + 1]);
      }
}

}  // namespace trellm::cuda::tk
