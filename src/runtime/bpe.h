// The BPE model of byte-level tokenizers: symbols are bytes, merged pairwise by merge rank (lowest first,
// leftmost on ties) exactly like HF tokenizers' Word::merge_all. Results per piece are cached.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace trellm {

// Open-addressing map (id_a, id_b) -> (rank, merged id). Merge lookups dominate BPE time, and a flat table
// with linear probing is ~3x faster here than std::unordered_map.
class MergeMap {
 public:
  void reserve(size_t n);
  // Later inserts of the same pair overwrite earlier ones (as HF's HashMap collect does).
  void insert(int32_t a, int32_t b, int32_t rank, int32_t new_id);
  // Returns false when (a, b) has no merge.
  bool find(int32_t a, int32_t b, int32_t& rank, int32_t& new_id) const {
    if (slots_.empty()) return false;
    uint64_t key = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
    for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == kEmpty) return false;
      if (s.key == key) { rank = s.rank; new_id = s.new_id; return true; }
    }
  }

 private:
  struct Slot { uint64_t key; int32_t rank, new_id; };
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  static size_t hash(uint64_t k) { k *= 0x9E3779B97F4A7C15ull; return size_t(k ^ (k >> 29)); }
  std::vector<Slot> slots_;
  size_t mask_ = 0, used_ = 0;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

class BpeModel {
 public:
  // byte_ids[b]: the id of the single-byte token for byte b, or -1 if the vocabulary lacks it.
  // bytes_vocab: every vocabulary token whose text maps to bytes, keyed by those bytes (for ignore_merges).
  BpeModel(std::vector<int32_t> byte_ids, MergeMap merges,
           std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> bytes_vocab, bool ignore_merges,
           int32_t unk_id, bool fuse_unk);
  // Appends the ids of one pre-tokenized piece (raw bytes) to out.
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

 private:
  void merge(std::string_view piece, std::vector<int32_t>& out) const;
  std::vector<int32_t> byte_ids_;
  MergeMap merges_;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> bytes_vocab_;
  bool ignore_merges_;
  int32_t unk_id_;
  bool fuse_unk_;
  // Piece -> ids. Natural text repeats its words, so most pieces hit. Bounded: stops growing when full.
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
  static constexpr size_t kCacheCapacity = 1 << 17;
  static constexpr size_t kCacheMaxPiece = 64;
};

}  // namespace trellm
