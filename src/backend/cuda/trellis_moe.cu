// MoE over trellis experts: the router (a cluster of 8 CTAs per token), the prefill variant's grouping,
// transform and combine kernels, and the host entry points (planning, workspace layout, launches).
#include <cooperative_groups.h>

#include <algorithm>
#include <cfloat>
#include <climits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/trellis_moe.cuh"
#include "backend/cuda/trellis_plan.h"
#include "core/error.h"

namespace trellm::cuda {

namespace tk {

namespace cg = cooperative_groups;

constexpr int kRouteMaxE = 1024;
constexpr int kRouteCluster = 8;
constexpr size_t kMoeCounterBytes = 65536;  // fixed counter area at the MoE workspace start

// ---- router ----------------------------------------------------------------------------------------------------
// grid (8, m), cluster (8,1,1): CTA r scores experts e with (e / 8) % 8 == r (a warp per expert, 16-byte
// loads of the bf16 gate row) and writes s, choice into CTA 0's shared memory (DSMEM); after the cluster
// barrier CTA 0's first warp does the group-limited top-k. At m = 1 the gate (64 × 2048 bf16 = 256 KB) is
// read by 8 SMs instead of 1.
struct RouteArgs {
  const float* x;
  const __nv_bfloat16* gate;
  const float* bias;
  int hidden, E, top_k, n_group, topk_group;
  bool norm;
  float scale;
  float* weights;
  int* ids;
  // Fused residual step (add_rms_norm_route): with h set, x is not read; every CTA forms v = h + y and
  // x = norm_w ⊙ v · rsqrt(mean v² + eps) in shared memory for its dot products, and CTA 0 writes h = v and
  // x_out = x once the cluster is done reading h. hidden <= kRouteFuseMaxHidden.
  float* h;
  const float* y;
  const float* norm_w;
  float eps;
  float* x_out;
  bool hold_gate = false;  // the warp's first gate row in registers before the wait (route_ahead())
};
constexpr int kRouteFuseMaxHidden = 4096;
constexpr int kRouteHeld = 8;  // 16-byte gate pieces a lane holds from before the wait: hidden <= 2048

// The router's first gate row in registers before its wait (on by default; TRELLM_ROUTE_AHEAD=0: in L2 only, the A/B baseline).
static bool route_ahead() {
  static const bool on = env_int("TRELLM_ROUTE_AHEAD", 1) != 0;
  return on;
}

// The selection after the scores, by one warp (same rule and tie order as CpuBackend::moe_route): s_sig holds
// sigmoid(logit), s_choice sigmoid + bias (overwritten: groups not kept become -inf), taken E bytes of scratch.
__device__ void route_select(const RouteArgs& a, int token, float* s_sig, float* s_choice, unsigned char* taken,
                             int* picked) {
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < a.E; e += 32) taken[e] = 0;
  if (a.n_group > 1 && lane == 0) {  // keep the topk_group groups whose two best choices sum highest
    const int gs = a.E / a.n_group;
    float gscore[32];
    bool keep[32];
    for (int g = 0; g < a.n_group; g++) {
      float b1 = -FLT_MAX, b2 = -FLT_MAX;
      for (int e = g * gs; e < (g + 1) * gs; e++) {
        const float c = s_choice[e];
        if (c > b1) b2 = b1, b1 = c;
        else if (c > b2) b2 = c;
      }
      gscore[g] = b1 + (gs > 1 ? b2 : 0.0f);
      keep[g] = false;
    }
    for (int r = 0; r < a.topk_group; r++) {  // ties keep the lower group index (stable sort on the CPU)
      int best = -1;
      for (int g = 0; g < a.n_group; g++)
        if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
      keep[best] = true;
    }
    for (int g = 0; g < a.n_group; g++)
      if (!keep[g])
        for (int e = g * gs; e < (g + 1) * gs; e++) s_choice[e] = -INFINITY;
  }
  __syncwarp();
  float sum = 0.0f;
  for (int k = 0; k < a.top_k; k++) {  // highest choice first; ties to the lower expert index
    float bv = 0.0f;
    int bi = INT_MAX;
    for (int e = lane; e < a.E; e += 32) {
      const float c = s_choice[e];
      if (!taken[e] && (bi == INT_MAX || c > bv || (c == bv && e < bi))) bv = c, bi = e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != INT_MAX && (bi == INT_MAX || ov > bv || (ov == bv && oi < bi))) bv = ov, bi = oi;
    }
    if (lane == 0) taken[bi] = 1, picked[k] = bi;
    sum += s_sig[bi];
    __syncwarp();
  }
  const float nrm = a.norm ? 1.0f / (sum + 1e-20f) : 1.0f;
  for (int k = lane; k < a.top_k; k += 32) {
    a.ids[int64_t(token) * a.top_k + k] = picked[k];
    a.weights[int64_t(token) * a.top_k + k] = __fmul_rn(__fmul_rn(s_sig[picked[k]], nrm), a.scale);
  }
}

