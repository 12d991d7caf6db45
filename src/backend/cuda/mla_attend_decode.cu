// MLA attention for decode rows (v3): flash-decoding over the bf16 latent cache with the keys on the MMA M
// dimension and the (query, head) rows on N, bulk copies completing on mbarriers, and the split's tiles asked
// into L2 before the kernel waits on its predecessor. See mla.h for the math.
//
// Why not the prefill kernel's layout (mla_attend.cu, 32 rows on M): at 32K it is issue-bound, not
// bandwidth-bound (ncu on the H100: DRAM 46 %, ~900 instructions per warp per 64-key tile of which 136 are
// MMAs; docs/kernels.md). Here, per warp and tile:
//   - loads: one warp issues a 1,152-byte bulk copy per key row (2 per lane) instead of 18 cp.async with
//     address arithmetic per thread; keys past T are not copied but zeroed in shared memory (last tile only);
//   - S^T = K·Q^T, 64 x 8·NT, K = 576: a decode group of 20 heads pads to 24 columns (NT = 3 n8 tiles), not
//     to 32 rows; warp (mp, kq) owns keys [32mp, 32mp + 32) and a quarter of the 576 dims, its Q^T fragments
//     in registers for the whole split (9 k-steps x NT x 2); 18 ldmatrix + 18·NT MMAs;
//   - O^T += V^T·P^T, 512 x 8·NT: warp w owns value dims [64w, 64w + 64) for every column, V^T read from the
//     key tile with ldmatrix.trans; 16 + 2·NT ldmatrix + 16·NT MMAs; the rescale is 16·NT multiplies;
// i.e. 102 MMAs and ~330 instructions per warp and tile at NT = 3.
// Each CTA's first l2_ahead (1) tiles are bulk-prefetched into L2 before griddepcontrol.wait, so its first HBM
// read overlaps the q_lat kernel; the rest l2_ahead tiles ahead of use (more ahead was slower, see launch_nt).
// The split partials and the combine are the prefill kernel's (same layout, combine_kernel in mla_attend.cu).
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>

#include "backend/cuda/mla_attend.cuh"
#include "backend/cuda/mla_common.cuh"

namespace trellm::cuda::mla {

namespace {

using bf16 = __nv_bfloat16;
using namespace dev;

constexpr int kThreads = 256;
constexpr int kStride = kWidth + 8;          // 584 bf16 = 1,168 B per key row: ldmatrix rows hit distinct bank groups
constexpr int kSpStride = kKeysPerTile + 4;  // 68 f32 per partial-S^T column: the fragment stores are conflict-free
constexpr int kPStride = kKeysPerTile + 8;   // 72 bf16 per P column (144 B): conflict-free ldmatrix
constexpr int kOsStride = kRank + 4;         // 516 f32 per output column in the epilogue
constexpr int kKSteps = kWidth / 16 / 4;     // 9 k-steps of 16 dims per warp quarter
constexpr uint32_t kRowBytes = kWidth * 2;   // 1,152 B: one cache row, one bulk copy
static_assert(kKSteps * 16 * 4 == kWidth && kRowBytes % 16 == 0 && (kStride * 2) % 16 == 0);

constexpr size_t kStageBytes = size_t(kKeysPerTile) * kStride * 2;  // 74,752
constexpr size_t kOffKv = 0;                                        // two stages; the epilogue's O^T after the loop
constexpr size_t kOffU = kOffKv + 2 * kStageBytes;                  // Q staging, then the partial S^T
constexpr size_t kUBytes = std::max(size_t(kRowsPerCta) * kStride * 2, size_t(4) * kRowsPerCta * kSpStride * 4);
constexpr size_t kOffP = kOffU + kUBytes;
constexpr size_t kOffStat = kOffP + size_t(kRowsPerCta) * kPStride * 2;
constexpr size_t kOffBar = kOffStat + 3 * kRowsPerCta * 4 + 8 * 4;
constexpr size_t kSmem = kOffBar + 2 * 8;  // 191,920
static_assert(kOffBar % 8 == 0 && size_t(kRowsPerCta) * kOsStride * 4 <= 2 * kStageBytes);
static_assert(kSmem <= 227 * 1024, "decode attention smem over the sm_90 per-block limit");

// Probes for bench_attention's bound split (TRELLM_MLA_PROBE, never in a model's step; the output is then
// garbage): kLoadsOnly keeps the copies, the waits and one barrier a tile and drops the math; kMathOnly keeps
// the math on whatever the stages hold and drops the copies and the waits.
enum Probe { kFull = 0, kLoadsOnly = 1, kMathOnly = 2 };

// NT: n8 column tiles, 8·NT >= the group's rows (<= 32).
template <int NT, int PROBE = kFull>
__global__ void __launch_bounds__(kThreads, 1) attend_decode_kernel(const AttendParams P) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* kv = reinterpret_cast<bf16*>(smem + kOffKv);
  bf16* qs = reinterpret_cast<bf16*>(smem + kOffU);
  float* sp = reinterpret_cast<float*>(smem + kOffU);  // reuses Q's space once Q sits in registers
  bf16* ps = reinterpret_cast<bf16*>(smem + kOffP);
  float* alpha_s = reinterpret_cast<float*>(smem + kOffStat);
  float* fin_m = alpha_s + kRowsPerCta;
  float* fin_l = fin_m + kRowsPerCta;
  int* tmax_s = reinterpret_cast<int*>(fin_l + kRowsPerCta);
  const uint32_t bar0 = smem_u32(smem + kOffBar);  // stage st's barrier at bar0 + 8 st
  float* os = reinterpret_cast<float*>(smem + kOffKv);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = blockIdx.x, split = blockIdx.y;
  const int row0 = group * P.group_rows;
  const int nrows = min(P.group_rows, P.rows - row0);  // columns [nrows, 8·NT) are padding (zero Q, not stored)

