// MLA prefill (n >= 17 query rows), causal, any bound. Two forms compute the same function; make_plan picks the
// one with fewer tensor-core FLOPs (mla.h, Plan::expanded):
//
// Expanded (GLM dims: nope + rope = v = 256), the usual choice for a prompt:
//   gather_sequence  the sequence's cache rows [0, bound) from their pool blocks into one contiguous bf16 buffer
//                    (1152 B per key: 2.4 MB at a 2K prompt, against 62 GFLOP of attention)
//   cuBLAS           KVx[t, h] = kv_b[h] · c_kv[t]   (K_nope 192 | V 256 per key and head; issued by the backend op)
//   expanded_attend  flash attention per (64 query rows, head): S = [q_nope | q_rope]·[K_nope | k_rope]ᵀ (256 dims,
//                    k_rope read from the gathered rows), online softmax, O += P·V (256 dims), O written as the output
// Per (query, key, head): 256 + 256 MACs, against 576 + 512 absorbed; the expansion costs 20·448·512 MACs per key,
// i.e. what the absorbed form spends on its two projections per query. At a 2K prompt: 62 vs 110 GFLOP a layer.
//
// Absorbed (other dims, or a short chunk after a long prefix, where expanding every cached key costs more):
//   prefill_prepare  q16 = bf16(q) (cuBLAS input), Qb[:, 512:] = bf16(q_rope)
//   cuBLAS           Qb[:, :512] = W_UK[h]ᵀ q_nope   (strided-batched over heads; issued by the backend op)
//   attend           the tensor-core attention of mla_attend.cu with 32 (query, head) rows per CTA, row groups
//                    launched latest-first so the long causal rows start early; one split per group once
//                    there are >= #SM groups (n >= 212 at 20 heads), so no combine pass
//   cuBLAS           out = W_UV[h] · o_lat                                                 (backend op)
#include <cuda_bf16.h>

#include <atomic>
#include <climits>

#include "backend/cuda/mla.h"
#include "backend/cuda/mla_common.cuh"

namespace trellm::cuda::mla {

namespace {

using bf16 = __nv_bfloat16;
using namespace dev;

// dst[t] = the cache row at position t of row 0's sequence for t <= *last, zeros for *last < t < bound (the table
// need not hold those blocks). 16-byte copies, 72 per row, grid-stride.
__global__ void gather_sequence_kernel(uint4* dst, const uint4* cache, KvPages pages, const int32_t* last, int bound) {
  constexpr int kChunks = kWidth * 2 / 16;
  const int32_t* table = pages.table(0);
  const int lastp = *last;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < int64_t(bound) * kChunks;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int t = int(idx / kChunks), c = int(idx % kChunks);
    dst[idx] = t <= lastp ? cache[kv_pool_row(table, t) * kChunks + c] : make_uint4(0, 0, 0, 0);
  }
}

__global__ void prefill_prepare_kernel(bf16* q16, bf16* qb, const float* q, int64_t total, int qd, int nope) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const bf16 x = __float2bfloat16_rn(q[idx]);
    q16[idx] = x;
    const int d = int(idx % qd);
    if (d >= nope) qb[(idx / qd) * kWidth + kRank + (d - nope)] = x;
  }
}

// ---- expanded flash attention --------------------------------------------------------------------------------
// CTA = 64 query rows of one head, 4 warps x 16 rows (m16 tiles), 32 keys per stage, two cp.async stages.
// Per warp and tile: S 16x32 over 256 dims (64 mma), O 16x256 += P·V (64 mma); O stays in registers (128 f32 per
// thread), P goes from the S accumulators straight into A fragments. 101 KB smem: 2 CTAs (8 warps) per SM.
constexpr int kXRows = 64;
constexpr int kXKeys = 32;
constexpr int kXThreads = 128;
constexpr int kXStride = kXDim + 8;  // 264 bf16 = 528 B per row: 8 rows land in 8 distinct 16-B bank groups
constexpr int kXChunks = kXDim / 8;  // 16-byte chunks per 256-wide row
constexpr size_t kXTile = size_t(kXKeys) * kXStride * 2;             // one K or V stage: 16,896 B
constexpr size_t kXSmem = size_t(kXRows) * kXStride * 2 + 4 * kXTile; // Q + 2 x (K, V): 101,376 B