__global__ void __cluster_dims__(kRouteCluster, 1, 1) __launch_bounds__(kThreads) route_kernel(const RouteArgs a) {
  __shared__ float s_sig[kRouteMaxE], s_choice[kRouteMaxE];
  __shared__ unsigned char taken[kRouteMaxE];
  __shared__ int picked[32];
  cg::cluster_group cl = cg::this_cluster();
  const int rank = int(cl.block_rank()), token = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // A CTA may write another's shared memory only once that CTA is running: arrive now, wait right before the
  // first remote write (compute-sanitizer racecheck: "block that might not have entered yet" without it).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  // Before the wait (PDL): this warp's first gate row into registers (GLM: 64 experts over 64 warps, a 2048-wide
  // row = 8 x 16 B a lane), the rest into L2, while the previous kernel finishes; the gate is a weight. Takes one
  // L2 round trip off the path after the norm.
  const int e0 = rank * kWarps + warp;
  const bool held = a.hold_gate && (a.hidden & 7) == 0 && a.hidden <= 256 * kRouteHeld && e0 < a.E;
  uint4 g_held[kRouteHeld];
  if (held) {
    const __nv_bfloat16* gr = a.gate + int64_t(e0) * a.hidden;
#pragma unroll
    for (int i = 0; i < kRouteHeld; i++) {
      const int k = 8 * lane + 256 * i;
      g_held[i] = k < a.hidden ? __ldg(reinterpret_cast<const uint4*>(gr + k)) : make_uint4(0, 0, 0, 0);
    }
  }
  if (lane == 0 && (a.hidden & 7) == 0)
    for (int e = e0 + (held ? kRouteCluster * kWarps : 0); e < a.E; e += kRouteCluster * kWarps)
      prefetch_l2(a.gate + int64_t(e) * a.hidden, uint32_t(a.hidden) * 2);
  grid_launch_dependents();
  grid_wait();
  __shared__ float s_v[kRouteFuseMaxHidden], s_x[kRouteFuseMaxHidden], s_red[kWarps];
  const float* xr = a.x + int64_t(token) * a.hidden;
  if (a.h) {  // the residual add and the norm, as add_rms_norm_kernel computes them
    const float* hr = a.h + int64_t(token) * a.hidden;
    const float* yr = a.y + int64_t(token) * a.hidden;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < a.hidden; k += kThreads) {
      const float v = hr[k] + yr[k];
      s_v[k] = v;
      ss += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) s_red[warp] = ss;
    __syncthreads();
    ss = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; w++) ss += s_red[w];
    const float r = rsqrtf(ss / float(a.hidden) + a.eps);
    for (int k = threadIdx.x; k < a.hidden; k += kThreads) s_x[k] = a.norm_w[k] * (s_v[k] * r);
    __syncthreads();
    xr = s_x;
  }
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");  // every CTA of the cluster has started
  float* dst_sig = cl.map_shared_rank(s_sig, 0);
  float* dst_choice = cl.map_shared_rank(s_choice, 0);
  auto dot8 = [&](float& d, const uint4 g8, int k) {  // d += gate[k .. k+8) · x[k .. k+8), in the order of the loop below
    const float4 x0 = *reinterpret_cast<const float4*>(xr + k), x1 = *reinterpret_cast<const float4*>(xr + k + 4);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g8);
    const float2 f0 = __bfloat1622float2(g2[0]), f1 = __bfloat1622float2(g2[1]);
    const float2 f2 = __bfloat1622float2(g2[2]), f3 = __bfloat1622float2(g2[3]);
    d += f0.x * x0.x + f0.y * x0.y + f1.x * x0.z + f1.y * x0.w + f2.x * x1.x + f2.y * x1.y + f3.x * x1.z + f3.y * x1.w;
  };
  for (int e = e0; e < a.E; e += kRouteCluster * kWarps) {
    const __nv_bfloat16* gr = a.gate + int64_t(e) * a.hidden;
    float d = 0.0f;
    if (held && e == e0) {
#pragma unroll
      for (int i = 0; i < kRouteHeld; i++)
        if (8 * lane + 256 * i < a.hidden) dot8(d, g_held[i], 8 * lane + 256 * i);
    } else if ((a.hidden & 7) == 0) {
#pragma unroll 8  // loads in flight together (measured: no change, 6.0 µs per route at m = 1 either way)
      for (int k = 8 * lane; k < a.hidden; k += 256) dot8(d, *reinterpret_cast<const uint4*>(gr + k), k);
    } else {
      for (int k = lane; k < a.hidden; k += 32) d += __bfloat162float(gr[k]) * xr[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    if (lane == 0) {
      const float sg = 1.0f / (1.0f + expf(-d));  // sigmoid in fp32, like transformers and the CPU backend
      dst_sig[e] = sg;
      dst_choice[e] = sg + (a.bias ? a.bias[e] : 0.0f);  // the bias only steers selection
    }
  }
  cl.sync();  // after it, no CTA of the cluster reads h any more
  if (a.h && rank == 0) {
    float* hr = a.h + int64_t(token) * a.hidden;
    float* xo = a.x_out + int64_t(token) * a.hidden;
    for (int k = threadIdx.x; k < a.hidden; k += kThreads) hr[k] = s_v[k], xo[k] = s_x[k];
  }
  if (rank != 0 || warp != 0) return;
  route_select(a, token, s_sig, s_choice, taken, picked);
}

// Prefill (many tokens): the scores come from a GEMM (logits [m, E] = x · gateᵀ, f32, cuBLAS); one warp per
// token turns them into weights and ids. At 2,048 tokens the cluster router above spent ~230 µs per layer on
// CUDA-core dot products (trellm bench's prefill part timing on the H200).
__global__ void __launch_bounds__(32) route_logits_kernel(const RouteArgs a, const float* logits) {
  __shared__ float s_sig[kRouteMaxE], s_choice[kRouteMaxE];
  __shared__ unsigned char taken[kRouteMaxE];
  __shared__ int picked[32];
  grid_wait();
  grid_launch_dependents();
  const int token = blockIdx.x;
  for (int e = threadIdx.x; e < a.E; e += 32) {
    const float sg = 1.0f / (1.0f + expf(-logits[int64_t(token) * a.E + e]));
    s_sig[e] = sg;
    s_choice[e] = sg + (a.bias ? a.bias[e] : 0.0f);
  }
  __syncwarp();
  route_select(a, token, s_sig, s_choice, taken, picked);
}

// ---- prefill: grouping ---------------------------------------------------------------------------------------------
// One block: counts per expert, offsets, rows in expert order (within an expert the order follows the atomics;
// each row's result is independent of its position, so the output does not depend on it), tile list.
__global__ void __launch_bounds__(1024) prep_kernel(const MoeArgs a) {
  __shared__ int cnt[kRouteMaxE + 1], off[kRouteMaxE + 1];
  const int nj = a.m * a.top_k;
  for (int e = threadIdx.x; e <= a.E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < nj; j += blockDim.x) {
    const int e = a.ids[j];
    if (unsigned(e) >= unsigned(a.E)) __trap();
    atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int o = 0, nt = 0;
    for (int e = 0; e < a.E; e++) {
      off[e] = o;
      for (int r = 0; r < cnt[e]; r += a.tile_rows) a.tiles[nt++] = make_int4(e, o + r, min(a.tile_rows, cnt[e] - r), 0);
      o += cnt[e];
      cnt[e] = 0;
    }
    if (a.shared)
      for (int r = 0; r < a.m; r += a.tile_rows) a.tiles[nt++] = make_int4(a.E, nj + r, min(a.tile_rows, a.m - r), 0);
    *a.n_tiles = nt;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < nj; j += blockDim.x) {
    const int e = a.ids[j], p = off[e] + atomicAdd(&cnt[e], 1);
    a.pos[j] = p;
    a.row_token[p] = j / a.top_k;
    a.row_expert[p] = e;
  }
  if (a.shared)
    for (int i = threadIdx.x; i < a.m; i += blockDim.x) a.row_token[nj + i] = i, a.row_expert[nj + i] = a.E;
}

// grid (R, ceil(chunks/8)): a_gu[z][row] = transform of x[token(row)] with the row's expert's gate (z = 0) and up
// (z = 1) suh; a warp reads its chunk of x once for both.
__global__ void __launch_bounds__(kThreads) xform_moe_kernel(const MoeArgs a) {
  const int r = blockIdx.x, chunk = blockIdx.y * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (chunk >= a.hidden_p / kChunk) return;
  const DeviceTrellis* d3 = expert_desc(a, a.row_expert[r]);
  float x4[4];
  load_row4(a.x + int64_t(a.row_token[r]) * a.hidden, chunk * kChunk + 4 * lane, a.hidden, x4);
#pragma unroll
  for (int z = 0; z < 2; z++) {
    float v[4] = {x4[0], x4[1], x4[2], x4[3]};
    xform_regs_warp(v, d3[z].suh, chunk * kChunk, a.a_gu + (int64_t(z) * a.R + r) * a.hidden_p + chunk * kChunk);
  }
}

// grid (R, ceil(inter chunks/8)): a_d[row] = transform of silu(gate)·up with the row's expert's down suh.
__global__ void __launch_bounds__(kThreads) swiglu_xform_kernel(const MoeArgs a) {
  const int r = blockIdx.x, chunk = blockIdx.y * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (chunk >= a.inter_p / kChunk) return;
  const DeviceTrellis* d3 = expert_desc(a, a.row_expert[r]);
  float g[4], u[4], h[4];
  load_row4(a.gu + int64_t(r) * a.inter_p, chunk * kChunk + 4 * lane, a.inter, g);
  load_row4(a.gu + (int64_t(a.R) + r) * a.inter_p, chunk * kChunk + 4 * lane, a.inter, u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int c = chunk * kChunk + 4 * lane + i;
    h[i] = c < a.inter ? g[i] / (1.0f + expf(-g[i])) * u[i] : 0.0f;
  }
  xform_regs_warp(h, d3[2].suh, chunk * kChunk, a.a_d + int64_t(r) * a.inter_p + chunk * kChunk);
}

// grid (m): out[i] = Σ_k w[i,k]·ys[pos(i,k)] + ys[shared row of i], in slot order (deterministic).
__global__ void __launch_bounds__(kThreads) combine_kernel(const MoeArgs a) {
  const int i = blockIdx.x, nj = a.m * a.top_k;
  for (int c = threadIdx.x; c < a.hidden; c += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < a.top_k; k++)
      acc += a.wts[i * a.top_k + k] * a.ys[int64_t(a.pos[i * a.top_k + k]) * a.hidden_p + c];
    if (a.shared) acc += a.ys[int64_t(nj + i) * a.hidden_p + c];
    a.out[int64_t(i) * a.hidden + c] = acc;
  }
}

