// MLA decode (n <= 16 query rows) on the GPU, absorbed form: graph-capturable, three launches per layer for one
// row group (batch 1), four otherwise (the combine of the context splits between 2 and 3).
//   1. q_lat:  Qb[i*H+h] = bf16(W_UK[h]ᵀ q_nope[i,h] | q_rope[i,h])     reads W_UK: H*nope*512*2 B (3.9 MB GLM)
//   2. attend: tensor-core flash-decoding over the latent cache (mla_attend_decode.cu), T*1152 B
//   3. out:    out[i, h*v+j] = W_UV[h][j] · o_lat[i*H+h]                  reads W_UV: H*v*512*2 B (5.2 MB GLM)
//      with one row group, o_lat merged from the attention's context splits on the way in (no combine kernel:
//      each of a head's ceil(v/32) blocks merges that head's partials, 128 KB at 32K, from L2).
// The projections are memory-bound GEMVs (n <= 16 rows share each weight read) on CUDA cores. With
// programmatic dependent launch each kernel issues its kv_b loads before waiting on its predecessor, so the
// 9.2 MB of kv_b per layer streams while the previous kernel finishes.
#include <cuda_bf16.h>

#include "backend/cuda/mla.h"
#include "backend/cuda/mla_attend.cuh"
#include "backend/cuda/mla_common.cuh"
#include "backend/cuda/rope.cuh"

