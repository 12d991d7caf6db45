// The block manager of the paged latent KV cache: a fixed pool of blocks of `block_tokens` cache rows, one block
// table per sequence (row p of a sequence lives in block table[p / block_tokens], backend.h kv_row), refcounts,
// and the prefix cache: full blocks that were computed once are kept under a hash of their whole prefix, so a
// later sequence with the same prefix (a shared system prompt, a preempted sequence coming back) reuses the rows
// instead of recomputing them. It knows tokens and block ids only: not the model, the backend or HTTP.
//
// Every block is in exactly one of three states:
//   free       refcount 0, not cached: on the free list, never holding rows anyone can find;
//   in use     refcount > 0 (= the number of block tables holding it), cached or not;
//   evictable  refcount 0, cached: its rows are kept for a future hit, on an LRU list; reserve() takes it back
//              (evicts it) only when the free list is empty, oldest release first.
// All storage is sized in the constructor; per call the only allocation is the growth of one sequence's table
// (and of the sequence map). Block ids handed out depend only on the sequence of calls, so runs are repeatable.
#pragma once
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

namespace trellm {

class BlockManager {
 public:
  using SeqId = int64_t;
  // Hash of one full block given its parent's hash (kRootHash for the first block) and its token ids. Only a
  // lookup accelerator: a hit is confirmed by comparing the token ids and the parent block, so a collision
  // costs a miss, never wrong rows. Injectable so tests can force collisions.
  using BlockHash = uint64_t (*)(uint64_t parent_hash, std::span<const int32_t> block_tokens);
  static constexpr uint64_t kRootHash = 0x5452454c4c4d4b56ull;  // "TRELLMKV": the parent of every first block
  // The default hash: a splitmix64-style mix over the parent hash and each token id in turn.
  static uint64_t chain_hash(uint64_t parent_hash, std::span<const int32_t> block_tokens);

  // A pool of `num_blocks` blocks of `block_tokens` rows (the engine passes kKvBlockTokens). With
  // prefix_caching off, begin() never hits and commit() caches nothing: every block is private to its sequence.
  BlockManager(int num_blocks, int block_tokens, bool prefix_caching = true, BlockHash hash = &chain_hash);

  int num_blocks() const { return num_blocks_; }
  int block_tokens() const { return block_tokens_; }
  bool prefix_caching() const { return prefix_caching_; }
  // ceil(tokens / block_tokens): the blocks a sequence of `tokens` positions occupies.
  int blocks_for(int64_t tokens) const;
  // Blocks reserve() can hand out now: free ones plus evictable cached ones.
  int free_blocks() const { return int(free_list_.size()) + lru_size_; }
  // Blocks with refcount > 0.
  int used_blocks() const { return num_blocks_ - free_blocks(); }

  // Starts sequence `seq` (which must not exist) over `tokens` (its prompt, or prompt + generated tokens of a
  // preempted sequence coming back). Takes a reference on the longest chain of cached full blocks matching the
  // prefix of `tokens`, capped so at most `max_cached_tokens` tokens are reused (the engine passes
  // tokens.size() - 1: the last token must be computed to get logits), and makes them the first entries of the
  // sequence's table. Returns the number of reused tokens, a multiple of block_tokens; rows [0, that) are valid.
  // Adds tokens.size() to prefix_query_tokens() and the result to prefix_hit_tokens().
  int64_t begin(SeqId seq, std::span<const int32_t> tokens, int64_t max_cached_tokens);
  // What begin(·, tokens, max_cached_tokens) would reuse now, without taking it: the same number of tokens, and in
  // *evictable_blocks (when given) how many of those blocks are evictable (refcount 0): begin() takes them off the
  // LRU, so they leave free_blocks(). Changes nothing and counts nothing (no metrics, no LRU order): a caller can
  // check that begin() + reserve() will succeed before it calls them.
  int64_t cached_prefix(std::span<const int32_t> tokens, int64_t max_cached_tokens,
                        int* evictable_blocks = nullptr) const;
  // Grows the table of `seq` to cover `total_tokens` positions (a smaller total is a no-op), taking free blocks
  // first, then evicting the least recently released cached blocks. All or nothing: when fewer than the needed
  // blocks are free it returns false and changes nothing (the scheduler then preempts or waits).
  bool reserve(SeqId seq, int64_t total_tokens);
  // After a forward: rows [0, computed) of `seq` now hold valid cache rows for tokens[0, computed) (`tokens` is
  // the sequence so far, at least `computed` long; computed <= the table's capacity). Each full block among them
  // not yet committed enters the prefix cache under (parent block, its token ids). If an identical block is
  // already cached (two sequences computed the same prefix at once) the existing entry is kept and this one stays
  // private (freed when `seq` releases it); the chain continues from the existing entry, so later blocks of
  // `seq` are still found. A block that is not full is never cached.
  void commit(SeqId seq, std::span<const int32_t> tokens, int64_t computed);
  // Shrinks the table of `seq` to the blocks covering `total_tokens` positions (a larger total is a no-op): the
  // blocks past them, reserved for rows that were computed but rejected (speculative drafts), go back to the free
  // list. They must be private and uncached (past the committed prefix), which they are when `total_tokens` is at
  // least the committed rows.
  void trim(SeqId seq, int64_t total_tokens);
  // Drops the references of `seq` (finished, cancelled or preempted) and forgets it. Cached blocks whose refcount
  // reaches 0 become evictable, the sequence's last block first, so a chain is evicted from its tail and its
  // shared head survives longest; uncached blocks go back to the free list.
  void release(SeqId seq);

