#include "runtime/block_manager.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace trellm {

namespace {

// splitmix64's finalizer: a bijection on 64 bits with full avalanche, so chained block hashes of different
// prefixes collide only by chance (2^-64 per pair).
uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

}  // namespace

uint64_t BlockManager::chain_hash(uint64_t parent_hash, std::span<const int32_t> block_tokens) {
  uint64_t h = mix64(parent_hash + kGolden);
  for (int32_t t : block_tokens) h = mix64((h ^ uint64_t(uint32_t(t))) + kGolden);
  return h;
}

BlockManager::BlockManager(int num_blocks, int block_tokens, bool prefix_caching, BlockHash hash)
    : num_blocks_(num_blocks), block_tokens_(block_tokens), prefix_caching_(prefix_caching), hash_(hash) {
  if (num_blocks < 0) fail("BlockManager: num_blocks must be >= 0, got ", num_blocks);
  if (block_tokens <= 0) fail("BlockManager: block_tokens must be > 0, got ", block_tokens);
  if (hash == nullptr) fail("BlockManager: the block hash function is null");
  blocks_.resize(size_t(num_blocks));
  tokens_.resize(size_t(num_blocks) * size_t(block_tokens));
  // Pushed in reverse so the first reserve() gets blocks 0, 1, 2, ...
  free_list_.reserve(size_t(num_blocks));
  for (int b = num_blocks - 1; b >= 0; b--) free_list_.push_back(b);
  map_.reserve(size_t(num_blocks));
}

int BlockManager::blocks_for(int64_t tokens) const {
  TRELLM_ASSERT(tokens >= 0, "blocks_for(", tokens, ")");
  const int64_t n = (tokens + block_tokens_ - 1) / block_tokens_;
  TRELLM_ASSERT(n <= INT32_MAX, "blocks_for(", tokens, ") overflows");
  return int(n);
}

BlockManager::Seq& BlockManager::seq_ref(SeqId seq) {
  auto it = seqs_.find(seq);
  TRELLM_ASSERT(it != seqs_.end(), "unknown sequence ", seq);
  return it->second;
}

const BlockManager::Seq& BlockManager::seq_ref(SeqId seq) const {
  auto it = seqs_.find(seq);
  TRELLM_ASSERT(it != seqs_.end(), "unknown sequence ", seq);
  return it->second;
}

bool BlockManager::parent_alive(int32_t b) const {
  const Block& blk = blocks_[size_t(b)];
  if (blk.parent < 0) return true;
  const Block& p = blocks_[size_t(blk.parent)];
  return p.cached && p.gen == blk.parent_gen;
}

bool BlockManager::matches(int32_t b, int32_t parent, uint64_t parent_gen, const int32_t* tokens) const {
  const Block& blk = blocks_[size_t(b)];
  if (!blk.cached || blk.parent != parent) return false;
  if (parent >= 0 && blk.parent_gen != parent_gen) return false;
  return std::memcmp(block_token_ids(b), tokens, size_t(block_tokens_) * sizeof(int32_t)) == 0;
}

void BlockManager::lru_push_back(int32_t b) {
  Block& blk = blocks_[size_t(b)];
  blk.prev = lru_tail_;
  blk.next = -1;
  if (lru_tail_ >= 0) blocks_[size_t(lru_tail_)].next = b;
  else lru_head_ = b;
  lru_tail_ = b;
  lru_size_++;
}

void BlockManager::lru_remove(int32_t b) {
  Block& blk = blocks_[size_t(b)];
  if (blk.prev >= 0) blocks_[size_t(blk.prev)].next = blk.next;
  else lru_head_ = blk.next;
  if (blk.next >= 0) blocks_[size_t(blk.next)].prev = blk.prev;
  else lru_tail_ = blk.prev;
  blk.prev = blk.next = -1;
  lru_size_--;
}

void BlockManager::enter_cache(int32_t b, uint64_t hash, int32_t parent, uint64_t parent_gen,
                               const int32_t* tokens) {
  Block& blk = blocks_[size_t(b)];
  blk.cached = true;
  blk.gen++;
  blk.hash = hash;
  blk.parent = parent;
  blk.parent_gen = parent_gen;
  std::memcpy(&tokens_[size_t(b) * size_t(block_tokens_)], tokens, size_t(block_tokens_) * sizeof(int32_t));
  const bool inserted = map_.emplace(hash, b).second;
  TRELLM_ASSERT(inserted, "block ", b, " entered the prefix cache under a hash already taken");
}

