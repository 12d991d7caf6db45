// Host side of the dense trellis linear: planning (GEMV vs GEMM, k-splits), workspace layout, the runtime
// K -> template dispatch (default: fails loudly), and the input-transform kernel of the GEMM path.
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/trellis_linear.cuh"
#include "backend/cuda/trellis_plan.h"
#include "core/error.h"

namespace trellm::cuda {

namespace tk {

__global__ void __launch_bounds__(kThreads) xform_kernel(const LinearArgs p) {
  const int row = blockIdx.x, chunk = blockIdx.y * kWarps + (threadIdx.x >> 5);
  if (chunk >= p.w.in_padded / kChunk) return;
  xform_chunk_warp(const_cast<__half*>(p.xh) + int64_t(row) * p.w.in_padded + chunk * kChunk,
                   p.x + int64_t(row) * p.w.in, p.w.in, p.w.suh, chunk * kChunk);
}

int sm_count() {
  static const int n = [] {
    int dev = 0, v = 132;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    return v;
  }();
  return n;
}

int even_splits(int chunks, int want) {
  const int per = (chunks + std::clamp(want, 1, chunks) - 1) / std::clamp(want, 1, chunks);  // chunks per split
  return (chunks + per - 1) / per;
}

LinearPlan plan_linear(int m, int in_padded, int out_padded) {
  LinearPlan p;
  p.groups = out_padded / kGroupCols;
  p.chunks = in_padded / kChunk;
  const int sms = sm_count();
  if (m <= kGemvMaxRows) {
    p.gemv = true;
    p.mchunks = 1;
    // Up to one wave of 4 blocks per SM (64 registers, ≤ 57 KB of shared memory at K = 3: ncu showed the
    // v3 plan's ~2 blocks per SM leave the schedulers idle half the time, each warp issuing every 8.6 cycles),
    // with the same number of chunks in every block: 2048x1536 (12 groups, 16 chunks) -> 16 splits of 1;
    // 5120-wide o_proj (16 groups, 40 chunks) -> 20 splits of 2; lm_head (1210 groups) -> 1.
    int splits = even_splits(p.chunks, std::max(1, 4 * sms / p.groups));
    // A (x_h for the block's k range) must fit its shared-memory budget.
    const int max_nck = std::max(1, (kGemvMaxABytes / (2 * (m + 1)) - 8) / kChunk);  // m rows + the zero row
    splits = std::max(splits, (p.chunks + max_nck - 1) / max_nck);
    p.splits = std::min(splits, p.chunks);
    p.a_pitch = (p.chunks + p.splits - 1) / p.splits * kChunk + 8;
    p.partial_floats = size_t(p.splits) * m * out_padded;
    p.counters = p.groups;
    p.xh_halves = 0;
  } else {
    p.gemv = false;
    p.mt = m <= kGemmSmallMaxRows ? kMTSmall : kMT;
    p.mchunks = (m + p.mt * 16 - 1) / (p.mt * 16);
    const int base = p.groups * p.mchunks;
    // Split k only while the grid is under one wave (MT = 8: one block per SM, ~150 KB shared; MT = 2: two).
    const int wave = p.mt == kMT ? sms : 2 * sms;
    p.splits = base >= wave ? 1 : std::clamp(wave / base, 1, p.chunks);
    p.a_pitch = 0;
    p.partial_floats = p.splits > 1 ? size_t(p.splits) * m * out_padded : 0;
    p.counters = p.splits > 1 ? base : 0;
    p.xh_halves = size_t(m) * in_padded;
  }
  return p;
}

WorkspaceLayout linear_layout(const LinearPlan& p, void* ws) {
  WorkspaceLayout l;
  char* base = static_cast<char*>(ws);
  l.counters = reinterpret_cast<int*>(base);
  size_t off = kLinearCounterBytes;
  l.partial = reinterpret_cast<float*>(base + off);
  off += align256(p.partial_floats * 4);
  l.xh = reinterpret_cast<__half*>(base + off);
  off += align256(p.xh_halves * 2);
  l.bytes = off;
  return l;
}

}  // namespace tk

using namespace tk;

size_t trellis_workspace_bytes(int max_m, int max_in_padded, int max_out_padded) {
  TRELLM_ASSERT(max_m >= 1 && max_in_padded % 128 == 0 && max_out_padded % 128 == 0, "trellis_workspace_bytes: bad sizes");
  // The partial buffer's need is not monotonic in m (fewer rows -> more splits): take the maximum over the
  // plans a call with m <= max_m can make (one per GEMV m and per 128-row chunk count).
  size_t best = 0;
  auto consider = [&](int m) { best = std::max(best, linear_layout(plan_linear(m, max_in_padded, max_out_padded), nullptr).bytes); };
  for (int m = 1; m <= std::min(max_m, kGemvMaxRows); m++) consider(m);
  for (int mc = 1; mc * 128 < max_m + 128; mc++) consider(std::min(max_m, mc * 128));
  for (int m = kGemvMaxRows + 1; m <= std::min(max_m, kGemmSmallMaxRows); m += 16) consider(std::min(max_m, m + 15));
  return best;
}

void trellis_workspace_init(void* workspace, size_t bytes, cudaStream_t s) {
  TRELLM_CUDA_CHECK(cudaMemsetAsync(workspace, 0, bytes, s));
}

static void check_desc(const DeviceTrellis& w) {
  TRELLM_ASSERT(w.K >= 2 && w.K <= 8, "trellis kernels: K = ", w.K, " not supported (2..8)");
  TRELLM_ASSERT(w.codebook >= 0 && w.codebook <= 2, "trellis kernels: codebook ", w.codebook);
  TRELLM_ASSERT(w.in_padded % 128 == 0 && w.out_padded % 128 == 0 && w.in >= 1 && w.in <= w.in_padded &&
                    w.out >= 1 && w.out <= w.out_padded,
                "trellis kernels: bad dims in ", w.in, "/", w.in_padded, " out ", w.out, "/", w.out_padded);
}

int tk::decode_ahead_tiles(const char* name, int otherwise) {
  return std::clamp(env_int(name, otherwise), 0, kMaxDecodeAhead);
}

// k tiles of a GEMV block's first chunk decoded before its PDL wait (LinearArgs::ahead): the whole chunk (8);
// TRELLM_GEMV_AHEAD for A/B runs. H100, 2026-12-07, one call, depth 0: 248.5 tok/s with 8, 244.3 with none, 241.9
// with 4. Half a chunk loses: the other half is then decoded in the main loop's first iteration, which is not
// unrolled. Only tiles of at most 4 chunks: the lm_head's single split of 16 chunks lost more to the shared memory
// (2 blocks a SM instead of 4 at 6 bits) than it gained: 178 against 160 µs a step.
static int gemv_ahead(const LinearPlan& p) {
  static const int n = decode_ahead_tiles("TRELLM_GEMV_AHEAD", kMaxDecodeAhead);
  return (p.chunks + p.splits - 1) / p.splits <= 4 ? n : 0;
}

bool tk::use_cluster(int blocks, int cluster_max, const void* kernel, size_t smem, const std::function<bool()>& fits) {
  if (blocks < 2 || blocks > std::min(cluster_max, kMaxCluster)) return false;
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, bool> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, blocks, smem);
  auto it = known.find(key);
  if (it == known.end()) it = known.emplace(key, fits()).first;
  return it->second;
}