struct XParams {
  const float* q;        // [n, heads, 256] f32, rope applied
  const bf16* kvx;       // [bound, heads, nope + 256]: K_nope then V per (key, head)
  const bf16* cache;     // [bound, 576] the sequence's rows, contiguous (gather_sequence): k_rope at 512..575
  const int32_t* pos;    // [n]
  float* out;            // [n, heads * 256]
  int n, heads, nope, qblocks, bound;  // bound: keys [0, bound) are expanded
  float scale_log2;      // softmax scale * log2(e)
};

__global__ void __launch_bounds__(kXThreads, 2) expanded_attend_kernel(const XParams P) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + kXRows * kXStride;        // [2][32][264]
  bf16* vs = ks + 2 * kXKeys * kXStride;    // [2][32][264]
  __shared__ int s_max[kXThreads / 32];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int qb = P.qblocks - 1 - int(blockIdx.x) / P.heads;  // latest (longest causal) query blocks first
  const int h = int(blockIdx.x) % P.heads;
  const int q0 = qb * kXRows;
  const int H = P.heads, per = P.nope + kXDim;

  // Positions of this warp's two fragment rows, and the CTA's last visible key.
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
  const int pos0 = r0 < P.n ? P.pos[r0] : -1, pos1 = r1 < P.n ? P.pos[r1] : -1;
  int mx = max(pos0, pos1);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_max[warp] = mx;

  // Q: f32 -> bf16 smem, rows past n zero.
  for (int idx = tid; idx < kXRows * (kXDim / 4); idx += kXThreads) {
    const int row = idx / (kXDim / 4), c = idx % (kXDim / 4);
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (q0 + row < P.n) v = *reinterpret_cast<const float4*>(P.q + (size_t(q0 + row) * H + h) * kXDim + c * 4);
    uint2 u{pack_bf16(v.x, v.y), pack_bf16(v.z, v.w)};
    *reinterpret_cast<uint2*>(qs + row * kXStride + c * 4) = u;
  }
  __syncthreads();
  const int T = min(max(max(s_max[0], s_max[1]), max(s_max[2], s_max[3])) + 1, P.bound);
  const int ntiles = (T + kXKeys - 1) / kXKeys;

  // One stage: 32 keys x (K row: nope chunks from KVx + 8 rope chunks from the cache | V row: 32 chunks from KVx).
  // 128 threads x 16 copies: thread tid always copies 16-byte column chunk tid % 64 of rows tid / 64 + 2i, so its
  // source column, key stride and smem column are fixed for the whole loop (no per-copy index arithmetic).
  // Keys >= T are zero-filled (never read from memory), so unwritten rows cannot put NaN into the MMAs.
  const int col = tid & (2 * kXChunks - 1), rbase = tid >> 6, nope_chunks = P.nope / 8;
  const bf16* src_col;
  size_t key_stride;
  uint32_t dst_col;
  if (col < nope_chunks) {
    src_col = P.kvx + size_t(h) * per + col * 8;
    key_stride = size_t(H) * per;
    dst_col = smem_u32(ks + rbase * kXStride + col * 8);
  } else if (col < kXChunks) {
    src_col = P.cache + kRank + (col - nope_chunks) * 8;
    key_stride = kWidth;
    dst_col = smem_u32(ks + rbase * kXStride + col * 8);
  } else {
    src_col = P.kvx + size_t(h) * per + P.nope + (col - kXChunks) * 8;
    key_stride = size_t(H) * per;
    dst_col = smem_u32(vs + rbase * kXStride + (col - kXChunks) * 8);
  }
  auto load_tile = [&](int t, int stage) {
    const int key0 = t * kXKeys + rbase;
    const bf16* src = src_col + size_t(key0) * key_stride;
    const uint32_t dst = dst_col + stage * uint32_t(kXTile);
#pragma unroll
    for (int i = 0; i < kXKeys / 2; i++) {
      const bool ok = key0 + 2 * i < T;
      cp_async16(dst + i * 2 * kXStride * 2, ok ? src : src_col, ok);
      src += 2 * key_stride;
    }
  };
  static_assert(kXThreads == 2 * 2 * kXChunks && kXKeys % 2 == 0, "copy layout: 64 chunks per key row, 2 rows per pass");

  // Masking is needed only on tiles past the warp's smallest position (rows past n have no output, skip them).
  int pmin = min(r0 < P.n ? pos0 : INT_MAX, r1 < P.n ? pos1 : INT_MAX);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) pmin = min(pmin, __shfl_xor_sync(0xffffffffu, pmin, o));

  float o[kXDim / 8][4];
