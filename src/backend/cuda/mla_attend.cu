// MLA attention core on tensor cores (v2), shared by decode and prefill: flash-decoding over the bf16 latent
// cache with (query, head) rows on the MMA M dimension, plus the split combine. See mla.h for the math.
//
// One CTA = 32 rows x one context split, 8 warps, 64 keys per tile, two cp.async stages (1 CTA/SM, 188 KB smem):
//   S  = Q·Kᵀ   32x64, K = 576: warp (mw, kq) owns m-tile mw and a quarter of the 576 dims (9 k-steps), keeps its
//               Q fragments in registers for the whole split (36 regs) and writes a partial S to smem;
//               this reads each K byte twice from smem per tile and never re-reads Q (a warp-per-key-slice layout
//               re-reads all of Q every tile: 304 KB vs 208 KB of smem traffic per tile).
//   softmax     8 threads per row sum the 4 partials, mask keys > pos[row], online max/sum (log2 domain), P bf16.
//   O += P·V    32x512: warp w owns columns [64w, 64w+64) for both m-tiles (64 f32 accumulators); V is the same
//               smem tile as K (c_kv columns), read with ldmatrix.trans.
// Splits: the grid is (groups, splits) from host sizes only; each CTA reads its group's positions from device
// memory, and splits past the last tile exit at once (what a decode graph captured at bound = capacity needs).
// Paged cache: key tile j is block table entry j of the group's sequence (a tile is one 64-row block), so a tile
// is one block id read + 72 contiguous KB; the next tile's block id is loaded one tile ahead. Rows of a group
// share one sequence: 32 (query, head) rows of one run (Grouping::Run) or the heads of one query row (PerRow,
// 20 of 32 M rows used at GLM: decode rows of different sequences each read only their own keys).
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/mla.h"
#include "backend/cuda/mla_attend.cuh"
#include "backend/cuda/mla_common.cuh"

namespace trellm::cuda::mla {

namespace {

using bf16 = __nv_bfloat16;
using namespace dev;

constexpr int kThreads = 256;
constexpr int kStride = kWidth + 8;           // 584 bf16 = 1168 B per smem row: 8 consecutive rows hit distinct
                                              // 16-byte bank groups (1168/4 mod 32 = 4), so ldmatrix is conflict-free
constexpr int kSpStride = kKeysPerTile + 8;   // 72 f32: partial-S rows (64-bit stores conflict-free per half-warp)
constexpr int kPStride = kKeysPerTile + 8;    // 72 bf16 = 144 B: P rows, conflict-free ldmatrix
constexpr int kKSteps = kWidth / 16 / 4;      // 9 k-steps of 16 dims per warp quarter
static_assert(kKSteps * 16 * 4 == kWidth);

constexpr size_t kOffKv = 0;
constexpr size_t kKvBytes = size_t(2) * kKeysPerTile * kStride * 2;                    // 149,504
constexpr size_t kOffQ = kOffKv + kKvBytes;                                            // Q, then partial S
constexpr size_t kQBytes = std::max(size_t(kRowsPerCta) * kStride * 2, size_t(4) * kRowsPerCta * kSpStride * 4);
constexpr size_t kOffP = kOffQ + kQBytes;
constexpr size_t kOffStat = kOffP + size_t(kRowsPerCta) * kPStride * 2;
constexpr size_t kSmem = kOffStat + 3 * kRowsPerCta * 4 + 8 * 4;                       // 191,904
static_assert(kSmem <= 227 * 1024, "attention smem over the sm_90 per-block limit");

__global__ void __launch_bounds__(kThreads, 1) attend_kernel(const AttendParams P) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* kv = reinterpret_cast<bf16*>(smem + kOffKv);
  bf16* qs = reinterpret_cast<bf16*>(smem + kOffQ);
  float* sp = reinterpret_cast<float*>(smem + kOffQ);  // reuses Q's space once Q sits in registers
  bf16* ps = reinterpret_cast<bf16*>(smem + kOffP);
  float* alpha_s = reinterpret_cast<float*>(smem + kOffStat);
  float* fin_m = alpha_s + kRowsPerCta;
  float* fin_l = fin_m + kRowsPerCta;
  int* tmax_s = reinterpret_cast<int*>(fin_l + kRowsPerCta);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = P.reverse ? P.groups - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int split = blockIdx.y;
  const int row0 = group * P.group_rows;
  const int nrows = min(P.group_rows, P.rows - row0);  // M rows [nrows, 32) are padding (zero Q, not stored)