  // Before the wait: positions and block tables are written by host copies or by kernels ahead of q_lat (the
  // predecessor, which triggers its dependents only after its own wait, so everything before it is complete);
  // only q_lat's outputs (Qb and this step's cache rows) are not visible yet.
  const int sr = tid >> 3, sc = tid & 7;  // softmax role: column sr, keys 8sc .. 8sc + 7
  const int prow = sr < nrows ? __ldg(P.pos + (row0 + sr) / P.heads) : -1;  // -1: padding column
  int pm = prow;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) pm = max(pm, __shfl_xor_sync(0xffffffffu, pm, o));
  if (lane == 0) tmax_s[warp] = pm;
  if (tid == 0) {
    mbar_init(bar0, 1);
    mbar_init(bar0 + 8, 1);
    mbar_fence_init();
  }
  __syncthreads();
  int T = tmax_s[0];
#pragma unroll
  for (int w = 1; w < 8; w++) T = max(T, tmax_s[w]);
  T += 1;  // >= 1: row0 < rows, and positions are >= 0
  const SplitRange sr_ = split_range(T, P.splits);
  const int tb = split * sr_.tps;
  if (tb >= sr_.ntiles) return;  // a split past the current context (uniform per CTA)
  const int te = min(sr_.ntiles, tb + sr_.tps);
  const int32_t* table = P.pages.table(row0 / P.heads);
  const size_t kTileElems = size_t(kKeysPerTile) * kWidth;  // a 64-row pool block is 72 contiguous KB
  if (PROBE != kMathOnly && tid < P.l2_ahead && tb + tid < te) prefetch_l2(P.cache + size_t(__ldg(table + tb + tid)) * kTileElems, uint32_t(kTileElems * 2));

  grid_wait();  // q_lat (and the cache rows of this step) come from the preceding kernel
  grid_launch_dependents();

  // Tile j into stage st (warp 0): rows < T by bulk copy; the rest of a last tile zeroed, so that whatever the
  // stage held (initially any bit pattern, NaN included) never reaches an MMA. p = 0 there, and 0 · 0 = 0.
  auto issue = [&](int j, int blk, int st) {
    if (PROBE == kMathOnly) return;
    const int valid = min(kKeysPerTile, T - j * kKeysPerTile);
    bf16* dst = kv + st * kKeysPerTile * kStride;
    if (lane == 0) mbar_arrive_expect_tx(bar0 + 8 * st, uint32_t(valid) * kRowBytes);
    __syncwarp();
    const bf16* src = P.cache + size_t(blk) * kTileElems;
    for (int r = lane; r < valid; r += 32) bulk_g2s(smem_u32(dst + r * kStride), src + size_t(r) * kWidth, kRowBytes, bar0 + 8 * st);
  };
  auto zero_tail = [&](int j, int st) {  // all threads; visible to the consumers after the next __syncthreads
    const int valid = min(kKeysPerTile, T - j * kKeysPerTile);
    bf16* dst = kv + st * kKeysPerTile * kStride;
    for (int c = tid; c < (kKeysPerTile - valid) * (kWidth / 8); c += kThreads) {
      const int r = valid + c / (kWidth / 8), ch = c % (kWidth / 8);
      *reinterpret_cast<uint4*>(dst + r * kStride + ch * 8) = make_uint4(0, 0, 0, 0);
    }
  };

  // Q rows (zero for padding columns) by cp.async, the first tile by bulk copy.
  for (int c = tid; c < 8 * NT * (kWidth / 8); c += kThreads) {
    const int r = c / (kWidth / 8), ch = c % (kWidth / 8);
    const bool ok = r < nrows;
    cp_async16(smem_u32(qs + r * kStride + ch * 8), P.qb + size_t(ok ? row0 + r : 0) * kWidth + ch * 8, ok);
  }
  cp_async_commit();
  if (warp == 0) issue(tb, __ldg(table + tb), 0);
  zero_tail(tb, 0);
  int blk_next = tb + 1 < te ? __ldg(table + tb + 1) : 0;  // one tile ahead: its latency hides behind a tile
  cp_async_wait<0>();
  __syncthreads();

