// Fast MLA attention on tensor cores (v2), GLM-4.7-Flash latent shapes: kv_rank 512, rope 64 (a cache row is
// 576 bf16 = c_kv | k_rope). Heads, nope and v are runtime values. Shapes outside that (the tiny fixtures)
// stay on the v1 kernels of kernels_attention.cu; the backend op decides (mla_fast_supported).
//
// Both forms here are the absorbed one (MQA-like): one shared 576-wide key and 512-wide value per cached token,
// (query, head) pairs flattened into rows and tiled on the MMA M dimension (32 rows per CTA):
//   Qb[r]   = bf16(W_UK[h]ᵀ q_nope[i,h] | q_rope[i,h])           r = i*heads + h
//   o_lat[r] = softmax_t((Qb[r]·cache[t]) * scale) · cache[t][:512]  over positions t <= pos[i] of row i's sequence
//   out[i, h*v:(h+1)*v] = W_UV[h] · o_lat[r]
// The cache is a paged pool (kv_pages.h): key tile j of a row group is block table entry j of the group's
// sequence (64 keys = one block). Row groups come in two kinds (Grouping): the rows of one sequence's run, 32
// (query, head) rows per CTA (a prompt chunk, or speculative rows: every CTA shares the sequence's keys), or one
// query row per CTA (decode rows of different sequences: `heads` rows + padding, each CTA its own table).
// Decode (n <= 16 rows, CUDA-graph captured with bound = capacity): the grid depends only on (n, heads,
// bound, SM count); every position is read from device memory, splits beyond the current position exit at
// once. Prefill (n >= 17; also a batch of 17+ decode rows, PerRow, which stays capturable): the projections are
// cuBLAS batched GEMMs issued by the backend op; this header gives the kernels around them.
//
// Framework-free: raw device pointers, sizes and a stream. Callers check shapes (CudaBackend::attention_mla).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <optional>

#include "backend/cuda/kv_pages.h"