  grid_wait();  // q_lat (and the cache rows of this step) come from the preceding kernels
  grid_launch_dependents();

  // Softmax role: 8 threads per row, each owning 8 consecutive keys of the tile.
  const int sr = tid >> 3, sc = tid & 7;
  const int prow = sr < nrows ? __ldg(P.pos + (row0 + sr) / P.heads) : -1;  // -1: padding row
  int pm = prow;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) pm = max(pm, __shfl_xor_sync(0xffffffffu, pm, o));
  if (lane == 0) tmax_s[warp] = pm;
  __syncthreads();
  int T = tmax_s[0];
#pragma unroll
  for (int w = 1; w < 8; w++) T = max(T, tmax_s[w]);
  T += 1;  // >= 1: row0 < rows, and positions are >= 0
  const SplitRange sr_ = split_range(T, P.splits);
  const int tb = split * sr_.tps;
  if (tb >= sr_.ntiles) return;  // a split past the current context: nothing to do (uniform per CTA)
  const int te = min(sr_.ntiles, tb + sr_.tps);
  // The group's block table: entries [tb, te) all hold keys < T, i.e. blocks the sequence owns.
  const int32_t* table = P.pages.table(row0 / P.heads);

  // Q rows (zero for padding rows) and the first key tile, one cp.async group.
  for (int c = tid; c < kRowsPerCta * (kWidth / 8); c += kThreads) {
    const int r = c / (kWidth / 8), ch = c % (kWidth / 8);
    const bool ok = r < nrows;
    cp_async16(smem_u32(qs + r * kStride + ch * 8), P.qb + size_t(ok ? row0 + r : 0) * kWidth + ch * 8, ok);
  }
  // Tile j = pool block `blk`: keys j*64 + r at pool rows blk*64 + r; keys >= T are zero-filled, never read.
  auto load_tile = [&](int j, int blk, int st) {
    bf16* dst = kv + st * kKeysPerTile * kStride;
    const bf16* src = P.cache + size_t(blk) * kKeysPerTile * kWidth;
    for (int c = tid; c < kKeysPerTile * (kWidth / 8); c += kThreads) {
      const int r = c / (kWidth / 8), ch = c % (kWidth / 8);
      const bool ok = j * kKeysPerTile + r < T;
      cp_async16(smem_u32(dst + r * kStride + ch * 8), src + size_t(ok ? r : 0) * kWidth + ch * 8, ok);
    }
  };
  load_tile(tb, __ldg(table + tb), 0);
  int blk_next = tb + 1 < te ? __ldg(table + tb + 1) : 0;  // one tile ahead: its latency hides behind a tile
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int g = lane >> 2, t4 = lane & 3;
  const int mw = warp >> 2, kq = warp & 3;
  uint32_t qf[kKSteps][4];
  {
    const int row = 16 * mw + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int ks = 0; ks < kKSteps; ks++)
      ldsm_x4(qf[ks], smem_u32(qs + row * kStride + (kq * kKSteps + ks) * 16 + 8 * (lane >> 4)));
  }

  float oacc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; mt++)
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) oacc[mt][nt][e] = 0.0f;
  float m_run = -1e30f, l_run = 0.0f;  // finite start: a fully masked tile gives alpha = 1, p = 0, never NaN

  for (int j = tb; j < te; j++) {
    const int st = (j - tb) & 1;
    if (j + 1 < te) {
      load_tile(j + 1, blk_next, st ^ 1);  // that stage was last read before the previous iteration's final barrier
      cp_async_commit();
      if (j + 2 < te) blk_next = __ldg(table + j + 2);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* kst = kv + st * kKeysPerTile * kStride;

    // ---- partial S over this warp's 144 dims ----
    float sacc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) sacc[nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ks++) {
      const int k0 = (kq * kKSteps + ks) * 16 + 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int np = 0; np < 4; np++) {
        uint32_t b[4];
        ldsm_x4(b, smem_u32(kst + (16 * np + (lane & 7) + 8 * (lane >> 4)) * kStride + k0));
        mma_bf16(sacc[2 * np], qf[ks], b[0], b[1]);
        mma_bf16(sacc[2 * np + 1], qf[ks], b[2], b[3]);
      }
    }
    {
      float* spw = sp + (kq * kRowsPerCta + 16 * mw) * kSpStride;
#pragma unroll
      for (int nt = 0; nt < 8; nt++) {
        const int col = 8 * nt + 2 * t4;
        *reinterpret_cast<float2*>(spw + g * kSpStride + col) = make_float2(sacc[nt][0], sacc[nt][1]);
        *reinterpret_cast<float2*>(spw + (g + 8) * kSpStride + col) = make_float2(sacc[nt][2], sacc[nt][3]);
      }
    }
    __syncthreads();

    // ---- online softmax, one row per 8 threads ----
    {
      float al;
      const uint4 pk = softmax_step(sp + sr * kSpStride + 8 * sc, kRowsPerCta * kSpStride, j * kKeysPerTile + 8 * sc, prow, P.scale_log2,
                                    m_run, l_run, al);
      *reinterpret_cast<uint4*>(ps + sr * kPStride + 8 * sc) = pk;
      if (sc == 0) alpha_s[sr] = al;
    }
    __syncthreads();

    // ---- O = O * alpha + P · V ----
    {
      const float a00 = alpha_s[g], a01 = alpha_s[g + 8], a10 = alpha_s[16 + g], a11 = alpha_s[24 + g];
#pragma unroll
      for (int nt = 0; nt < 8; nt++) {
        oacc[0][nt][0] *= a00, oacc[0][nt][1] *= a00, oacc[0][nt][2] *= a01, oacc[0][nt][3] *= a01;
        oacc[1][nt][0] *= a10, oacc[1][nt][1] *= a10, oacc[1][nt][2] *= a11, oacc[1][nt][3] *= a11;
      }
#pragma unroll
      for (int ks = 0; ks < kKeysPerTile / 16; ks++) {
        uint32_t pa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
          ldsm_x4(pa[mt], smem_u32(ps + (16 * mt + (lane & 7) + 8 * ((lane >> 3) & 1)) * kPStride + 16 * ks + 8 * (lane >> 4)));
#pragma unroll
        for (int np = 0; np < 4; np++) {
          uint32_t b[4];
          ldsm_x4_t(b, smem_u32(kst + (16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 64 * warp + 16 * np +
                                8 * (lane >> 4)));
#pragma unroll
          for (int mt = 0; mt < 2; mt++) {
            mma_bf16(oacc[mt][2 * np], pa[mt], b[0], b[1]);
            mma_bf16(oacc[mt][2 * np + 1], pa[mt], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration refills this stage and rewrites S/P
  }

  if (sc == 0) {
    fin_m[sr] = m_run;
    fin_l[sr] = l_run;
  }
  __syncthreads();

  if (P.splits == 1) {
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        const int r = 16 * mt + g + 8 * hf, grow = row0 + r;
        if (r >= nrows) continue;
        const float inv = 1.0f / fin_l[r];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
          const int col = 64 * warp + 8 * nt + 2 * t4;
          const float v0 = oacc[mt][nt][2 * hf] * inv, v1 = oacc[mt][nt][2 * hf + 1] * inv;
          if (P.out_f32) *reinterpret_cast<float2*>(P.out_f32 + size_t(grow) * kRank + col) = make_float2(v0, v1);
          else *reinterpret_cast<uint32_t*>(P.out_bf16 + size_t(grow) * kRank + col) = pack_bf16(v0, v1);
        }
      }
  } else {
    const size_t base = (size_t(group) * P.splits + split) * kRowsPerCta;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        const int r = 16 * mt + g + 8 * hf;
        if (r >= nrows) continue;
        bf16* dst = P.part_o + (base + r) * kRank;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
          const int col = 64 * warp + 8 * nt + 2 * t4;
          *reinterpret_cast<uint32_t*>(dst + col) = pack_bf16(oacc[mt][nt][2 * hf], oacc[mt][nt][2 * hf + 1]);
        }
      }
    if (tid < kRowsPerCta)
      *reinterpret_cast<float2*>(P.part_ml + (base + tid) * 2) = make_float2(fin_m[tid], fin_l[tid]);
  }
}

