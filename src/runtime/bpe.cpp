#include "runtime/bpe.h"

#include <queue>

#include "core/error.h"

namespace trellm {

void MergeMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  slots_.assign(cap, Slot{kEmpty, 0, 0});
  mask_ = cap - 1;
  used_ = 0;
}

void MergeMap::insert(int32_t a, int32_t b, int32_t rank, int32_t new_id) {
  if ((used_ + 1) * 2 > slots_.size()) {
    std::vector<Slot> old;
    old.swap(slots_);
    reserve(std::max<size_t>(16, (used_ + 1) * 2));
    for (const Slot& s : old)
      if (s.key != kEmpty) insert(int32_t(s.key >> 32), int32_t(uint32_t(s.key)), s.rank, s.new_id);
  }
  uint64_t key = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
  for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.key == kEmpty) { s = Slot{key, rank, new_id}; used_++; return; }
    if (s.key == key) { s.rank = rank; s.new_id = new_id; return; }
  }
}

BpeModel::BpeModel(std::vector<int32_t> byte_ids, MergeMap merges,
                   std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> bytes_vocab,
                   bool ignore_merges, int32_t unk_id, bool fuse_unk)
    : byte_ids_(std::move(byte_ids)), merges_(std::move(merges)), bytes_vocab_(std::move(bytes_vocab)),
      ignore_merges_(ignore_merges), unk_id_(unk_id), fuse_unk_(fuse_unk) {}

void BpeModel::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    auto it = bytes_vocab_.find(piece);
    if (it != bytes_vocab_.end()) { out.push_back(it->second); return; }
  }
  if (piece.size() == 1) {  // the commonest piece: one byte, no merge possible
    merge(piece, out);
    return;
  }
  if (piece.size() <= kCacheMaxPiece) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t before = out.size();
  merge(piece, out);
  if (piece.size() <= kCacheMaxPiece) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() < kCacheCapacity)
      cache_.emplace(std::string(piece), std::vector<int32_t>(out.begin() + long(before), out.end()));
  }
}

void BpeModel::merge(std::string_view piece, std::vector<int32_t>& out) const {
  // Symbols live in arrays linked by prev/next; a merged-away symbol gets id -1.
  thread_local std::vector<int32_t> ids, prev, next, rank, merged;
  ids.clear();
  for (unsigned char b : piece) {
    int32_t id = byte_ids_[b];
    if (id < 0) {
      // HF: a character missing from the vocabulary becomes unk (fused if asked) or is dropped.
      if (unk_id_ < 0) continue;
      if (fuse_unk_ && !ids.empty() && ids.back() == unk_id_) continue;
      id = unk_id_;
    }
    ids.push_back(id);
  }
  const int n = int(ids.size());
  if (n == 0) return;
  prev.resize(size_t(n));
  next.resize(size_t(n));
  rank.resize(size_t(n));
  merged.resize(size_t(n));
  for (int i = 0; i < n; i++) {
    prev[size_t(i)] = i - 1;
    next[size_t(i)] = i + 1 < n ? i + 1 : -1;
  }
  auto pair_rank = [&](int i, int32_t& new_id) -> int32_t {
    int j = next[size_t(i)];
    int32_t r;
    if (j < 0 || !merges_.find(ids[size_t(i)], ids[size_t(j)], r, new_id)) return INT32_MAX;
    return r;
  };
  auto do_merge = [&](int i, int32_t new_id) {
    int j = next[size_t(i)];
    ids[size_t(i)] = new_id;
    ids[size_t(j)] = -1;
    next[size_t(i)] = next[size_t(j)];
    if (next[size_t(j)] >= 0) prev[size_t(next[size_t(j)])] = i;
  };

  if (n <= 48) {
    // Short pieces: keep each pair's rank in an array and scan for the minimum (leftmost on ties).
    for (int i = 0; i < n; i++) rank[size_t(i)] = pair_rank(i, merged[size_t(i)]);
    for (;;) {
      int best = -1;
      int32_t best_rank = INT32_MAX;
      for (int i = 0; i >= 0; i = next[size_t(i)])
        if (rank[size_t(i)] < best_rank) { best_rank = rank[size_t(i)]; best = i; }
      if (best < 0) break;
      do_merge(best, merged[size_t(best)]);
      rank[size_t(best)] = pair_rank(best, merged[size_t(best)]);
      if (prev[size_t(best)] >= 0) rank[size_t(prev[size_t(best)])] = pair_rank(prev[size_t(best)], merged[size_t(prev[size_t(best)])]);
    }
  } else {
    // Long pieces: a min-heap on (rank, position) with lazy deletion, as HF does.
    struct Entry { int32_t rank; int pos; int32_t new_id; };
    auto cmp = [](const Entry& a, const Entry& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
    std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> heap(cmp);
    for (int i = 0; i < n; i++) {
      int32_t nid, r = pair_rank(i, nid);
      if (r != INT32_MAX) heap.push({r, i, nid});
    }
    while (!heap.empty()) {
      Entry e = heap.top();
      heap.pop();
      if (ids[size_t(e.pos)] < 0 || next[size_t(e.pos)] < 0) continue;
      int32_t nid, r = pair_rank(e.pos, nid);
      if (r == INT32_MAX || nid != e.new_id) continue;  // stale entry
      do_merge(e.pos, nid);
      if (prev[size_t(e.pos)] >= 0 && (r = pair_rank(prev[size_t(e.pos)], nid)) != INT32_MAX)
        heap.push({r, prev[size_t(e.pos)], nid});
      if ((r = pair_rank(e.pos, nid)) != INT32_MAX) heap.push({r, e.pos, nid});
    }
  }
  for (int i = 0; i >= 0; i = next[size_t(i)]) out.push_back(ids[size_t(i)]);
}

}  // namespace trellm
