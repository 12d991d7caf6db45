// Launch planning and workspace layout for the trellis kernels (internal, host side).
#pragma once
#include <cuda_fp16.h>

#include <cstddef>
#include <functional>

namespace trellm::cuda::tk {

constexpr int kGemvMaxRows = kTrellisGemvMaxRows;
constexpr int kGemmSmallMaxRows = 32;         // m <= 32: GEMM blocks of 32 rows (2 M sub-tiles)               // m <= 8: fused GEMV; above: xform + tensor-core GEMM
constexpr int kGemvMaxABytes = 48 * 1024;     // GEMV's x_h slice in shared memory (bounds the k range per block)
constexpr size_t kLinearCounterBytes = 16384; // fixed counter area at the workspace start (4096 groups)

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct LinearPlan {
  bool gemv = true;
  int groups = 0, chunks = 0, splits = 1, mchunks = 1, a_pitch = 0;
  int mt = 8;  // GEMM: 16-row M sub-tiles per block (2 for m <= 32, else 8)
  size_t partial_floats = 0, xh_halves = 0;
  int counters = 0;
};

struct WorkspaceLayout {
  int* counters = nullptr;
  float* partial = nullptr;
  __half* xh = nullptr;
  size_t bytes = 0;
};

int sm_count();
// The number of k-splits closest to `want` (clamped to [1, chunks]) that gives every split the same number
// of chunks (ceil(chunks / splits) chunks each, so the last split is not the only long one).
int even_splits(int chunks, int want);
LinearPlan plan_linear(int m, int in_padded, int out_padded);
WorkspaceLayout linear_layout(const LinearPlan& p, void* ws);

// Split-k tails in thread-block clusters (the GEMV's, gate/up's): at most this many blocks a cluster (H100/H200's
// non-portable limit). Whether a kernel runs as clusters of `blocks`: 2 <= blocks <= cluster_max and `fits()`
// (asked once per kernel, cluster size and shared memory, then remembered).
constexpr int kMaxCluster = 16;
bool use_cluster(int blocks, int cluster_max, const void* kernel, size_t smem, const std::function<bool()>& fits);

// k tiles decoded before the PDL wait (0 .. kMaxDecodeAhead, gemv_decode_ahead) by the GEMV blocks and the MoE
// decode's down blocks: the environment variable `name` for A/B runs, else `otherwise`.
int decode_ahead_tiles(const char* name, int otherwise);

}  // namespace trellm::cuda::tk