// ---- planning and workspace ------------------------------------------------------------------------------------

struct MoePlan {
  bool decode;
  int jpt, J, R, hidden_p, inter_p, s_gu, s_d, max_tiles, mt;
  size_t bytes;
};

static int r128(int n) { return (n + 127) / 128 * 128; }

static MoePlan plan_moe(int m, int top_k, int hidden, int inter, int E, bool has_shared) {
  MoePlan p{};
  p.jpt = top_k + (has_shared ? 1 : 0);
  p.hidden_p = r128(hidden), p.inter_p = r128(inter);
  const int gh = p.hidden_p / kGroupCols, gi = p.inter_p / kGroupCols;
  const int sms = sm_count();
  p.decode = m <= kMoeDecodeMaxTokens;
  size_t off = kMoeCounterBytes;
  if (p.decode) {
    p.J = m * p.jpt;
    // Up to one wave of 4 blocks per SM, equal chunks per split (as plan_linear): m = 1, GLM (5 jobs, 12 + 16
    // groups) -> s_gu = 4 (16 chunks: 480 blocks), s_d = 6 (12 chunks: 480 blocks).
    p.s_gu = even_splits(p.hidden_p / kChunk, 4 * sms / (2 * p.J * gi));
    p.s_d = even_splits(p.inter_p / kChunk, 4 * sms / (p.J * gh));
    off += align256(size_t(p.J) * 2 * p.s_gu * p.inter_p * 4);  // p_gu
    off += align256(size_t(p.J) * p.inter_p * 2);                // a_d
    off += align256(size_t(p.J) * p.s_d * p.hidden_p * 4);       // p_d
  } else {
    p.R = m * p.jpt;
    const int nj = m * top_k;
    p.mt = nj <= kSmallTileMaxRowsPerExpert * E ? 1 : kMT;
    const int tr = 16 * p.mt;
    p.max_tiles = nj / tr + std::min(E, nj) + (m + tr - 1) / tr + 1;
    off += align256(size_t(p.R) * 4) * 2 + align256(size_t(nj) * 4) + align256(size_t(p.max_tiles) * 16) + 256;
    off += align256(size_t(2) * p.R * p.hidden_p * 2);  // a_gu
    off += align256(size_t(2) * p.R * p.inter_p * 4);   // gu
    off += align256(size_t(p.R) * p.inter_p * 2);       // a_d
    off += align256(size_t(p.R) * p.hidden_p * 4);      // ys
  }
  p.bytes = off;
  return p;
}