// o_lat[row] = Σ_s 2^(m_s - M) O_s / Σ_s 2^(m_s - M) l_s over the splits that hold data (O_s in bf16: at 8K,
// 128 one-tile splits wrote 40 KB of f32 partials each against 74 KB of cache read).
// grid (rows, 512/64), 128 threads: 16 column quads x 8 split lanes.
struct CombineParams {
  const bf16* part_o;
  const float* part_ml;
  const int32_t* pos;
  int rows, heads, group_rows, splits;
  float* out_f32;
  bf16* out_bf16;
};

__global__ void __launch_bounds__(128) combine_kernel(const CombineParams C) {
  __shared__ float w_s[kMaxSplits];
  __shared__ __align__(16) float red[8][64];
  __shared__ float red4[4];
  __shared__ int t_s;
  const int tid = threadIdx.x;
  const int row = blockIdx.x, group = row / C.group_rows, r = row % C.group_rows;  // the attention's grouping
  grid_wait();
  grid_launch_dependents();
  const int active = split_range(group_context(C.pos, group, C.group_rows, C.rows, C.heads, &t_s), C.splits).active;
  const float* ml = C.part_ml + (size_t(group) * C.splits * kRowsPerCta + r) * 2;  // split s at + s * 64
  const float L = split_weights<128>(ml, active, w_s, red4);

  const int cq = tid & 15, sg = tid >> 4, col = blockIdx.y * 64 + 4 * cq;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = sg; s < active; s += 8) {
    const float w = w_s[s];
    const uint2 v = *reinterpret_cast<const uint2*>(C.part_o + ((size_t(group) * C.splits + s) * kRowsPerCta + r) * kRank + col);
    acc.x += w * bf_lo(v.x), acc.y += w * bf_hi(v.x), acc.z += w * bf_lo(v.y), acc.w += w * bf_hi(v.y);
  }
  *reinterpret_cast<float4*>(&red[sg][4 * cq]) = acc;
  __syncthreads();
  if (tid < 64) {
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) v += red[k][tid];
    v /= L;
    const size_t o = size_t(row) * kRank + blockIdx.y * 64 + tid;
    if (C.out_f32) C.out_f32[o] = v;
    else C.out_bf16[o] = __float2bfloat16_rn(v);
  }
}

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

}  // namespace