void BlockManager::leave_cache(int32_t b) {
  Block& blk = blocks_[size_t(b)];
  map_.erase(blk.hash);
  blk.cached = false;
  if (blk.refcount == 0) {
    lru_remove(b);
    free_list_.push_back(b);
  }
}

int32_t BlockManager::take_block() {
  if (!free_list_.empty()) {
    const int32_t b = free_list_.back();
    free_list_.pop_back();
    return b;
  }
  const int32_t b = lru_head_;
  TRELLM_ASSERT(b >= 0, "take_block with no free or evictable block");
  lru_remove(b);
  map_.erase(blocks_[size_t(b)].hash);
  blocks_[size_t(b)].cached = false;
  evictions_++;
  return b;
}

template <class Visit>
int64_t BlockManager::walk_prefix(std::span<const int32_t> tokens, int64_t max_cached_tokens, Visit&& visit) const {
  if (!prefix_caching_) return 0;
  const int64_t cap = std::clamp<int64_t>(max_cached_tokens, 0, int64_t(tokens.size()));
  const int64_t max_blocks = cap / block_tokens_;
  uint64_t hash = kRootHash;
  int32_t parent = -1;
  uint64_t parent_gen = 0;
  int64_t n = 0;
  while (n < max_blocks) {
    const int32_t* t = tokens.data() + n * block_tokens_;
    const uint64_t h = hash_(hash, std::span<const int32_t>(t, size_t(block_tokens_)));
    auto it = map_.find(h);
    if (it == map_.end() || !matches(it->second, parent, parent_gen, t)) break;
    const int32_t b = it->second;
    visit(b, h);
    n++;
    hash = h;
    parent = b;
    parent_gen = blocks_[size_t(b)].gen;
  }
  return n * block_tokens_;
}

int64_t BlockManager::begin(SeqId seq, std::span<const int32_t> tokens, int64_t max_cached_tokens) {
  TRELLM_ASSERT(!has(seq), "sequence ", seq, " begun twice");
  Seq& s = seqs_[seq];
  query_tokens_ += int64_t(tokens.size());
  const int64_t hit = walk_prefix(tokens, max_cached_tokens, [&](int32_t b, uint64_t h) {
    Block& blk = blocks_[size_t(b)];
    if (blk.refcount == 0) lru_remove(b);
    blk.refcount++;
    s.table.push_back(b);
    s.committed++;
    s.hash = h;
    s.parent = b;
    s.parent_gen = blk.gen;
  });
  hit_tokens_ += hit;
  return hit;
}

int64_t BlockManager::cached_prefix(std::span<const int32_t> tokens, int64_t max_cached_tokens,
                                    int* evictable_blocks) const {
  int evictable = 0;
  const int64_t hit = walk_prefix(tokens, max_cached_tokens, [&](int32_t b, uint64_t) {
    if (blocks_[size_t(b)].refcount == 0) evictable++;
  });
  if (evictable_blocks) *evictable_blocks = evictable;
  return hit;
}

bool BlockManager::reserve(SeqId seq, int64_t total_tokens) {
  Seq& s = seq_ref(seq);
  const int64_t need = int64_t(blocks_for(total_tokens)) - int64_t(s.table.size());
  if (need <= 0) return true;
  if (need > free_blocks()) return false;
  for (int64_t i = 0; i < need; i++) {
    const int32_t b = take_block();
    blocks_[size_t(b)].refcount = 1;
    s.table.push_back(b);
  }
  return true;
}