static void moe_layout(const MoePlan& p, void* ws, MoeArgs& a) {
  char* base = static_cast<char*>(ws);
  size_t off = kMoeCounterBytes;
  auto take = [&](size_t bytes) {
    char* q = base + off;
    off += align256(bytes);
    return q;
  };
  const int gh = p.hidden_p / kGroupCols, gi = p.inter_p / kGroupCols;
  if (p.decode) {
    a.cnt_gu = reinterpret_cast<int*>(base);
    a.cnt_d = a.cnt_gu + p.J * gi;
    a.cnt_r = a.cnt_d + a.m * gh;
    TRELLM_ASSERT(size_t(p.J * gi + a.m * gh + a.m) * 4 <= kMoeCounterBytes, "moe_experts: counter area too small");
    a.p_gu = reinterpret_cast<float*>(take(size_t(p.J) * 2 * p.s_gu * p.inter_p * 4));
    a.a_d = reinterpret_cast<__half*>(take(size_t(p.J) * p.inter_p * 2));
    a.p_d = reinterpret_cast<float*>(take(size_t(p.J) * p.s_d * p.hidden_p * 4));
  } else {
    const int nj = a.m * a.top_k;
    a.row_token = reinterpret_cast<int*>(take(size_t(p.R) * 4));
    a.row_expert = reinterpret_cast<int*>(take(size_t(p.R) * 4));
    a.pos = reinterpret_cast<int*>(take(size_t(nj) * 4));
    a.tiles = reinterpret_cast<int4*>(take(size_t(p.max_tiles) * 16));
    a.n_tiles = reinterpret_cast<int*>(take(4));
    a.a_gu = reinterpret_cast<__half*>(take(size_t(2) * p.R * p.hidden_p * 2));
    a.gu = reinterpret_cast<float*>(take(size_t(2) * p.R * p.inter_p * 4));
    a.a_d = reinterpret_cast<__half*>(take(size_t(p.R) * p.inter_p * 2));
    a.ys = reinterpret_cast<float*>(take(size_t(p.R) * p.hidden_p * 4));
  }
}

}  // namespace tk