#pragma unroll
  for (int j = 0; j < kXDim / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = -1e30f, m1 = -1e30f, l0 = 0.f, l1 = 0.f;  // finite start: fully masked tiles never make NaN

  const uint32_t q_addr = smem_u32(qs + (warp * 16 + (lane & 15)) * kXStride + (lane >> 4) * 8);
  // K fragments (non-trans): matrix lane/8 -> keys +8*(mi/2), dims +8*(mi%2); V (trans): keys +8*(mi%2), dims +8*(mi/2)
  const int mi = lane >> 3;
  const int k_off = ((mi >> 1) * 8 + (lane & 7)) * kXStride + (mi & 1) * 8;
  const int v_off = ((mi & 1) * 8 + (lane & 7)) * kXStride + (mi >> 1) * 8;

  load_tile(0, 0);
  cp_async_commit();
  for (int t = 0; t < ntiles; t++) {
    const int st = t & 1;
    if (t + 1 < ntiles) {
      load_tile(t + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t kb = smem_u32(ks + st * kXKeys * kXStride + k_off);
    const uint32_t vb = smem_u32(vs + st * kXKeys * kXStride + v_off);

    // S = Q·Kᵀ  (16 x 32 per warp)
    float s[4][4];
#pragma unroll
    for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kXDim / 16; kk++) {
      uint32_t a[4], b0[4], b1[4];
      ldsm_x4(a, q_addr + kk * 32);
      ldsm_x4(b0, kb + kk * 32);
      ldsm_x4(b1, kb + 16 * kXStride * 2 + kk * 32);
      mma_bf16(s[0], a, b0[0], b0[1]);
      mma_bf16(s[1], a, b0[2], b0[3]);
      mma_bf16(s[2], a, b1[0], b1[1]);
      mma_bf16(s[3], a, b1[2], b1[3]);
    }

    // Causal mask (key > pos[row]) and online softmax in the log2 domain (m in scaled units; the scale goes into
    // the exponent's FMA); a thread's rows: g and g + 8.
    if (t * kXKeys + kXKeys - 1 > pmin) {
      const int key0 = t * kXKeys + 2 * tq;
#pragma unroll
      for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          if (key0 + j * 8 + e > pos0) s[j][e] = -INFINITY;
          if (key0 + j * 8 + e > pos1) s[j][2 + e] = -INFINITY;
        }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
    }
    const float n0 = fmaxf(m0, mx0 * P.scale_log2), n1 = fmaxf(m1, mx1 * P.scale_log2);
    const float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);
    m0 = n0;
    m1 = n1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      s[j][0] = exp2f(fmaf(s[j][0], P.scale_log2, -n0));
      s[j][1] = exp2f(fmaf(s[j][1], P.scale_log2, -n0));
      s[j][2] = exp2f(fmaf(s[j][2], P.scale_log2, -n1));
      s[j][3] = exp2f(fmaf(s[j][3], P.scale_log2, -n1));
      sum0 += s[j][0] + s[j][1];
      sum1 += s[j][2] + s[j][3];
    }
    l0 = l0 * c0 + sum0;
    l1 = l1 * c1 + sum1;
    // Once the running maxima settle (most tiles of a long row), c0 = c1 = 1 for the whole warp: skip the rescale.
    if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) {
#pragma unroll
      for (int j = 0; j < kXDim / 8; j++) {
        o[j][0] *= c0;
        o[j][1] *= c0;
        o[j][2] *= c1;
        o[j][3] *= c1;
      }
    }

    // O += P·V: the S accumulators of key columns [16kk, 16kk+16) are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kXKeys / 16; kk++) {
      const uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                             pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < kXDim / 16; np++) {
        uint32_t b[4];
        ldsm_x4_t(b, vb + kk * 16 * kXStride * 2 + np * 32);
        mma_bf16(o[2 * np], a, b[0], b[1]);
        mma_bf16(o[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o2);
  }
  const float i0 = 1.f / l0, i1 = 1.f / l1;  // every valid row sees key 0, so l >= 1
  float* out0 = P.out + size_t(r0) * H * kXDim + h * kXDim + 2 * tq;
  float* out1 = P.out + size_t(r1) * H * kXDim + h * kXDim + 2 * tq;
#pragma unroll
  for (int j = 0; j < kXDim / 8; j++) {
    if (r0 < P.n) *reinterpret_cast<float2*>(out0 + j * 8) = make_float2(o[j][0] * i0, o[j][1] * i0);
    if (r1 < P.n) *reinterpret_cast<float2*>(out1 + j * 8) = make_float2(o[j][2] * i1, o[j][3] * i1);
  }
}

}  // namespace

