// Paged latent-cache fixtures for the CUDA tests (backend.h: kKvBlockTokens, kv_pool_row, Positions): sequences
// of given lengths laid out over a pool of 64-row blocks in a seeded random order, optionally sharing leading
// blocks (the prefix cache). Table entries past a sequence point far outside the pool and rows no sequence holds
// are NaN, so a kernel that ignores the table, reads past a sequence or reads a block it does not own fails.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/half.h"
#include "core/rng.h"

namespace trellm::test {

// A table entry past a sequence's blocks: pool row 2^30, far past any test pool (a read faults).
constexpr int32_t kUnusedBlock = 1 << 24;
constexpr uint16_t kBf16NaN = 0x7fc0;

struct PagedLayout {
  int blocks = 0;                // pool blocks
  int max_blocks = 0;            // table width
  std::vector<int> len;          // tokens per sequence
  std::vector<int32_t> tables;   // [sequences, max_blocks]
  std::vector<char> held;        // per pool row: 1 when some sequence holds a token there
  int sequences() const { return int(len.size()); }
  int64_t pool_rows() const { return int64_t(blocks) * kKvBlockTokens; }
  const int32_t* table(int s) const { return tables.data() + size_t(s) * max_blocks; }
  int64_t row(int s, int p) const { return kv_pool_row(table(s), p); }
};

// share: (s, a, k): sequence s's first k blocks are sequence a's (a < s, both at least k full blocks long).
struct Share {
  int seq, from, blocks;
};

// min_cols: table width at least this (a loose bound needs tables covering it; the entries past each sequence
// stay kUnusedBlock).
inline PagedLayout make_layout(const std::vector<int>& len, Rng& rng, const std::vector<Share>& share = {}, int min_cols = 0,
                               int spare = 3) {
  PagedLayout L;
  L.len = len;
  const int S = int(len.size());
  std::vector<int> nb(S), shared(S, 0);
  for (int s = 0; s < S; s++) nb[s] = (len[s] + kKvBlockTokens - 1) / kKvBlockTokens;
  for (const Share& sh : share) {
    TRELLM_ASSERT(sh.from < sh.seq && sh.blocks * kKvBlockTokens <= std::min(len[sh.seq], len[sh.from]), "bad share");
    shared[sh.seq] = sh.blocks;
  }
  int own = spare;
  for (int s = 0; s < S; s++) own += nb[s] - shared[s];
  L.blocks = own;
  L.max_blocks = std::max(*std::max_element(nb.begin(), nb.end()) + 2, min_cols);
  std::vector<int32_t> ids(static_cast<size_t>(own));
  std::iota(ids.begin(), ids.end(), 0);
  for (int i = own - 1; i > 0; i--) std::swap(ids[size_t(i)], ids[size_t(rng.next_u64() % uint64_t(i + 1))]);
  L.tables.assign(size_t(S) * L.max_blocks, kUnusedBlock);
  size_t next = 0;
  for (int s = 0; s < S; s++) {
    int32_t* t = L.tables.data() + size_t(s) * L.max_blocks;
    for (const Share& sh : share)
      if (sh.seq == s) std::copy(L.table(sh.from), L.table(sh.from) + sh.blocks, t);
    for (int b = shared[s]; b < nb[s]; b++) t[b] = ids[next++];
  }
  L.held.assign(size_t(L.pool_rows()), 0);
  for (int s = 0; s < S; s++)
    for (int p = 0; p < len[s]; p++) L.held[size_t(L.row(s, p))] = 1;
  return L;
}

// A bf16 pool [blocks * 64, width]: N(0,1) values in held rows, NaN elsewhere.
inline std::vector<uint16_t> make_pool(const PagedLayout& L, int width, Rng& rng) {
  std::vector<uint16_t> pool(size_t(L.pool_rows()) * width, kBf16NaN);
  for (int64_t r = 0; r < L.pool_rows(); r++)
    if (L.held[size_t(r)])
      for (int j = 0; j < width; j++) pool[size_t(r) * width + j] = f32_to_bf16(rng.normal());
  return pool;
}

// A step's rows: pos, seq and runs on the host (Positions over host data for the CPU twin).
struct StepRows {
  std::vector<int32_t> pos, seq;
  std::vector<int> runs;
  int n() const { return int(pos.size()); }
  // A decode row: the last token of sequence s.
  void decode(const PagedLayout& L, int s) {
    pos.push_back(L.len[s] - 1);
    seq.push_back(s);
    runs.push_back(1);
  }
  // A chunk: the last m tokens of sequence s (positions len - m .. len - 1), one run.
  void chunk(const PagedLayout& L, int s, int m) {
    for (int j = 0; j < m; j++) {
      pos.push_back(L.len[s] - m + j);
      seq.push_back(s);
    }
    runs.push_back(m);
  }
  int bound() const { return *std::max_element(pos.begin(), pos.end()) + 1; }
};

inline Positions host_positions(StepRows& r, PagedLayout& L, int bound) {
  Positions p;
  p.pos = TensorView(r.pos.data(), DType::I32, {r.n()});
  p.bound = bound;
  p.seq = TensorView(r.seq.data(), DType::I32, {r.n()});
  p.tables = TensorView(L.tables.data(), DType::I32, {L.sequences(), L.max_blocks});
  p.runs = r.runs;
  return p;
}

}  // namespace trellm::test