Plan make_plan(int n, int heads, int nope, int v, int bound, int num_sms, Grouping grouping, bool allow_expanded,
               std::optional<bool> force_expanded) {
  TRELLM_ASSERT(n >= 1 && heads >= 1 && bound >= 1 && num_sms >= 1, "mla plan: n ", n, " heads ", heads, " bound ", bound);
  TRELLM_ASSERT(grouping == Grouping::Run || heads <= kRowsPerCta, "mla plan: per-row groups take <= 32 heads, not ", heads);
  Plan p;
  p.n = n;
  p.heads = heads;
  p.rows = n * heads;
  p.bound = bound;
  p.grouping = grouping;
  p.group_rows = grouping == Grouping::PerRow ? heads : kRowsPerCta;
  p.groups = (p.rows + p.group_rows - 1) / p.group_rows;
  const int tiles = (bound + kKeysPerTile - 1) / kKeysPerTile;
  // At most one CTA per SM in total (one fits per SM; 10 groups x 14 splits = 140 CTAs for n = 16 ran as two
  // waves: 251 us at 32K): n = 1 gets up to 132 splits (at 32K: 4 tiles = 256 keys each), n = 16 gets 13 (8 per
  // row), 64 decode rows of different sequences 2, big prefills one split per group and no combine.
  p.splits = std::clamp(num_sms / p.groups, 1, std::min(tiles, kMaxSplits));
  p.prefill = n > kDecodeMaxRows;
  static const bool v2 = [] {
    const char* e = std::getenv("TRELLM_MLA_DECODE");
    return e && std::strcmp(e, "v2") == 0;
  }();
  p.keys_on_m = !v2 && p.groups == 1 && (!p.prefill || grouping == Grouping::PerRow);
  if (allow_expanded && grouping == Grouping::Run && p.prefill && nope + kRope == kXDim && v == kXDim && nope % 8 == 0 && bound <= kXMaxKeys) {
    // MACs per head (see mla.h): expansion bound * (nope + v) * 512 against n * (absorbed extra per visible key
    // * (bound - n/2) keys on average + the two projections).
    const double expand = double(bound) * (nope + v) * kRank;
    const double saved = double(n) * ((kWidth + kRank - (nope + kRope + v)) * std::max(1.0, bound - n / 2.0) + (nope + v) * double(kRank));
    p.expanded = expand < saved;
    // CudaOptions::mla_prefill (--mla-prefill) overrides the choice for A/B measurements.
    if (force_expanded) p.expanded = *force_expanded;
  }
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += align256(bytes);
    return at;
  };
  if (p.expanded) {
    p.kvx = take(size_t(bound) * heads * (nope + v) * 2);
    p.seq_rows = take(size_t(bound) * kWidth * 2);
    p.bytes = off;
    return p;
  }
  p.qb = take(size_t(p.rows) * kWidth * 2);
  p.q16 = take(p.prefill ? size_t(p.rows) * (nope + kRope) * 2 : 0);
  p.olat = take(size_t(p.rows) * kRank * (p.prefill ? 2 : 4));
  p.part_o = take(p.splits > 1 ? size_t(p.groups) * p.splits * kRowsPerCta * kRank * 2 : 0);
  p.part_ml = take(p.splits > 1 ? size_t(p.groups) * p.splits * kRowsPerCta * 2 * 4 : 0);
  p.bytes = off;
  return p;
}