using namespace tk;

void moe_route(const float* x, const uint16_t* gate_bf16, const float* bias, int m, int hidden, int E, int top_k,
               int n_group, int topk_group, bool norm, float scale, float* weights, int* ids, cudaStream_t s) {
  TRELLM_ASSERT(E >= 1 && E <= kRouteMaxE && top_k >= 1 && top_k <= 32 && top_k <= E && n_group >= 1 &&
                    n_group <= 32 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
                "moe_route: unsupported E ", E, " top_k ", top_k, " n_group ", n_group, " topk_group ", topk_group);
  if (m == 0) return;
  RouteArgs a{x, reinterpret_cast<const __nv_bfloat16*>(gate_bf16), bias, hidden, E, top_k, n_group, topk_group,
              norm, scale, weights, ids, nullptr, nullptr, nullptr, 0.0f, nullptr, route_ahead()};
  launch(route_kernel, dim3(kRouteCluster, m), dim3(kThreads), 0, s, true, a);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void add_rms_norm_route(float* h, const float* y, const float* norm_w, float eps, float* x, const uint16_t* gate_bf16,
                        const float* bias, int m, int hidden, int E, int top_k, int n_group, int topk_group, bool norm,
                        float scale, float* weights, int* ids, cudaStream_t s) {
  TRELLM_ASSERT(E >= 1 && E <= kRouteMaxE && top_k >= 1 && top_k <= 32 && top_k <= E && n_group >= 1 &&
                    n_group <= 32 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group &&
                    hidden <= kRouteFuseMaxHidden,
                "add_rms_norm_route: unsupported E ", E, " top_k ", top_k, " n_group ", n_group, " hidden ", hidden);
  if (m == 0) return;
  RouteArgs a{nullptr, reinterpret_cast<const __nv_bfloat16*>(gate_bf16), bias, hidden, E, top_k, n_group, topk_group,
              norm, scale, weights, ids, h, y, norm_w, eps, x, route_ahead()};
  launch(route_kernel, dim3(kRouteCluster, m), dim3(kThreads), 0, s, true, a);
  TRELLM_CUDA_LAUNCH_CHECK();
}

void moe_route_logits(const float* logits, const float* bias, int m, int E, int top_k, int n_group, int topk_group,
                      bool norm, float scale, float* weights, int* ids, cudaStream_t s) {
  TRELLM_ASSERT(E >= 1 && E <= kRouteMaxE && top_k >= 1 && top_k <= 32 && top_k <= E && n_group >= 1 &&
                    n_group <= 32 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
                "moe_route_logits: unsupported E ", E, " top_k ", top_k, " n_group ", n_group, " topk_group ", topk_group);
  if (m == 0) return;
  RouteArgs a{nullptr, nullptr, bias, 0, E, top_k, n_group, topk_group, norm, scale, weights, ids, nullptr, nullptr,
              nullptr, 0.0f, nullptr};
  launch(route_logits_kernel, dim3(m), dim3(32), 0, s, true, a, logits);
  TRELLM_CUDA_LAUNCH_CHECK();
}

size_t moe_workspace_bytes(int max_m, int top_k, int hidden, int inter, int n_experts) {
  size_t best = kMoeCounterBytes;
  for (int m = 1; m <= std::min(max_m, kMoeDecodeMaxTokens); m++)
    best = std::max(best, plan_moe(m, top_k, hidden, inter, n_experts, true).bytes);
  if (max_m > kMoeDecodeMaxTokens) best = std::max(best, plan_moe(max_m, top_k, hidden, inter, n_experts, true).bytes);
  // The largest m with 16-row tiles has the longest tile list; cover it too when it lies below max_m.
  const int m_small = kSmallTileMaxRowsPerExpert * n_experts / top_k;
  if (m_small > kMoeDecodeMaxTokens && m_small < max_m)
    best = std::max(best, plan_moe(m_small, top_k, hidden, inter, n_experts, true).bytes);
  return best;
}

void moe_experts(const DeviceTrellis* experts, const DeviceTrellis* shared, int n_experts, const float* x,
                 const int* ids, const float* weights, float* out, int m, int top_k, int hidden, int inter,
                 void* workspace, cudaStream_t s, int max_k, int uniform_k, int uniform_cb, const MoeResidual* res) {
  TRELLM_ASSERT(max_k >= 2 && max_k <= 8, "moe_experts: max_k = ", max_k);
  TRELLM_ASSERT(n_experts >= 1 && n_experts <= kRouteMaxE && top_k >= 1 && top_k <= n_experts && m >= 1,
                "moe_experts: bad sizes E ", n_experts, " top_k ", top_k, " m ", m);
  const MoePlan p = plan_moe(m, top_k, hidden, inter, n_experts, shared != nullptr);
  MoeArgs a{};
  a.experts = experts, a.shared = shared, a.E = n_experts, a.m = m, a.top_k = top_k, a.jpt = p.jpt;
  a.hidden = hidden, a.inter = inter, a.hidden_p = p.hidden_p, a.inter_p = p.inter_p;
  a.x = x, a.ids = ids, a.wts = weights, a.out = out;
  a.s_gu = p.s_gu, a.s_d = p.s_d, a.R = p.R;
  moe_layout(p, workspace, a);
  TRELLM_ASSERT(!res || p.decode, "moe_experts: the fused residual step is for decode (m <= ", kMoeDecodeMaxTokens, "), m = ", m);
  if (res) a.res_h = res->h, a.res_w = res->norm_w, a.res_eps = res->eps, a.res_x = res->x_out;
  const int gh = p.hidden_p / kGroupCols, gi = p.inter_p / kGroupCols;
  if (p.decode) {
    static const bool once = [] {
      for (const void* k : {reinterpret_cast<const void*>(gateup_decode_kernel), reinterpret_cast<const void*>(gateup_decode_cluster_kernel),
                            reinterpret_cast<const void*>(down_decode_kernel)}) {
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 160 * 1024);
        cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      }
      (void)cudaGetLastError();
      return true;
    }();
    (void)once;
    const int ch = p.hidden_p / kChunk, ci = p.inter_p / kChunk;
    a.ring_bytes = int(moe_ring_bytes(max_k));
    const size_t smem_gu = a.ring_bytes + 2 * (size_t((ch + p.s_gu - 1) / p.s_gu) * kChunk + 8) * 2;  // A row + zero row
    // gate/up's split-k tail in clusters of a (job, group)'s 2·s_gu blocks (GLM: 8) where they fit; else the
    // partials, ticket and L2 reads. Measured 271.2 against 268.3 tok/s at depth 0 with the GEMV tails in clusters
    // (H100, 2026-12-07, three rounds each). TRELLM_MOE_CLUSTER=0: the ticket tail, the A/B baseline; read at
    // every launch so the tests compare both in one process. Down's tail in clusters of a token's jpt·s_d blocks
    // (s_d capped 6 -> 3) measured 256.0 (slower: fewer splits, longer chains), so down keeps its ticket tail.
    const dim3 grid_gu(p.J, gi, 2 * p.s_gu), cl_gu(1, 1, 2 * p.s_gu);
    const size_t smem_gu_cl = smem_gu + size_t(2 * p.s_gu) * kClusterSlotBytes;
    const void* gu_cl = reinterpret_cast<const void*>(gateup_decode_cluster_kernel);
    const bool gu_cluster = env_int("TRELLM_MOE_CLUSTER", 1) != 0 && use_cluster(2 * p.s_gu, kMaxCluster, gu_cl, smem_gu_cl, [&] {
      return clusters_fit(gu_cl, grid_gu, dim3(kThreads), smem_gu_cl, cl_gu);
    });
    // k tiles the down blocks decode before their wait: none by default. 4 (16 KB, 4 blocks a SM still fit at 3
    // bits) measured 242.7 against 241.9 tok/s at depth 0 (H100, one call: within the noise), the rest of the
    // first chunk then decoded by the main loop's first iteration, which is not unrolled. TRELLM_MOE_AHEAD=0..8.
    static const int ahead = decode_ahead_tiles("TRELLM_MOE_AHEAD", 0);
    a.ahead = ahead;
    const size_t smem_d = a.ring_bytes + 2 * (size_t((ci + p.s_d - 1) / p.s_d) * kChunk + 8) * 2 + size_t(a.ahead) * kDecodedTileBytes;
    if (gu_cluster) launch_clustered(gateup_decode_cluster_kernel, grid_gu, dim3(kThreads), smem_gu_cl, s, true, cl_gu, a);
    else launch(gateup_decode_kernel, grid_gu, dim3(kThreads), smem_gu, s, true, a);
    TRELLM_CUDA_LAUNCH_CHECK();
    launch(down_decode_kernel, dim3(p.J, gh, p.s_d), dim3(kThreads), smem_d, s, true, a);
    TRELLM_CUDA_LAUNCH_CHECK();
    return;
  }
  a.tile_rows = 16 * p.mt;
  const GroupedGemmFn grouped_gemm =
      m < kMoeSpecialMaxRows ? grouped_gemm_for(uniform_k, uniform_cb, p.mt) : grouped_gemm_for(0, -1, p.mt);
  const size_t gsmem = grouped_smem_bytes(p.mt);
  prep_kernel<<<1, 1024, 0, s>>>(a);
  TRELLM_CUDA_LAUNCH_CHECK();
  xform_moe_kernel<<<dim3(p.R, (p.hidden_p / kChunk + kWarps - 1) / kWarps), kThreads, 0, s>>>(a);
  TRELLM_CUDA_LAUNCH_CHECK();
  grouped_gemm<<<dim3(gi, p.max_tiles, 2), kThreads, gsmem, s>>>(
      a, a.a_gu, int64_t(p.R) * p.hidden_p, p.hidden_p, a.gu, int64_t(p.R) * p.inter_p, p.inter_p, 0, p.hidden_p / kChunk);
  TRELLM_CUDA_LAUNCH_CHECK();
  swiglu_xform_kernel<<<dim3(p.R, (p.inter_p / kChunk + kWarps - 1) / kWarps), kThreads, 0, s>>>(a);
  TRELLM_CUDA_LAUNCH_CHECK();
  grouped_gemm<<<dim3(gh, p.max_tiles, 1), kThreads, gsmem, s>>>(
      a, a.a_d, 0, p.inter_p, a.ys, 0, p.hidden_p, 2, p.inter_p / kChunk);
  TRELLM_CUDA_LAUNCH_CHECK();
  combine_kernel<<<m, kThreads, 0, s>>>(a);
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
