// MoE kernels over trellis experts (internal). K and the codebook are read from each expert's descriptor
// on the device (the host never sees ids or descriptors): every kernel switches once per block into a
// K-templated body (with_k, trellis_device.cuh), so one launch serves experts of different K.
#pragma once
#include "backend/cuda/trellis_device.cuh"

namespace trellm::cuda::tk {

struct MoeArgs {
  const DeviceTrellis* experts;  // [3E] gate, up, down
  const DeviceTrellis* shared;   // [3] or null
  int E, m, top_k, jpt;          // jpt: jobs per token = top_k + (shared != null)
  int hidden, inter, hidden_p, inter_p;
  const float* x;                // [m, hidden]
  const int* ids;                // [m, top_k]
  const float* wts;              // [m, top_k]
  float* out;                    // [m, hidden]
  // decode variant (one job per (token, slot))
  int s_gu, s_d;                 // k-splits of gate/up and of down
  int ring_bytes;                // shared memory of the weight ring: kStagesGemv stages of the largest K's chunk
  int ahead;                     // down: k tiles decoded before the wait (gemv_decode_ahead), after the A rows
  float* p_gu;                   // [J, 2, s_gu, inter_p]
  __half* a_d;                   // [J or R, inter_p]   down input, transformed
  float* p_d;                    // [J, s_d, hidden_p]
  int* cnt_gu;                   // [J, inter_p/128]
  int* cnt_d;                    // [m, hidden_p/128]
  // The residual step fused after the experts (MoeResidual; res_h null: none): the last column group of a token
  // to be stored (ticket cnt_r[token]) adds out into res_h and writes res_x = norm(res_h).
  float* res_h;
  const float* res_w;
  float res_eps;
  float* res_x;
  int* cnt_r;                    // [m]
  // prefill variant (rows grouped by expert)
  int R;                         // rows = m * jpt (routed rows first, then the shared expert's)
  int* row_token;                // [R]
  int* row_expert;               // [R]  (E = shared)
  int* pos;                      // [m * top_k] grouped row of (token, slot)
  int tile_rows;                 // rows per grouped tile: 16 * kMT, or 16 when experts average few rows
  int4* tiles;                   // [max_tiles] (expert, row0, rows, 0)
  int* n_tiles;
  __half* a_gu;                  // [2, R, hidden_p]
  float* gu;                     // [2, R, inter_p]
  float* ys;                     // [R, hidden_p]
};

__device__ __forceinline__ const DeviceTrellis* expert_desc(const MoeArgs& a, int e) {
  if (e == a.E) return a.shared;
  if (unsigned(e) >= unsigned(a.E)) __trap();  // a corrupt expert id: fail loudly, never read out of bounds
  return a.experts + 3 * e;
}
// Decode-variant job j -> (token, slot, descriptors).
__device__ __forceinline__ const DeviceTrellis* job_desc(const MoeArgs& a, int token, int slot) {
  return slot < a.top_k ? expert_desc(a, a.ids[token * a.top_k + slot]) : a.shared;
}

// The prefill's grouped GEMM: a double-buffered ring (2 stages, ≤ 100 KB at K = 8) so that two 8-warp blocks fit
// an SM (3 stages, 1 block per SM: 10 % of the tensor peak at 2K tokens, latency-bound).
constexpr int kGroupedStages = 2;

// Shared memory of the one-row GEMV bodies: the B ring (sized for the layer's largest K: 24 KB at K = 3, 64 KB
// at K = 8, which bounds blocks per SM), then the A row and the zero row.
constexpr size_t moe_ring_bytes(int max_k) { return size_t(kStagesGemv) * 2048 * size_t(max_k); }

__global__ void gateup_decode_kernel(const MoeArgs a);
__global__ void down_decode_kernel(const MoeArgs a);
// The same, launched in clusters of a (job, group)'s 2·s_gu blocks: the split-k tail pushed into the cluster's
// first block (cluster_push) instead of the partials, ticket and L2 reads.
__global__ void gateup_decode_cluster_kernel(const MoeArgs a);
// The grouped GEMM for experts that all have this K and codebook (k = 0 or -1 codebook: mixed, the generic
// kernel that reads K per tile), its shared-memory opt-in done.
using GroupedGemmFn = void (*)(const MoeArgs a, const __half* A, int64_t a_zstride, int lda, float* Y, int64_t y_zstride,
                               int ldy, int which_base, int chunks);
// mt: 16-row M sub-tiles per block, kMT (128-row tiles) or 1 (16-row tiles: a 4x smaller ring, 4 blocks per SM).
GroupedGemmFn grouped_gemm_for(int k, int codebook, int mt);
// Shared memory of a grouped block with mt sub-tiles (ring sized for K = 8, or the epilogue's f32 tile).
size_t grouped_smem_bytes(int mt);
// Routed rows per expert (on average) up to which the grouped GEMM takes 16-row tiles: below ~16 rows a 128-row
// tile is mostly zero-filled A and its 82 KB ring allows 2 blocks per SM, where 16-row tiles allow 4.
constexpr int kSmallTileMaxRowsPerExpert = 16;

}  // namespace trellm::cuda::tk