void attend(const Args& a, const Plan& p, cudaStream_t s) {
  static std::atomic<uint32_t> smem_set{0};
  opt_in_smem(attend_kernel, kSmem, smem_set);
  char* w = static_cast<char*>(a.work);
  AttendParams P;
  P.qb = reinterpret_cast<const bf16*>(w + p.qb);
  P.cache = reinterpret_cast<const bf16*>(a.cache);
  P.pos = a.pos;
  P.pages = a.pages;
  P.rows = p.rows;
  P.heads = p.heads;
  P.group_rows = p.group_rows;
  P.groups = p.groups;
  P.splits = p.splits;
  P.scale_log2 = a.scale * kLog2e;
  P.reverse = p.prefill && p.grouping == Grouping::Run ? 1 : 0;  // causal rows: the latest groups are the longest
  P.part_o = reinterpret_cast<bf16*>(w + p.part_o);
  P.part_ml = reinterpret_cast<float*>(w + p.part_ml);
  P.out_f32 = p.prefill ? nullptr : reinterpret_cast<float*>(w + p.olat);
  P.out_bf16 = p.prefill ? reinterpret_cast<bf16*>(w + p.olat) : nullptr;
  const bool pdl = !p.prefill;
  // With several groups (batched rows, speculative rows) this kernel is faster than the keys-on-M one (H100,
  // bench_attention: 16 rows of one sequence 44.8 vs 69.7 us at 1K; 16 batched rows 46.4 vs 68.3 us). Why is not
  // profiled yet: both hold one CTA per SM, and with several groups a CTA runs fewer tiles, over which the decode
  // kernel's fixed start (Q^T into registers, barriers, the first bulk copy) is spread.
  if (p.keys_on_m) launch_attend_decode(P, s, pdl);
  else launch(attend_kernel, dim3(p.groups, p.splits), dim3(kThreads), kSmem, s, pdl, P);
  // Decode with keys on M merges the splits in its output projection (mla_decode.cu).
  if (p.splits > 1 && !(p.keys_on_m && !p.prefill)) {
    CombineParams C{P.part_o, P.part_ml, a.pos, p.rows, p.heads, p.group_rows, p.splits, P.out_f32, P.out_bf16};
    launch(combine_kernel, dim3(p.rows, kRank / 64), dim3(128), 0, s, pdl, C);
  }
}

}  // namespace trellm::cuda::mla