void BlockManager::commit(SeqId seq, std::span<const int32_t> tokens, int64_t computed) {
  Seq& s = seq_ref(seq);
  TRELLM_ASSERT(computed >= 0 && computed <= int64_t(tokens.size()), "commit of ", computed,
                " rows with ", tokens.size(), " tokens (sequence ", seq, ")");
  TRELLM_ASSERT(computed <= int64_t(s.table.size()) * block_tokens_, "commit of ", computed,
                " rows past the table's ", s.table.size(), " blocks (sequence ", seq, ")");
  if (!prefix_caching_) return;
  const int64_t full = computed / block_tokens_;
  while (s.committed < full && !s.chain_broken) {
    const int32_t b = s.table[size_t(s.committed)];
    const int32_t* t = tokens.data() + s.committed * block_tokens_;
    TRELLM_ASSERT(!blocks_[size_t(b)].cached && blocks_[size_t(b)].refcount == 1, "block ", b,
                  " past the committed prefix of sequence ", seq, " is shared or cached");
    // The chain's parent is a block this sequence holds, except after a duplicate, where it is the existing
    // entry, which may have been evicted since: then nothing after it can be found again, so stop caching.
    if (s.parent >= 0) {
      const Block& p = blocks_[size_t(s.parent)];
      if (!p.cached || p.gen != s.parent_gen) {
        s.chain_broken = true;
        break;
      }
    }
    const uint64_t h = hash_(s.hash, std::span<const int32_t>(t, size_t(block_tokens_)));
    auto it = map_.find(h);
    if (it != map_.end()) {
      const int32_t e = it->second;
      if (matches(e, s.parent, s.parent_gen, t)) {
        // Computed twice at once: keep the existing entry, ours stays private; the chain goes on from it.
        s.hash = h;
        s.parent = e;
        s.parent_gen = blocks_[size_t(e)].gen;
        s.committed++;
        continue;
      }
      if (parent_alive(e)) {
        // A true hash collision: the slot belongs to another live chain. Leave ours (and what follows) uncached.
        s.chain_broken = true;
        break;
      }
      leave_cache(e);  // an orphan (its parent was evicted) that no lookup can reach: give the slot to ours
    }
    enter_cache(b, h, s.parent, s.parent_gen, t);
    s.hash = h;
    s.parent = b;
    s.parent_gen = blocks_[size_t(b)].gen;
    s.committed++;
  }
}

void BlockManager::trim(SeqId seq, int64_t total_tokens) {
  Seq& s = seq_ref(seq);
  const size_t keep = size_t(blocks_for(total_tokens));
  while (s.table.size() > keep) {
    const int32_t b = s.table.back();
    Block& blk = blocks_[size_t(b)];
    TRELLM_ASSERT(!blk.cached && blk.refcount == 1 && int64_t(s.table.size()) > s.committed, "trim of sequence ", seq,
                  " to ", total_tokens, " tokens reaches block ", b, ", which is shared or cached");
    blk.refcount = 0;
    free_list_.push_back(b);
    s.table.pop_back();
  }
}

void BlockManager::release(SeqId seq) {
  Seq& s = seq_ref(seq);
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) {
    Block& blk = blocks_[size_t(*it)];
    TRELLM_ASSERT(blk.refcount > 0, "block ", *it, " released with refcount ", blk.refcount);
    if (--blk.refcount > 0) continue;
    if (blk.cached) lru_push_back(*it);
    else free_list_.push_back(*it);
  }
  seqs_.erase(seq);
}

std::span<const int32_t> BlockManager::table(SeqId seq) const {
  const Seq& s = seq_ref(seq);
  return {s.table.data(), s.table.size()};
}

int BlockManager::refcount(int32_t block) const {
  TRELLM_ASSERT(block >= 0 && block < num_blocks_, "block id ", block, " out of [0, ", num_blocks_, ")");
  return blocks_[size_t(block)].refcount;
}

bool BlockManager::is_cached(int32_t block) const {
  TRELLM_ASSERT(block >= 0 && block < num_blocks_, "block id ", block, " out of [0, ", num_blocks_, ")");
  return blocks_[size_t(block)].cached;
}

void BlockManager::clear_prefix_cache() {
  while (lru_head_ >= 0) leave_cache(lru_head_);
}