namespace trellm::cuda::mla {

constexpr int kRank = 512;            // c_kv width = value width
constexpr int kRope = 64;             // k_rope width
constexpr int kWidth = kRank + kRope; // cache row / score dot length
constexpr int kRowsPerCta = 32;       // M rows per attention CTA (two m16 tiles: 20 heads + 12 padding at n = 1)
constexpr int kKeysPerTile = 64;      // keys per pipelined smem stage
constexpr int kMaxSplits = 1024;      // context splits per row group (combine keeps one weight per split in smem)
constexpr int kDecodeMaxRows = 16;    // query rows the decode projection kernels take (smem sized for this)
constexpr int kMaxNope = 256;         // q_lat kernel keeps <= 8 W_UK rows per thread
constexpr int kXDim = 256;            // expanded prefill: q/k head dim (nope + rope) and v head dim it takes
constexpr int kXMaxKeys = 16384;      // expanded prefill: most keys expanded at once (bf16 [keys, heads, nope + v]:
                                      // 294 MB at GLM's 20 heads); longer contexts run absorbed
static_assert(kKeysPerTile == kKvBlockTokens, "one key tile must be one cache block");

// How (query, head) rows are grouped into attention CTAs.
enum class Grouping {
  Run,     // all rows belong to one sequence (one run): 32 consecutive (query, head) rows per CTA
  PerRow,  // each query row its own sequence: a CTA = the `heads` rows of one query row (heads <= 32)
};

// True when the fast kernels cover these dims (kv_b must also be dense bf16; the backend checks that).
inline bool supported(int rank, int rope, int nope, int v) {
  return rank == kRank && rope == kRope && nope >= 1 && nope <= kMaxNope && v >= 1;
}

// Launch geometry and workspace layout for one call. Everything depends on host-side sizes only (n, heads,
// bound, SM count), never on positions: a captured graph stays valid at every position below bound.
struct Plan {
  int n = 0, heads = 0, rows = 0;  // rows = n * heads
  Grouping grouping = Grouping::Run;
  int group_rows = kRowsPerCta;    // (query, head) rows per CTA: 32 (Run) or heads (PerRow)
  int groups = 0;                  // ceil(rows / group_rows) row groups (attention grid x)
  int splits = 1;                  // context splits per group (attention grid y); 1: attention writes o_lat directly
  bool prefill = false;            // n > kDecodeMaxRows: cuBLAS projections, bf16 o_lat
  bool expanded = false;           // prefill in the expanded form (expanded_attend) instead of the absorbed one
  // One row group (one sequence's decode row at batch 1): the keys-on-M attention (mla_attend_decode.cu), and in
  // decode the split merge inside the output projection instead of the combine kernel. Off with
  // TRELLM_MLA_DECODE=v2 (the A/B baseline) and for several groups, where the rows-on-M kernel and the combine
  // are faster (bench/results/attention.md).
  bool keys_on_m = false;
  int bound = 0;
  // byte offsets into the workspace
  size_t qb = 0;      // bf16 [rows, 576]
  size_t q16 = 0;     // bf16 [n, heads, nope+rope]  (prefill: cuBLAS input)
  size_t olat = 0;    // f32 [rows, 512] (decode) or bf16 (prefill)
  size_t part_o = 0;  // bf16 [groups, splits, 32, 512]  (splits > 1)
  size_t part_ml = 0; // f32 [groups, splits, 32, 2]     (running max in log2 units, sum)
  size_t kvx = 0;     // bf16 [bound, heads, nope + v]    (expanded: K_nope | V per key and head)
  size_t seq_rows = 0;  // bf16 [bound, 576]               (expanded: the sequence's cache rows, contiguous)
  size_t bytes = 0;   // total workspace
};
// Prefill picks the expanded form when its dims fit (nope + 64 = v = 256), bound <= kXMaxKeys, and it costs
// fewer tensor-core MACs: expanding every key costs heads * (nope + v) * 512 per key; per (query, visible key,
// head) the absorbed form spends 576 + 512 MACs against nope + 64 + v, plus its two projections per query (the
// same heads * (nope + v) * 512). A causal prompt from position 0 always expands; a short chunk after a long
// prefix (n < ~400 at GLM dims) stays absorbed. PerRow plans are never expanded (the expansion is per sequence).
// force_expanded (CudaOptions::mla_prefill, for A/B measurements) overrides that choice wherever the expanded form
// applies; it never expands where allow_expanded is false or the dims do not fit.
Plan make_plan(int n, int heads, int nope, int v, int bound, int num_sms, Grouping grouping = Grouping::Run,
               bool allow_expanded = true, std::optional<bool> force_expanded = std::nullopt);

// Decode with the two steps before the attention folded into its first kernel (one launch fewer per layer):
// q arrives before RoPE (the q_lat kernel rotates q_rope while copying it), and one of its blocks writes the new
// cache rows, cache[pos[i]] = bf16([rms_norm(kv[i, :512], norm_w, eps) | rope(kv[i, 512:])]), which the attention
// kernel after it reads. The same arithmetic as the rope and cache-append kernels; rows land at their pool rows
// (Args::pages).
struct RopeAppend {
  const float* kv;          // [n, 576] f32
  const float* norm_w;      // [512]
  float eps;
  uint16_t* cache;          // the cache below, writable
  float theta;
};

// Everything one call needs. kv_b: bf16 [heads*(nope+v), 512], rows per head: W_UK[h] (nope) then W_UV[h] (v).
struct Args {
  float* out;               // [n, heads*v] f32
  const float* q;           // [n, heads, nope+64] f32, rope applied
  const uint16_t* cache;    // bf16 pool [blocks * 64, 576]
  const uint16_t* kv_b;     // bf16
  const int32_t* pos;       // [n] device; row i attends to positions [0, pos[i]] of its sequence
  KvPages pages;            // row i's block table: pages.table(i) (Grouping::Run: the same for every row)
  int n, heads, nope, v;
  float scale;              // softmax scale (1/16 for GLM)
  void* work;               // Plan::bytes, 256-byte aligned
  const RopeAppend* ra = nullptr;  // decode only: q before RoPE, cache rows appended by the first kernel
};

// Decode (n <= 16): q_lat kernel -> attention -> (combine) -> output projection, four launches with
// programmatic dependent launch (each kernel prefetches its kv_b rows before waiting on its predecessor).
// No allocation, no synchronisation: capturable.
void decode(const Args& a, const Plan& p, cudaStream_t s);

// Prefill pieces (n > 16); the backend op runs the two cuBLAS GEMMs between them:
//   prefill_prepare: q16 = bf16(q); Qb[:, 512:576] = bf16(q_rope)
//   [cuBLAS: Qb[:, :512] = W_UKᵀ q_nope, batched over heads]
//   attend: o_lat (bf16) via the tensor-core attention (+ combine when splits > 1)
//   [cuBLAS: out = W_UV o_lat, batched over heads]
void prefill_prepare(const Args& a, const Plan& p, cudaStream_t s);
void attend(const Args& a, const Plan& p, cudaStream_t s);

// Expanded prefill (Plan::expanded), one sequence:
//   gather_sequence: Plan::seq_rows[t] = the sequence's cache row at position t, t < bound (zeros past the run's
//                    last position, whose blocks the table need not have)
//   [cuBLAS: KVx = kv_b · c_kv of those rows, issued by the backend op]
//   expanded_attend: out = causal flash attention per head over K = [K_nope | k_rope] and V, with KVx (the
//                    workspace at Plan::kvx) holding kv_b[h] · c_kv[t] and k_rope read from Plan::seq_rows.
void gather_sequence(const Args& a, const Plan& p, cudaStream_t s);
void expanded_attend(const Args& a, const Plan& p, cudaStream_t s);

}  // namespace trellm::cuda::mla