  bool has(SeqId seq) const { return seqs_.count(seq) != 0; }
  // Pool block ids of `seq`, in position order (valid until the next call that changes `seq`).
  std::span<const int32_t> table(SeqId seq) const;
  // Number of tables holding `block`, and whether it is in the prefix cache (for tests and debugging).
  int refcount(int32_t block) const;
  bool is_cached(int32_t block) const;

  // Metrics. Hit rate = prefix_hit_tokens / prefix_query_tokens.
  int64_t prefix_query_tokens() const { return query_tokens_; }
  int64_t prefix_hit_tokens() const { return hit_tokens_; }
  int cached_blocks() const { return int(map_.size()); }  // in the prefix cache, in use or evictable
  int64_t evictions() const { return evictions_; }        // cached blocks reserve() took back
  // Drops every evictable cached block back to the free list (cached blocks in use stay cached). Not counted
  // as evictions.
  void clear_prefix_cache();

  // Aborts (TRELLM_ASSERT) naming the broken invariant: every block is exactly one of free / in use /
  // evictable; refcounts equal the number of tables holding the block; no table holds a block twice; the hash
  // map, the cached flags and the LRU list agree; blocks past a table's committed prefix are private and
  // uncached. O(pool + tables) and allocates: for tests.
  void check_invariants() const;

 private:
  struct Block {
    int32_t refcount = 0;
    bool cached = false;
    int32_t prev = -1, next = -1;  // LRU links while evictable
    uint64_t hash = 0;             // key in map_ while cached
    int32_t parent = -1;           // the cached block this one follows (-1: first block of a sequence)
    uint64_t parent_gen = 0;       // parent's gen when this block was cached: a later reuse of that id is no parent
    uint64_t gen = 0;              // bumped each time the block enters the cache
  };
  struct Seq {
    std::vector<int32_t> table;
    int64_t committed = 0;     // full blocks walked by begin/commit; the chain continues after them
    uint64_t hash = kRootHash; // chain hash after `committed` blocks
    int32_t parent = -1;       // the cached block the next committed block follows, and its gen
    uint64_t parent_gen = 0;
    bool chain_broken = false; // a hash collision at some block: nothing after it is cached
  };

  Seq& seq_ref(SeqId seq);
  const Seq& seq_ref(SeqId seq) const;
  const int32_t* block_token_ids(int32_t b) const { return &tokens_[size_t(b) * size_t(block_tokens_)]; }
  // Whether cached block b's parent is still the block it was cached under (false: b is an orphan, unreachable).
  bool parent_alive(int32_t b) const;
  // Whether cached block b continues the chain at (parent, parent_gen) with exactly these tokens.
  bool matches(int32_t b, int32_t parent, uint64_t parent_gen, const int32_t* tokens) const;
  // The chain of cached full blocks matching tokens' prefix, at most max_cached_tokens tokens: calls visit(block,
  // its chain hash) for each in order and returns the tokens they hold. Shared by begin() and cached_prefix().
  template <class Visit>
  int64_t walk_prefix(std::span<const int32_t> tokens, int64_t max_cached_tokens, Visit&& visit) const;
  void enter_cache(int32_t b, uint64_t hash, int32_t parent, uint64_t parent_gen, const int32_t* tokens);
  void leave_cache(int32_t b);  // drops b from map_; an evictable b also leaves the LRU for the free list
  void lru_push_back(int32_t b);
  void lru_remove(int32_t b);
  int32_t take_block();  // a free block, else the oldest evictable one; the caller checked free_blocks() > 0

  int num_blocks_;
  int block_tokens_;
  bool prefix_caching_;
  BlockHash hash_;
  std::vector<Block> blocks_;         // [num_blocks]
  std::vector<int32_t> tokens_;       // [num_blocks * block_tokens]: token ids of each cached block
  std::vector<int32_t> free_list_;    // a stack; the back is handed out next
  int32_t lru_head_ = -1, lru_tail_ = -1;  // head: released longest ago, evicted first
  int lru_size_ = 0;
  std::unordered_map<uint64_t, int32_t> map_;  // hash -> cached block
  std::unordered_map<SeqId, Seq> seqs_;
  int64_t query_tokens_ = 0, hit_tokens_ = 0, evictions_ = 0;
};

}  // namespace trellm