  const int g = lane >> 2, t4 = lane & 3;
  const int mp = warp >> 2, kq = warp & 3;
  // Q^T as the B operand (k = dim, n = column): ldmatrix of Q rows gives b0/b1 of a k-step directly.
  uint32_t qf[kKSteps][NT][2];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ks++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
      ldsm_x2(qf[ks][nt], smem_u32(qs + (8 * nt + (lane & 7)) * kStride + (kq * kKSteps + ks) * 16 + 8 * ((lane >> 3) & 1)));
  __syncthreads();  // Q's space becomes the partial S^T

  float oacc[4][NT][4];
#pragma unroll
  for (int mt = 0; mt < 4; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) oacc[mt][nt][e] = 0.0f;
  float m_run = -1e30f, l_run = 0.0f;  // finite start: a fully masked tile gives alpha = 1, p = 0, never NaN

  for (int j = tb; j < te; j++) {
    const int st = (j - tb) & 1;
    if (j + 1 < te) {  // the other stage was last read before the previous iteration's final barrier
      if (warp == 0) issue(j + 1, blk_next, st ^ 1);
      zero_tail(j + 1, st ^ 1);
      if (j + 2 < te) blk_next = __ldg(table + j + 2);
      if (PROBE != kMathOnly && tid == 32 && P.l2_ahead > 0 && j + P.l2_ahead < te) prefetch_l2(P.cache + size_t(__ldg(table + j + P.l2_ahead)) * kTileElems, uint32_t(kTileElems * 2));
    }
    if (PROBE != kMathOnly) mbar_wait(bar0 + 8 * st, ((j - tb) >> 1) & 1);
    const bf16* kst = kv + st * kKeysPerTile * kStride;
    if constexpr (PROBE == kLoadsOnly) {
      __syncthreads();  // the stage is free for the copy two tiles on
    } else {
      // ---- partial S^T over this warp's 32 keys and 144 dims ----
      float sacc[2][NT][4];
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
          for (int e = 0; e < 4; e++) sacc[mt][nt][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ks++) {
        const int k0 = (kq * kKSteps + ks) * 16 + 8 * (lane >> 4);
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          uint32_t a[4];
          ldsm_x4(a, smem_u32(kst + (32 * mp + 16 * mt + (lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + k0));
#pragma unroll
          for (int nt = 0; nt < NT; nt++) mma_bf16(sacc[mt][nt], a, qf[ks][nt][0], qf[ks][nt][1]);
        }
      }
      {
        float* spw = sp + kq * kRowsPerCta * kSpStride;
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
          for (int nt = 0; nt < NT; nt++) {
            const int key = 32 * mp + 16 * mt + g, col = 8 * nt + 2 * t4;
            spw[col * kSpStride + key] = sacc[mt][nt][0];
            spw[(col + 1) * kSpStride + key] = sacc[mt][nt][1];
            spw[col * kSpStride + key + 8] = sacc[mt][nt][2];
            spw[(col + 1) * kSpStride + key + 8] = sacc[mt][nt][3];
          }
      }
      __syncthreads();

      // ---- online softmax, one column per 8 threads ----
      if (sr < 8 * NT) {
        float al;
        const uint4 pk = softmax_step(sp + sr * kSpStride + 8 * sc, kRowsPerCta * kSpStride, j * kKeysPerTile + 8 * sc, prow, P.scale_log2,
                                      m_run, l_run, al);
        *reinterpret_cast<uint4*>(ps + sr * kPStride + 8 * sc) = pk;
        if (sc == 0) alpha_s[sr] = al;
      }
      __syncthreads();

      // ---- O^T = O^T * alpha + V^T · P^T ----
      {
        uint32_t pb[NT][4][2];  // P^T as the B operand: k-steps of 16 keys per column tile
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          const float a0 = alpha_s[8 * nt + 2 * t4], a1 = alpha_s[8 * nt + 2 * t4 + 1];
#pragma unroll
          for (int mt = 0; mt < 4; mt++) oacc[mt][nt][0] *= a0, oacc[mt][nt][1] *= a1, oacc[mt][nt][2] *= a0, oacc[mt][nt][3] *= a1;
#pragma unroll
          for (int kh = 0; kh < 2; kh++) {
            uint32_t r[4];
            ldsm_x4(r, smem_u32(ps + (8 * nt + (lane & 7)) * kPStride + 32 * kh + 8 * (lane >> 3)));
            pb[nt][2 * kh][0] = r[0], pb[nt][2 * kh][1] = r[1], pb[nt][2 * kh + 1][0] = r[2], pb[nt][2 * kh + 1][1] = r[3];
          }
        }
#pragma unroll
        for (int ks = 0; ks < kKeysPerTile / 16; ks++)
#pragma unroll
          for (int mt = 0; mt < 4; mt++) {
            uint32_t a[4];
            ldsm_x4_t(a, smem_u32(kst + (16 * ks + (lane & 7) + 8 * (lane >> 4)) * kStride + 64 * warp + 16 * mt + 8 * ((lane >> 3) & 1)));
#pragma unroll
            for (int nt = 0; nt < NT; nt++) mma_bf16(oacc[mt][nt], a, pb[nt][ks][0], pb[nt][ks][1]);
          }
      }
      __syncthreads();  // the next iteration refills this stage and rewrites S^T / P
    }
  }