// The GEMV's split-k tail in a cluster of its splits (gemv_cluster_kernel) where they are at most
// TRELLM_GEMV_CLUSTER (default 16; 0: the ticket and L2 tail everywhere, the A/B baseline). Read at every launch,
// so tests can compare the two tails in one process. Measured 268.3 against 262.2 tok/s at depth 0 (H100,
// 2026-12-07, three rounds each). Replanning o_proj's 20 splits to 14 so that it clusters too measured 261.1
// (fewer splits cost more than its tail saves), and clusters of 8 with that replan 241.2: neither is offered.
static int gemv_cluster_max() { return std::clamp(env_int("TRELLM_GEMV_CLUSTER", kMaxCluster), 0, kMaxCluster); }

// The fused GEMV behind trellis_matmul (m <= 8), trellis_matmul_pair (w2/y2: a second product of the same input,
// its column groups after w's) and trellis_matmul_normed (norm_w: the input RMS-normalised in the prologue).
static void run_gemv(const DeviceTrellis& w, const DeviceTrellis* w2, const float* x, float* y, float* y2, int m,
                     const float* norm_w, float eps, void* workspace, cudaStream_t s) {
  const int out_all = w.out_padded + (w2 ? w2->out_padded : 0);
  const int cluster_max = gemv_cluster_max();
  const LinearPlan p = plan_linear(m, w.in_padded, out_all);
  TRELLM_ASSERT(p.gemv && size_t(p.counters) * 4 <= kLinearCounterBytes, "trellis GEMV: m = ", m, ", ", p.counters,
                " column groups (counter area: ", kLinearCounterBytes / 4, ")");
  const WorkspaceLayout l = linear_layout(p, workspace);
  LinearArgs a{w, x, l.xh, y, m, p.splits, p.a_pitch, l.partial, l.counters, w2 ? *w2 : w, w2 ? y2 : y,
               w.out_padded / kGroupCols, out_all, norm_w, eps};
  a.ahead = gemv_ahead(p);
  // TRELLM_GEMV_CLUSTER_MODE: 2 push (default; more than kClusterPushMaxRows rows: pull), 1 pull (A/B).
  a.cluster_mode = cluster_max >= 2 ? std::clamp(env_int("TRELLM_GEMV_CLUSTER_MODE", 2), 1, 2) : 0;
  if (a.cluster_mode == 2 && m > kClusterPushMaxRows) a.cluster_mode = 1;
  // ring, rows + a zero row, the k tiles decoded ahead
  const size_t smem = size_t(kStagesGemv) * 2048 * w.K + size_t(m + 1) * p.a_pitch * 2 + size_t(a.ahead) * kDecodedTileBytes;
  with_k(w.K, [&](auto kc) { launch_gemv<decltype(kc)::value>(a, smem, s, cluster_max); });
  TRELLM_CUDA_LAUNCH_CHECK();
}