void BlockManager::check_invariants() const {
  const size_t n = size_t(num_blocks_);
  TRELLM_ASSERT(blocks_.size() == n && tokens_.size() == n * size_t(block_tokens_));

  // Refcounts against the tables; no block twice in one table; the uncommitted tail is private.
  std::vector<int32_t> refs(n, 0);
  std::vector<int64_t> seen_in(n, -1);  // index of the last table that held the block
  int64_t table_index = 0;
  for (const auto& [id, s] : seqs_) {
    TRELLM_ASSERT(s.committed >= 0 && s.committed <= int64_t(s.table.size()), "sequence ", id, " committed ",
                  s.committed, " of ", s.table.size(), " blocks");
    for (size_t j = 0; j < s.table.size(); j++) {
      const int32_t b = s.table[j];
      TRELLM_ASSERT(b >= 0 && b < num_blocks_, "sequence ", id, " holds block id ", b);
      TRELLM_ASSERT(seen_in[size_t(b)] != table_index, "sequence ", id, " holds block ", b, " twice");
      seen_in[size_t(b)] = table_index;
      refs[size_t(b)]++;
      if (int64_t(j) >= s.committed)
        TRELLM_ASSERT(!blocks_[size_t(b)].cached && blocks_[size_t(b)].refcount == 1, "sequence ", id,
                      " block ", b, " past the committed prefix is cached or shared");
    }
    table_index++;
  }

  int free_count = 0, evictable_count = 0, cached_count = 0, used_count = 0;
  for (size_t b = 0; b < n; b++) {
    const Block& blk = blocks_[b];
    TRELLM_ASSERT(blk.refcount == refs[b], "block ", b, " refcount ", blk.refcount, " but ", refs[b],
                  " tables hold it");
    if (blk.cached) cached_count++;
    if (blk.refcount > 0) used_count++;
    else if (blk.cached) evictable_count++;
    else free_count++;
    if (blk.refcount > 0 || !blk.cached)
      TRELLM_ASSERT(blk.prev == -1 && blk.next == -1, "block ", b, " is linked into the LRU but not evictable");
  }

  // The free list holds exactly the free blocks, once each.
  std::vector<char> on_free(n, 0);
  for (int32_t b : free_list_) {
    TRELLM_ASSERT(b >= 0 && b < num_blocks_, "free list holds block id ", b);
    TRELLM_ASSERT(!on_free[size_t(b)], "block ", b, " is on the free list twice");
    on_free[size_t(b)] = 1;
    TRELLM_ASSERT(blocks_[size_t(b)].refcount == 0 && !blocks_[size_t(b)].cached, "block ", b,
                  " is on the free list but in use or cached");
  }
  TRELLM_ASSERT(int(free_list_.size()) == free_count, "free list has ", free_list_.size(), " blocks, ",
                free_count, " are free");

  // The LRU list holds exactly the evictable blocks, linked both ways.
  int walked = 0;
  int32_t prev = -1;
  for (int32_t b = lru_head_; b >= 0; b = blocks_[size_t(b)].next) {
    TRELLM_ASSERT(b < num_blocks_ && walked <= num_blocks_, "LRU list is corrupt (id ", b, " or a cycle)");
    TRELLM_ASSERT(blocks_[size_t(b)].prev == prev, "LRU back link of block ", b, " is wrong");
    TRELLM_ASSERT(blocks_[size_t(b)].refcount == 0 && blocks_[size_t(b)].cached, "block ", b,
                  " is on the LRU list but in use or uncached");
    prev = b;
    walked++;
  }
  TRELLM_ASSERT(prev == lru_tail_, "LRU tail is ", lru_tail_, ", the walk ends at ", prev);
  TRELLM_ASSERT(walked == lru_size_ && walked == evictable_count, "LRU list has ", walked, " blocks, size says ",
                lru_size_, ", ", evictable_count, " are evictable");
  TRELLM_ASSERT(free_count + evictable_count + used_count == num_blocks_);
  TRELLM_ASSERT(free_blocks() == free_count + evictable_count);

  // The hash map holds exactly the cached blocks, each under its own hash.
  TRELLM_ASSERT(int(map_.size()) == cached_count, "hash map has ", map_.size(), " entries, ", cached_count,
                " blocks are cached");
  for (const auto& [h, b] : map_) {
    TRELLM_ASSERT(b >= 0 && b < num_blocks_, "hash map holds block id ", b);
    TRELLM_ASSERT(blocks_[size_t(b)].cached && blocks_[size_t(b)].hash == h, "hash map entry of block ", b,
                  " disagrees with the block");
  }
  if (!prefix_caching_) TRELLM_ASSERT(cached_count == 0, "prefix caching is off but ", cached_count, " cached");
}

}  // namespace trellm