  // ---- epilogue: O^T through shared memory (over the stages, all copies consumed) into rows ----
  if (sr < 8 * NT && sc == 0) {
    fin_m[sr] = m_run;
    fin_l[sr] = l_run;
  }
#pragma unroll
  for (int mt = 0; mt < 4; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      const int dim = 64 * warp + 16 * mt + g, col = 8 * nt + 2 * t4;
      os[col * kOsStride + dim] = oacc[mt][nt][0];
      os[(col + 1) * kOsStride + dim] = oacc[mt][nt][1];
      os[col * kOsStride + dim + 8] = oacc[mt][nt][2];
      os[(col + 1) * kOsStride + dim + 8] = oacc[mt][nt][3];
    }
  __syncthreads();
  const size_t base = (size_t(group) * P.splits + split) * kRowsPerCta;  // partials of this split (splits > 1)
  for (int c4 = tid; c4 < nrows * (kRank / 4); c4 += kThreads) {
    const int c = c4 / (kRank / 4), d = 4 * (c4 % (kRank / 4));
    float4 v = *reinterpret_cast<const float4*>(os + c * kOsStride + d);
    if (P.splits == 1) {
      const float inv = 1.0f / fin_l[c];
      v.x *= inv, v.y *= inv, v.z *= inv, v.w *= inv;
      const size_t o = size_t(row0 + c) * kRank + d;
      if (P.out_f32) *reinterpret_cast<float4*>(P.out_f32 + o) = v;
      else *reinterpret_cast<uint2*>(P.out_bf16 + o) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
    } else {
      *reinterpret_cast<uint2*>(P.part_o + (base + c) * kRank + d) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
    }
  }
  if (P.splits > 1 && tid < nrows) *reinterpret_cast<float2*>(P.part_ml + (base + tid) * 2) = make_float2(fin_m[tid], fin_l[tid]);
}

template <int NT, int PROBE>
void launch_probe(const AttendParams& P, cudaStream_t s, bool pdl) {
  static std::atomic<uint32_t> smem_set{0};
  opt_in_smem(attend_decode_kernel<NT, PROBE>, kSmem, smem_set);
  launch(attend_decode_kernel<NT, PROBE>, dim3(P.groups, P.splits), dim3(kThreads), kSmem, s, pdl, P);
}

template <int NT>
void launch_nt(AttendParams P, cudaStream_t s, bool pdl) {
  static const int probe = env_int("TRELLM_MLA_PROBE", kFull);
  // Tiles asked into L2 ahead: 1. With 4 (a 32K split's every tile at once, 38 MB) the tiles arrive together and
  // late: 36.7 against 31.9 µs a layer at 32K, 193.8 against 196.1 tok/s end to end (H100, attention.md).
  // TRELLM_MLA_AHEAD for A/B runs.
  static const int ahead = env_int("TRELLM_MLA_AHEAD", P.l2_ahead);
  P.l2_ahead = ahead;
  if (NT == 3 && probe == kLoadsOnly) return launch_probe<NT, kLoadsOnly>(P, s, pdl);
  if (NT == 3 && probe == kMathOnly) return launch_probe<NT, kMathOnly>(P, s, pdl);
  launch_probe<NT, kFull>(P, s, pdl);
}

}  // namespace

void launch_attend_decode(const AttendParams& P, cudaStream_t s, bool pdl) {
  const int cols = std::min(P.group_rows, P.rows);  // a single group of 20 heads takes 24 columns, not 32
  TRELLM_ASSERT(cols >= 1 && P.group_rows <= kRowsPerCta, "mla decode attention: groups of ", P.group_rows, " rows");
  switch ((cols + 7) / 8) {
    case 1: return launch_nt<1>(P, s, pdl);
    case 2: return launch_nt<2>(P, s, pdl);
    case 3: return launch_nt<3>(P, s, pdl);
    default: return launch_nt<4>(P, s, pdl);
  }
}

}  // namespace trellm::cuda::mla