namespace trellm::cuda::mla {

namespace {

using bf16 = __nv_bfloat16;
using namespace dev;

// grid (heads, 512/64), 256 threads = 8 column octets x 32 row lanes: thread (cg, dg) holds W_UK[h] rows
// dg, dg+32, ... (<= 8 for nope <= 256) at columns c0+8cg..+8 in registers (16-byte loads, 128 contiguous bytes
// per 8 threads), loaded before the PDL wait; the 32 row lanes are summed through smem per query row.
// With ra.kv set (RopeAppend): q_rope is rotated on its way into Qb, and block (0, 1) appends the cache rows.
__global__ void __launch_bounds__(256) qlat_decode_kernel(bf16* qb, const float* q, const uint16_t* kvb, int n, int heads,
                                                          int nope, int v, const RopeAppend ra, const int32_t* pos,
                                                          const KvPages pages) {
  __shared__ float qs[kDecodeMaxRows * kMaxNope];
  __shared__ __align__(16) float red[32][64];
  const int h = blockIdx.x, c0 = blockIdx.y * 64, tid = threadIdx.x, cg = tid & 7, dg = tid >> 3;
  const int per = nope + v, qd = nope + kRope;
  uint4 w[8];
#pragma unroll
  for (int k = 0; k < 8; k++) {
    const int d = dg + 32 * k;
    w[k] = d < nope ? __ldg(reinterpret_cast<const uint4*>(kvb + size_t(h * per + d) * kRank + c0 + 8 * cg))
                    : make_uint4(0, 0, 0, 0);
  }
  // W_UV rows of this head for the output projection (4 launches later): into L2 now, while the attention
  // is latency-bound, instead of from HBM after it (5.2 MB per layer for GLM). blockIdx.y-th eighth of v.
  {
    const int rows_per = (v + 7) / 8, j = blockIdx.y * rows_per + tid;
    if (tid < rows_per && j < v) prefetch_l2(kvb + size_t(h * per + nope + j) * kRank, kRank * 2);
  }
  grid_wait();
  grid_launch_dependents();
  for (int idx = tid; idx < n * nope; idx += 256) {
    const int i = idx / nope, d = idx % nope;
    qs[i * kMaxNope + d] = q[(size_t(i) * heads + h) * qd + d];
  }
  if (blockIdx.y == 0)  // q_rope into Qb, rotated first when the rope is folded in (RopeAppend)
    for (int idx = tid; idx < n * (kRope / 2); idx += 256) {
      const int i = idx / (kRope / 2), k = idx % (kRope / 2);
      const float* qr = q + (size_t(i) * heads + h) * qd + nope;
      float a = qr[2 * k], b = qr[2 * k + 1];
      if (ra.kv) rope_rotate(a, b, k, kRope, pos[i], ra.theta);
      bf16* dst = qb + (size_t(i) * heads + h) * kWidth + kRank + 2 * k;
      dst[0] = __float2bfloat16_rn(a);
      dst[1] = __float2bfloat16_rn(b);
    }
  if (ra.kv && h == 0 && blockIdx.y == 1)  // the cache rows, as the append kernel writes them (at their pool rows)
    for (int i = 0; i < n; i++)
      append_cache_row(reinterpret_cast<bf16*>(ra.cache), ra.kv, ra.norm_w, i, kRank, kRope, ra.eps, pos, pages, ra.theta);
  __syncthreads();
  for (int i = 0; i < n; i++) {
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const int d = dg + 32 * k;
      if (d < nope) {
        const float x = qs[i * kMaxNope + d];
        acc[0] += x * bf_lo(w[k].x), acc[1] += x * bf_hi(w[k].x), acc[2] += x * bf_lo(w[k].y), acc[3] += x * bf_hi(w[k].y);
        acc[4] += x * bf_lo(w[k].z), acc[5] += x * bf_hi(w[k].z), acc[6] += x * bf_lo(w[k].w), acc[7] += x * bf_hi(w[k].w);
      }
    }
    float4* rp = reinterpret_cast<float4*>(&red[dg][8 * cg]);
    rp[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    rp[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    __syncthreads();
    if (tid < 64) {
      float s = 0.0f;
#pragma unroll 8
      for (int k = 0; k < 32; k++) s += red[k][tid];
      qb[(size_t(i) * heads + h) * kWidth + c0 + tid] = __float2bfloat16_rn(s);
    }
    __syncthreads();
  }
}

// The attention's output where the projection reads it: o_lat itself (one split) or the split partials.
struct OLat {
  const float* olat;          // [rows, 512] f32 (splits == 1)
  const bf16* part_o;         // [groups, splits, 32, 512] (splits > 1)
  const float* part_ml;       // [groups, splits, 32, 2]
  const int32_t* pos;         // [n]
  int group_rows, splits;     // the attention's grouping (Plan)
};

// os[i, :] = o_lat of row (i, h), merged as the combine kernel does (mla_attend.cu): Σ_s 2^(m_s - M) O_s /
// Σ_s 2^(m_s - M) l_s over the splits that hold data. 256 threads = 64 column octets x 4 split lanes.
__device__ void merge_splits(float* os, const OLat& o, int i, int h, int heads, int rows) {
  __shared__ float w_s[kMaxSplits];
  __shared__ __align__(16) float red[4][kRank];
  __shared__ float red8[8];
  __shared__ int t_s;
  const int tid = threadIdx.x;
  const int row = i * heads + h, group = row / o.group_rows, r = row % o.group_rows;
  const int active = split_range(group_context(o.pos, group, o.group_rows, rows, heads, &t_s), o.splits).active;
  const float* ml = o.part_ml + (size_t(group) * o.splits * kRowsPerCta + r) * 2;  // split s at + s * 64
  const float L = split_weights<256>(ml, active, w_s, red8);
  const int co = tid & 63, sl = tid >> 6;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const bf16* po = o.part_o + (size_t(group) * o.splits * kRowsPerCta + r) * kRank + 8 * co;  // split s at + s * 32 rows
#pragma unroll 4
  for (int sp = sl; sp < active; sp += 4) {
    const float w = w_s[sp];
    const uint4 u = *reinterpret_cast<const uint4*>(po + size_t(sp) * kRowsPerCta * kRank);
    acc[0] += w * bf_lo(u.x), acc[1] += w * bf_hi(u.x), acc[2] += w * bf_lo(u.y), acc[3] += w * bf_hi(u.y);
    acc[4] += w * bf_lo(u.z), acc[5] += w * bf_hi(u.z), acc[6] += w * bf_lo(u.w), acc[7] += w * bf_hi(u.w);
  }
  float4* rp = reinterpret_cast<float4*>(&red[sl][8 * co]);
  rp[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  rp[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  __syncthreads();
  const float inv = 1.0f / L;
  for (int c = tid; c < kRank; c += 256) os[i * kRank + c] = (red[0][c] + red[1][c] + red[2][c] + red[3][c]) * inv;
  __syncthreads();  // w_s, red and t_s are rewritten for the next row
}

// grid (heads, ceil(v/32)), 256 threads: warp w owns W_UV[h] rows j0..j0+3 (j0 = 32*by + 4w), each lane 4 bf16 at
// columns 4*lane + 128*qq (8-byte loads, coalesced 256 B per quarter), in registers before the PDL wait.
__global__ void __launch_bounds__(256) out_decode_kernel(float* out, const OLat ol, const uint16_t* kvb, int n,
                                                         int heads, int nope, int v) {
  extern __shared__ __align__(16) float os[];  // [n, 512]: dynamic, so a small block (n = 1: 2 KB + 12 KB of
                                                // merge buffers) can sit beside an attention CTA (188 KB) on the
                                                // same SM and start early (PDL)
  const int h = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, per = nope + v;
  const int j0 = blockIdx.y * 32 + warp * 4;
  uint2 w[4][4];
#pragma unroll
  for (int rr = 0; rr < 4; rr++)
#pragma unroll
    for (int qq = 0; qq < 4; qq++)
      w[rr][qq] = j0 + rr < v ? __ldg(reinterpret_cast<const uint2*>(kvb + size_t(h * per + nope + j0 + rr) * kRank + 4 * lane +
                                                                     128 * qq))
                              : make_uint2(0, 0);
  grid_wait();
  grid_launch_dependents();
  if (ol.splits == 1) {
    for (int idx = tid; idx < n * (kRank / 4); idx += 256) {
      const int i = idx / (kRank / 4), c4 = idx % (kRank / 4);
      reinterpret_cast<float4*>(os)[i * (kRank / 4) + c4] =
          reinterpret_cast<const float4*>(ol.olat)[(size_t(i) * heads + h) * (kRank / 4) + c4];
    }
    __syncthreads();
  } else {
    for (int i = 0; i < n; i++) merge_splits(os, ol, i, h, heads, n * heads);
  }
  for (int i = 0; i < n; i++) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int qq = 0; qq < 4; qq++) {
      const float4 o = reinterpret_cast<const float4*>(os)[i * (kRank / 4) + lane + 32 * qq];
#pragma unroll
      for (int rr = 0; rr < 4; rr++)
        acc[rr] += bf_lo(w[rr][qq].x) * o.x + bf_hi(w[rr][qq].x) * o.y + bf_lo(w[rr][qq].y) * o.z + bf_hi(w[rr][qq].y) * o.w;
    }
#pragma unroll
    for (int rr = 0; rr < 4; rr++) acc[rr] = warp_sum(acc[rr]);
    if (lane < 4 && j0 + lane < v) {
      const float val = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
      out[(size_t(i) * heads + h) * v + j0 + lane] = val;
    }
  }
}

}  // namespace

void decode(const Args& a, const Plan& p, cudaStream_t s) {
  TRELLM_ASSERT(!p.prefill && a.n == p.n && a.n <= kDecodeMaxRows && a.nope <= kMaxNope, "mla decode: n ", a.n);
  char* w = static_cast<char*>(a.work);
  bf16* qb = reinterpret_cast<bf16*>(w + p.qb);
  // Keys on M (one row group): the projection merges the splits. Otherwise the combine kernel writes o_lat and the
  // projection reads it: each of a head's v/32 blocks would merge all n rows again (H100, 8 batched rows: -5 %
  // end to end).
  const OLat ol{reinterpret_cast<const float*>(w + p.olat), reinterpret_cast<const bf16*>(w + p.part_o),
                reinterpret_cast<const float*>(w + p.part_ml), a.pos, p.group_rows, p.keys_on_m ? p.splits : 1};
  const RopeAppend ra = a.ra ? *a.ra : RopeAppend{nullptr, nullptr, 0.0f, nullptr, 0.0f};
  launch(qlat_decode_kernel, dim3(a.heads, kRank / 64), dim3(256), 0, s, true, qb, a.q, a.kv_b, a.n, a.heads, a.nope, a.v,
         ra, a.pos, a.pages);
  attend(a, p, s);
  launch(out_decode_kernel, dim3(a.heads, (a.v + 31) / 32), dim3(256), size_t(a.n) * kRank * 4, s, true, a.out, ol, a.kv_b,
         a.n, a.heads, a.nope, a.v);
}

}  // namespace trellm::cuda::mla