void prefill_prepare(const Args& a, const Plan& p, cudaStream_t s) {
  TRELLM_ASSERT(p.prefill && !p.expanded && a.n == p.n, "mla prefill_prepare: plan is not an absorbed prefill plan");
  char* w = static_cast<char*>(a.work);
  const int qd = a.nope + kRope;
  const int64_t total = int64_t(p.rows) * qd;
  const int blocks = int(std::min<int64_t>((total + 255) / 256, 4096));
  prefill_prepare_kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<bf16*>(w + p.q16), reinterpret_cast<bf16*>(w + p.qb), a.q,
                                                total, qd, a.nope);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void gather_sequence(const Args& a, const Plan& p, cudaStream_t s) {
  TRELLM_ASSERT(p.expanded && a.n == p.n, "mla gather_sequence: plan is not an expanded plan");
  const int64_t chunks = int64_t(p.bound) * (kWidth * 2 / 16);
  const int blocks = int(std::min<int64_t>((chunks + 255) / 256, 4096));
  gather_sequence_kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<uint4*>(static_cast<char*>(a.work) + p.seq_rows),
                                                reinterpret_cast<const uint4*>(a.cache), a.pages, a.pos + (a.n - 1), p.bound);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void expanded_attend(const Args& a, const Plan& p, cudaStream_t s) {
  TRELLM_ASSERT(p.expanded && a.n == p.n && a.nope + kRope == kXDim && a.v == kXDim && a.nope % 8 == 0,
                "mla expanded_attend: plan or dims (nope ", a.nope, ", v ", a.v, ") outside the expanded kernel");
  static std::atomic<uint32_t> smem_set{0};
  opt_in_smem(expanded_attend_kernel, kXSmem, smem_set);
  XParams P;
  P.q = a.q;
  P.kvx = reinterpret_cast<const bf16*>(static_cast<char*>(a.work) + p.kvx);
  P.cache = reinterpret_cast<const bf16*>(static_cast<char*>(a.work) + p.seq_rows);  // gather_sequence's rows
  P.pos = a.pos;
  P.out = a.out;
  P.n = a.n;
  P.heads = a.heads;
  P.nope = a.nope;
  P.qblocks = (a.n + kXRows - 1) / kXRows;
  P.bound = p.bound;
  P.scale_log2 = a.scale * kLog2e;
  expanded_attend_kernel<<<P.qblocks * P.heads, kXThreads, kXSmem, s>>>(P);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda::mla