void trellis_matmul(const DeviceTrellis& w, const float* x, float* y, int m, void* workspace, cudaStream_t s) {
  check_desc(w);
  TRELLM_ASSERT(m >= 1, "trellis_matmul: m = ", m);
  if (m <= kGemvMaxRows) return run_gemv(w, nullptr, x, y, nullptr, m, nullptr, 0.0f, workspace, s);
  const LinearPlan p = plan_linear(m, w.in_padded, w.out_padded);
  TRELLM_ASSERT(size_t(p.counters) * 4 <= kLinearCounterBytes, "trellis_matmul: ", p.counters, " column groups exceed the counter area");
  const WorkspaceLayout l = linear_layout(p, workspace);
  const LinearArgs a{w, x, l.xh, y, m, p.splits, p.a_pitch, l.partial, l.counters, w, y, p.groups, w.out_padded, nullptr, 0.0f};
  launch(xform_kernel, dim3(m, (p.chunks + kWarps - 1) / kWarps), dim3(kThreads), 0, s, false, a);  // no PDL: see launch_gemm
  TRELLM_CUDA_LAUNCH_CHECK();
  with_k(w.K, [&](auto kc) { launch_gemm<decltype(kc)::value>(a, p.mchunks, p.mt, s); });
  TRELLM_CUDA_LAUNCH_CHECK();
}

void trellis_matmul_pair(const DeviceTrellis& w1, const DeviceTrellis& w2, const float* x, float* y1, float* y2, int m,
                         void* workspace, cudaStream_t s) {
  check_desc(w1);
  check_desc(w2);
  TRELLM_ASSERT(m >= 1, "trellis_matmul_pair: m = ", m);
  if (m > kGemvMaxRows || w1.K != w2.K || w1.in_padded != w2.in_padded || w1.in != w2.in) {
    trellis_matmul(w1, x, y1, m, workspace, s);
    trellis_matmul(w2, x, y2, m, workspace, s);
    return;
  }
  run_gemv(w1, &w2, x, y1, y2, m, nullptr, 0.0f, workspace, s);
}

void trellis_matmul_normed(const DeviceTrellis& w, const float* x, const float* norm_w, float eps, float* y, int m,
                           void* workspace, cudaStream_t s) {
  check_desc(w);
  TRELLM_ASSERT(m >= 1 && m <= kGemvMaxRows, "trellis_matmul_normed: m = ", m, " (the fused norm is a GEMV prologue: m <= ",
                kGemvMaxRows, ")");
  run_gemv(w, nullptr, x, y, nullptr, m, norm_w, eps, workspace, s);
}

void trellis_dequantize_bf16(const DeviceTrellis& w, uint16_t* w_hf_bf16, cudaStream_t s) {
  check_desc(w);
  auto* out = reinterpret_cast<__nv_bfloat16*>(w_hf_bf16);
  with_k(w.K, [&](auto kc) { launch_dequant<decltype(kc)::value>(w, out, s); });
  TRELLM_CUDA_LAUNCH_CHECK();
}

}  // namespace trellm::cuda
