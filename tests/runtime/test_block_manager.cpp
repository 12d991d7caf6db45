// The block manager on its own: accounting, all-or-nothing reserve, prefix hits and their cap, sharing, LRU
// eviction, hash collisions and orphaned chains, preemption, and a seeded random stress test that checks every
// reused row against what was written into it (a prefix fingerprint per row), so a wrong hit cannot pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "core/error.h"
#include "runtime/block_manager.h"

using trellm::BlockManager;

namespace {

// n tokens first, first+1, ...
std::vector<int32_t> iota_tokens(int n, int32_t first) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), first);
  return v;
}

std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<int32_t> table_of(const BlockManager& m, BlockManager::SeqId s) {
  auto t = m.table(s);
  return {t.begin(), t.end()};
}

// Begin + reserve + one forward over the whole of `tokens` + commit: how a prompt is prefilled in one chunk.
int64_t prefill(BlockManager& m, BlockManager::SeqId s, const std::vector<int32_t>& tokens) {
  const int64_t hit = m.begin(s, tokens, int64_t(tokens.size()) - 1);
  EXPECT_TRUE(m.reserve(s, int64_t(tokens.size())));
  m.commit(s, tokens, int64_t(tokens.size()));
  m.check_invariants();
  return hit;
}

}  // namespace

TEST(BlockManager, AccountingAndBlocksFor) {
  BlockManager m(10, 4);
  EXPECT_EQ(m.num_blocks(), 10);
  EXPECT_EQ(m.block_tokens(), 4);
  EXPECT_EQ(m.blocks_for(0), 0);
  EXPECT_EQ(m.blocks_for(1), 1);
  EXPECT_EQ(m.blocks_for(4), 1);
  EXPECT_EQ(m.blocks_for(5), 2);
  EXPECT_EQ(m.free_blocks(), 10);
  EXPECT_EQ(m.used_blocks(), 0);

  const auto t = iota_tokens(6, 100);
  EXPECT_EQ(m.begin(1, t, 5), 0);  // empty cache
  EXPECT_TRUE(m.has(1));
  EXPECT_FALSE(m.has(2));
  EXPECT_TRUE(m.table(1).empty());
  ASSERT_TRUE(m.reserve(1, 6));
  EXPECT_EQ(table_of(m, 1), (std::vector<int32_t>{0, 1}));  // fresh pool hands out ids in order
  EXPECT_EQ(m.used_blocks(), 2);
  EXPECT_EQ(m.free_blocks(), 8);
  ASSERT_TRUE(m.reserve(1, 8));  // still two blocks
  EXPECT_EQ(m.table(1).size(), 2u);
  ASSERT_TRUE(m.reserve(1, 3));  // shrinking is a no-op
  EXPECT_EQ(m.table(1).size(), 2u);
  ASSERT_TRUE(m.reserve(1, 9));
  EXPECT_EQ(table_of(m, 1), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(m.refcount(2), 1);
  m.check_invariants();

  m.release(1);
  EXPECT_FALSE(m.has(1));
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.free_blocks(), 10);
  EXPECT_EQ(m.cached_blocks(), 0);  // nothing was committed
  m.check_invariants();
}

TEST(BlockManager, ReserveIsAllOrNothing) {
  BlockManager m(5, 4);
  m.begin(1, iota_tokens(12, 0), 11);
  ASSERT_TRUE(m.reserve(1, 12));  // 3 blocks
  m.begin(2, iota_tokens(12, 50), 11);
  EXPECT_FALSE(m.reserve(2, 12));  // needs 3, 2 free
  EXPECT_TRUE(m.table(2).empty());
  EXPECT_EQ(m.free_blocks(), 2);
  m.check_invariants();
  ASSERT_TRUE(m.reserve(2, 4));
  EXPECT_FALSE(m.reserve(2, 13));  // has 1, needs 4: 3 more, 1 free
  EXPECT_EQ(m.table(2).size(), 1u);
  EXPECT_EQ(m.free_blocks(), 1);
  ASSERT_TRUE(m.reserve(2, 8));
  EXPECT_EQ(m.free_blocks(), 0);
  EXPECT_FALSE(m.reserve(2, 9));
  m.check_invariants();

  // Evictable cached blocks count as free.
  m.commit(1, iota_tokens(12, 0), 12);
  EXPECT_EQ(m.cached_blocks(), 3);
  m.release(1);
  EXPECT_EQ(m.free_blocks(), 3);
  EXPECT_FALSE(m.reserve(2, 24));  // 4 more needed
  EXPECT_EQ(m.evictions(), 0);     // a failed reserve evicts nothing
  EXPECT_EQ(m.cached_blocks(), 3);
  ASSERT_TRUE(m.reserve(2, 20));
  EXPECT_EQ(m.evictions(), 3);
  EXPECT_EQ(m.cached_blocks(), 0);
  m.check_invariants();
}

TEST(BlockManager, PrefixHitAfterCommitAndRelease) {
  BlockManager m(8, 4);
  const auto t = iota_tokens(10, 7);  // 2 full blocks + 2 tokens
  EXPECT_EQ(prefill(m, 1, t), 0);
  EXPECT_EQ(m.cached_blocks(), 2);  // the partial third block is not cached
  const auto first = table_of(m, 1);
  EXPECT_TRUE(m.is_cached(first[0]));
  EXPECT_TRUE(m.is_cached(first[1]));
  EXPECT_FALSE(m.is_cached(first[2]));
  m.release(1);
  EXPECT_EQ(m.free_blocks(), 8);
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.cached_blocks(), 2);
  m.check_invariants();

  EXPECT_EQ(m.begin(2, t, 9), 8);
  EXPECT_EQ(table_of(m, 2), (std::vector<int32_t>{first[0], first[1]}));
  EXPECT_EQ(m.used_blocks(), 2);
  EXPECT_EQ(m.prefix_query_tokens(), 20);
  EXPECT_EQ(m.prefix_hit_tokens(), 8);
  m.check_invariants();

  // A prompt that diverges inside the second block reuses only the first.
  auto u = t;
  u[5] = 999;
  EXPECT_EQ(m.begin(3, u, 9), 4);
  EXPECT_EQ(table_of(m, 3), (std::vector<int32_t>{first[0]}));
  EXPECT_EQ(m.refcount(first[0]), 2);
  // Diverging in the first token: nothing.
  auto w = t;
  w[0] = 998;
  EXPECT_EQ(m.begin(4, w, 9), 0);
  m.check_invariants();
}

TEST(BlockManager, MaxCachedTokensCapIsHonoured) {
  BlockManager m(8, 4);
  const auto t = iota_tokens(8, 0);  // exactly 2 full blocks
  prefill(m, 1, t);
  EXPECT_EQ(m.cached_blocks(), 2);
  m.release(1);
  // The engine passes size - 1: a prompt of k full blocks reuses k - 1, so its last token is computed.
  EXPECT_EQ(m.begin(2, t, 7), 4);
  EXPECT_EQ(m.table(2).size(), 1u);
  EXPECT_EQ(m.begin(3, t, 8), 8);
  EXPECT_EQ(m.begin(4, t, 3), 0);
  EXPECT_EQ(m.begin(5, t, 0), 0);
  EXPECT_EQ(m.begin(6, t, -1), 0);
  EXPECT_EQ(m.begin(7, t, 1000), 8);  // capped by the tokens themselves
  EXPECT_TRUE(m.table(4).empty());
  m.check_invariants();
}

TEST(BlockManager, PartialBlocksAreNeverShared) {
  BlockManager m(8, 4);
  auto t = iota_tokens(6, 0);
  m.begin(1, t, 5);
  ASSERT_TRUE(m.reserve(1, 8));
  m.commit(1, t, 6);
  EXPECT_EQ(m.cached_blocks(), 1);
  const auto a = table_of(m, 1);
  EXPECT_FALSE(m.is_cached(a[1]));

  // The same 6 tokens while 1 is live: the full block is shared, the partial one is not.
  EXPECT_EQ(m.begin(2, t, 6), 4);
  ASSERT_TRUE(m.reserve(2, 6));
  const auto b = table_of(m, 2);
  EXPECT_EQ(b[0], a[0]);
  EXPECT_NE(b[1], a[1]);
  EXPECT_EQ(m.refcount(a[1]), 1);
  m.check_invariants();

  // Completing the block later (a decode step) caches it.
  t.push_back(6);
  t.push_back(7);
  m.commit(1, t, 7);
  EXPECT_FALSE(m.is_cached(a[1]));
  m.commit(1, t, 8);
  EXPECT_TRUE(m.is_cached(a[1]));
  EXPECT_EQ(m.cached_blocks(), 2);
  m.check_invariants();

  // 2's partial block (tokens 4, 5) was never cached; 1's completed one is found.
  EXPECT_FALSE(m.is_cached(b[1]));
  m.release(2);
  EXPECT_EQ(m.refcount(b[1]), 0);
  EXPECT_EQ(m.begin(3, iota_tokens(8, 0), 8), 8);
  EXPECT_EQ(table_of(m, 3), a);
  m.check_invariants();
}

TEST(BlockManager, TwoLiveSequencesShareBlocks) {
  BlockManager m(8, 4);
  const auto t = iota_tokens(9, 30);
  EXPECT_EQ(prefill(m, 1, t), 0);
  EXPECT_EQ(prefill(m, 2, t), 8);
  const auto a = table_of(m, 1), b = table_of(m, 2);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0], a[0]);
  EXPECT_EQ(b[1], a[1]);
  EXPECT_NE(b[2], a[2]);
  EXPECT_EQ(m.refcount(a[0]), 2);
  EXPECT_EQ(m.refcount(a[1]), 2);
  EXPECT_EQ(m.used_blocks(), 4);
  m.check_invariants();

  m.release(1);
  EXPECT_EQ(m.refcount(a[0]), 1);
  EXPECT_TRUE(m.is_cached(a[0]));
  EXPECT_TRUE(m.is_cached(a[1]));
  EXPECT_EQ(m.used_blocks(), 3);  // a[2] went back, the shared two are still held by 2
  m.check_invariants();

  m.release(2);
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.free_blocks(), 8);
  EXPECT_EQ(m.cached_blocks(), 2);
  m.check_invariants();
}

TEST(BlockManager, EvictsLeastRecentlyReleasedFirst) {
  BlockManager m(3, 4);
  const auto ta = iota_tokens(4, 0), tb = iota_tokens(4, 10), tc = iota_tokens(4, 20);
  prefill(m, 1, ta);
  prefill(m, 2, tb);
  prefill(m, 3, tc);
  const int32_t ba = m.table(1)[0], bb = m.table(2)[0], bc = m.table(3)[0];
  // Released in the order c, a, b: c is the oldest, whatever the ids.
  m.release(3);
  m.release(1);
  m.release(2);
  EXPECT_EQ(m.free_blocks(), 3);
  EXPECT_EQ(m.cached_blocks(), 3);

  m.begin(10, iota_tokens(4, 100), 3);
  ASSERT_TRUE(m.reserve(10, 4));
  EXPECT_EQ(m.table(10)[0], bc);
  EXPECT_EQ(m.evictions(), 1);
  EXPECT_FALSE(m.is_cached(bc));
  m.check_invariants();
  ASSERT_TRUE(m.reserve(10, 8));
  EXPECT_EQ(m.table(10)[1], ba);
  EXPECT_EQ(m.evictions(), 2);
  m.check_invariants();

  // The evicted blocks no longer hit (their hashes left the map); b still does.
  EXPECT_EQ(m.begin(11, tc, 4), 0);
  EXPECT_EQ(m.begin(12, ta, 4), 0);
  EXPECT_EQ(m.begin(13, tb, 4), 4);
  EXPECT_EQ(m.table(13)[0], bb);
  m.check_invariants();
}

TEST(BlockManager, ChainIsEvictedFromItsTail) {
  BlockManager m(3, 4);
  const auto t = iota_tokens(8, 0);
  prefill(m, 1, t);
  const auto a = table_of(m, 1);
  m.release(1);
  m.begin(2, iota_tokens(4, 50), 3);
  ASSERT_TRUE(m.reserve(2, 8));  // the one free block, then one eviction
  EXPECT_EQ(m.table(2)[1], a[1]);  // the tail of the chain went first
  EXPECT_EQ(m.begin(3, t, 8), 4);  // its head still hits
  m.check_invariants();
}

namespace {
// Ignores the parent: identical token blocks at different depths collide, so only the parent check and the
// token comparison keep lookups right.
uint64_t tokens_only_hash(uint64_t, std::span<const int32_t> t) {
  uint64_t h = 0;
  for (int32_t x : t) h = h * 31 + uint64_t(uint32_t(x));
  return h;
}
uint64_t constant_hash(uint64_t, std::span<const int32_t>) { return 42; }
}  // namespace

TEST(BlockManager, HashCollisionNeverReturnsOtherTokens) {
  BlockManager m(8, 4, true, &constant_hash);
  const auto x = iota_tokens(4, 0), y = iota_tokens(4, 10);
  prefill(m, 1, x);
  EXPECT_EQ(m.cached_blocks(), 1);
  // y hashes like x: the token comparison turns the lookup into a miss.
  EXPECT_EQ(m.begin(2, y, 4), 0);
  ASSERT_TRUE(m.reserve(2, 4));
  m.commit(2, y, 4);
  EXPECT_EQ(m.cached_blocks(), 1);  // the slot is taken by a live chain: y stays private
  EXPECT_FALSE(m.is_cached(m.table(2)[0]));
  m.release(2);
  m.release(1);
  EXPECT_EQ(m.begin(3, y, 4), 0);
  EXPECT_EQ(m.begin(4, x, 4), 4);
  m.check_invariants();
}

TEST(BlockManager, SameTokensUnderAnotherParentNeverHit) {
  BlockManager m(8, 4, true, &tokens_only_hash);
  const auto p = iota_tokens(4, 0), q = iota_tokens(4, 10);
  prefill(m, 1, cat(p, q));
  EXPECT_EQ(m.cached_blocks(), 2);
  m.release(1);
  // q as a first block has the same hash as the cached q that follows p, but the wrong parent.
  EXPECT_EQ(m.begin(2, cat(q, p), 8), 0);
  EXPECT_EQ(m.begin(3, cat(p, q), 8), 8);
  m.check_invariants();
}

TEST(BlockManager, OrphanedBlockGivesWayToTheLiveChain) {
  BlockManager m(6, 4);
  const auto t = cat(cat(iota_tokens(4, 0), iota_tokens(4, 10)), {99});  // P | Q | r
  // Two sequences prefill the same prompt at once.
  EXPECT_EQ(m.begin(1, t, 8), 0);
  ASSERT_TRUE(m.reserve(1, 9));
  EXPECT_EQ(m.begin(2, t, 8), 0);
  ASSERT_TRUE(m.reserve(2, 9));
  EXPECT_EQ(table_of(m, 1), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(table_of(m, 2), (std::vector<int32_t>{3, 4, 5}));
  m.commit(1, t, 4);  // P in block 0
  m.commit(2, t, 4);  // P again: block 3 stays private, 2's chain goes on from block 0
  EXPECT_TRUE(m.is_cached(0));
  EXPECT_FALSE(m.is_cached(3));
  m.commit(2, t, 8);  // Q in block 4, under block 0
  EXPECT_TRUE(m.is_cached(4));
  EXPECT_EQ(m.cached_blocks(), 2);
  m.check_invariants();

  // Block 0 is evicted while 4 is still held: 4 becomes an orphan.
  m.release(1);
  m.begin(3, iota_tokens(12, 500), 11);
  ASSERT_TRUE(m.reserve(3, 12));
  EXPECT_EQ(m.evictions(), 1);
  EXPECT_FALSE(m.is_cached(0));
  m.release(3);
  m.release(2);
  EXPECT_TRUE(m.is_cached(4));
  EXPECT_EQ(m.begin(4, t, 8), 0);  // P is gone, so Q cannot be reached
  m.check_invariants();

  // Recomputing the prompt caches P again and replaces the orphan Q instead of being blocked by it.
  ASSERT_TRUE(m.reserve(4, 8));
  m.commit(4, t, 8);
  const auto fresh = table_of(m, 4);
  EXPECT_NE(fresh[1], 4);
  EXPECT_TRUE(m.is_cached(fresh[0]));
  EXPECT_TRUE(m.is_cached(fresh[1]));
  EXPECT_FALSE(m.is_cached(4));
  EXPECT_EQ(m.cached_blocks(), 2);
  m.check_invariants();
  m.release(4);
  EXPECT_EQ(m.begin(5, t, 8), 8);
  EXPECT_EQ(table_of(m, 5), fresh);
  m.check_invariants();
}

TEST(BlockManager, ReusedParentIdIsNotTheOldParent) {
  // The hash ignores the parent, so only the parent's identity (id and incarnation) separates Q-after-P from
  // Q-after-something-else that landed in P's old block.
  BlockManager m(6, 4, true, &tokens_only_hash);
  const auto p = iota_tokens(4, 0), q = iota_tokens(4, 10);
  const auto t = cat(cat(p, q), {99});
  m.begin(1, t, 8);
  ASSERT_TRUE(m.reserve(1, 9));  // 0 1 2
  m.begin(2, t, 8);
  ASSERT_TRUE(m.reserve(2, 9));  // 3 4 5
  m.commit(1, t, 4);             // P in block 0
  m.commit(2, t, 8);             // P duplicate; Q in block 4, under block 0
  ASSERT_TRUE(m.is_cached(4));
  m.release(1);
  // X | Y | P2 lands P2 in block 0 (evicted), now cached again under Y.
  const auto x = iota_tokens(4, 100), y = iota_tokens(4, 200), p2 = iota_tokens(4, 300);
  const auto xyp2 = cat(cat(x, y), p2);
  m.begin(3, xyp2, 11);
  ASSERT_TRUE(m.reserve(3, 12));
  ASSERT_EQ(table_of(m, 3), (std::vector<int32_t>{1, 2, 0}));
  m.commit(3, xyp2, 12);
  EXPECT_TRUE(m.is_cached(0));
  m.check_invariants();
  // Q's stored parent id is 0 again, but a different block-0 than the one Q was computed after.
  EXPECT_EQ(m.begin(4, cat(cat(xyp2, q), {1}), 16), 12);
  EXPECT_EQ(table_of(m, 4), (std::vector<int32_t>{1, 2, 0}));
  m.check_invariants();
}

TEST(BlockManager, DuplicateChainStopsWhenItsParentIsEvicted) {
  BlockManager m(6, 4);
  const auto t = cat(cat(iota_tokens(4, 0), iota_tokens(4, 10)), {99});
  m.begin(1, t, 8);
  ASSERT_TRUE(m.reserve(1, 9));
  m.begin(2, t, 8);
  ASSERT_TRUE(m.reserve(2, 9));
  m.commit(1, t, 4);
  m.commit(2, t, 4);  // duplicate of block 0
  m.release(1);
  m.begin(3, iota_tokens(12, 500), 11);
  ASSERT_TRUE(m.reserve(3, 12));  // evicts block 0, the parent 2's chain continues from
  m.commit(2, t, 8);              // Q would be unreachable: not cached
  EXPECT_FALSE(m.is_cached(m.table(2)[1]));
  EXPECT_EQ(m.cached_blocks(), 0);
  m.check_invariants();
}

TEST(BlockManager, PreemptedSequenceHitsItsCommittedBlocks) {
  BlockManager m(16, 4);
  auto t = iota_tokens(6, 200);
  prefill(m, 1, t);  // rows 0..5
  // Decode: each step samples a token and computes its row.
  for (int32_t g = 0; g < 5; g++) {
    t.push_back(300 + g);
    ASSERT_TRUE(m.reserve(1, int64_t(t.size())));
    m.commit(1, t, int64_t(t.size()));
    m.check_invariants();
  }
  t.push_back(400);  // sampled, its row not yet computed
  ASSERT_EQ(t.size(), 12u);
  const auto before = table_of(m, 1);
  m.release(1);  // preempted
  // Re-queued as prompt + generated: rows 0..7 (two full blocks, the second holding generated tokens) and
  // 8..10 are valid, but only full blocks come back.
  EXPECT_EQ(m.begin(2, t, int64_t(t.size()) - 1), 8);
  EXPECT_EQ(table_of(m, 2), (std::vector<int32_t>{before[0], before[1]}));
  m.check_invariants();
}

TEST(BlockManager, ClearPrefixCacheDropsOnlyEvictableBlocks) {
  BlockManager m(8, 4);
  const auto a = iota_tokens(8, 0), b = iota_tokens(4, 100);
  prefill(m, 1, a);
  prefill(m, 2, b);
  m.release(1);
  EXPECT_EQ(m.cached_blocks(), 3);
  m.clear_prefix_cache();
  EXPECT_EQ(m.cached_blocks(), 1);  // b's block is in use
  EXPECT_EQ(m.free_blocks(), 7);
  EXPECT_EQ(m.evictions(), 0);
  m.check_invariants();
  EXPECT_EQ(m.begin(3, a, 8), 0);
  EXPECT_EQ(m.begin(4, b, 4), 4);
  m.release(2);
  m.release(4);
  m.clear_prefix_cache();
  EXPECT_EQ(m.cached_blocks(), 0);
  EXPECT_EQ(m.begin(5, b, 4), 0);
  m.check_invariants();
}

TEST(BlockManager, PrefixCachingOffSharesNothing) {
  BlockManager m(8, 4, false);
  const auto t = iota_tokens(9, 0);
  EXPECT_EQ(prefill(m, 1, t), 0);
  EXPECT_EQ(prefill(m, 2, t), 0);
  EXPECT_EQ(m.cached_blocks(), 0);
  EXPECT_EQ(m.used_blocks(), 6);
  m.release(1);
  EXPECT_EQ(m.begin(3, t, 8), 0);
  EXPECT_EQ(m.prefix_hit_tokens(), 0);
  m.check_invariants();
}

TEST(BlockManager, CachedPrefixLooksUpWithoutTaking) {
  BlockManager m(8, 4);
  const auto a = iota_tokens(10, 0);  // two full blocks + 2
  prefill(m, 1, a);
  int ev = -1;
  EXPECT_EQ(m.cached_prefix(a, 9, &ev), 8);
  EXPECT_EQ(ev, 0);  // both blocks are held by sequence 1
  EXPECT_EQ(m.cached_prefix(a, 7, &ev), 4);  // the cap, as in begin()
  EXPECT_EQ(ev, 0);
  EXPECT_EQ(m.cached_prefix(iota_tokens(3, 0), 2), 0);  // no full block
  EXPECT_EQ(m.cached_prefix(cat(iota_tokens(4, 0), iota_tokens(4, 50)), 8, &ev), 4);  // the chain stops at b1
  EXPECT_EQ(ev, 0);
  const auto t1 = table_of(m, 1);
  prefill(m, 4, iota_tokens(4, 200));  // one full block, cached
  const int32_t b4 = m.table(4)[0];
  m.release(1);  // t1[2] (partial) is free; the LRU is t1[1], t1[0]
  m.release(4);  // then b4
  const int64_t q = m.prefix_query_tokens(), h = m.prefix_hit_tokens();
  EXPECT_EQ(m.cached_prefix(a, 9, &ev), 8);
  EXPECT_EQ(ev, 2);  // both evictable now: taking them removes them from free_blocks()
  EXPECT_EQ(m.cached_prefix(a, 9), 8);  // the count is optional
  EXPECT_EQ(m.prefix_query_tokens(), q);  // counts nothing
  EXPECT_EQ(m.prefix_hit_tokens(), h);
  EXPECT_EQ(m.free_blocks(), 8);
  m.check_invariants();
  // ...and leaves the LRU order alone (taking and giving back a's blocks would put them behind b4): the chain's
  // tail is still evicted first.
  m.begin(2, iota_tokens(4, 100), 3);
  ASSERT_TRUE(m.reserve(2, 4 * 6));  // the 5 free blocks, then one eviction
  EXPECT_EQ(m.evictions(), 1);
  EXPECT_FALSE(m.is_cached(t1[1]));
  EXPECT_TRUE(m.is_cached(t1[0]));
  EXPECT_TRUE(m.is_cached(b4));
  EXPECT_EQ(m.cached_prefix(a, 9, &ev), 4);
  EXPECT_EQ(ev, 1);
  // One hit block in use, one evictable: begin() takes exactly the evictable one off the free count.
  m.release(2);
  prefill(m, 3, iota_tokens(5, 0));  // holds t1[0] again
  EXPECT_EQ(m.cached_prefix(a, 9, &ev), 4);
  EXPECT_EQ(ev, 0);
  m.check_invariants();

  BlockManager off(8, 4, false);
  prefill(off, 1, a);
  off.release(1);
  EXPECT_EQ(off.cached_prefix(a, 9, &ev), 0);
  EXPECT_EQ(ev, 0);
}

TEST(BlockManagerDeathTest, MisuseAborts) {
  BlockManager m(4, 4);
  m.begin(1, iota_tokens(3, 0), 2);
  EXPECT_DEATH(m.begin(1, iota_tokens(3, 0), 2), "begun twice");
  EXPECT_DEATH(m.reserve(7, 4), "unknown sequence 7");
  EXPECT_DEATH(m.commit(1, iota_tokens(3, 0), 3), "past the table");
}

TEST(BlockManager, BadPoolShapeIsAnError) {
  EXPECT_THROW({ BlockManager bad(4, 0); }, trellm::Error);
  EXPECT_THROW({ BlockManager bad(-1, 4); }, trellm::Error);
}

// ---------------------------------------------------------------------------------------------------------------
// Stress: random begin / reserve / forward+commit / release / clear against a model of the cache rows. The
// "forward" writes, into each row it computes, a fingerprint of the token prefix that row depends on; every row
// begin() hands back must carry the fingerprint of the new sequence's own prefix.

namespace {

struct StressConfig {
  int num_blocks;
  int block_tokens;
  bool prefix_caching;
  BlockManager::BlockHash hash;
  uint32_t seed;
  int ops;
};

struct StressResult {
  std::vector<uint64_t> trace;  // one digest of every table per op: equal across runs iff block ids are
  int64_t hits = 0, evictions = 0, failed_reserves = 0, dup_or_collision_commits = 0;
};

// Void so ASSERT_* can return early (the caller checks HasFatalFailure).
void stress(const StressConfig& cfg, StressResult& res) {
  constexpr uint64_t kPoison = 0xdeadbeefdeadbeefull;
  const int B = cfg.block_tokens;
  BlockManager m(cfg.num_blocks, B, cfg.prefix_caching, cfg.hash);
  std::mt19937 rng(cfg.seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };

  // What a forward would leave in each pool row: the fingerprint of tokens[0..p] of the sequence that wrote it.
  std::vector<uint64_t> rows(size_t(cfg.num_blocks) * size_t(B), kPoison);
  auto fingerprint = [](const std::vector<int32_t>& t, int64_t p) {
    uint64_t f = 1469598103934665603ull;
    for (int64_t i = 0; i <= p; i++) f = (f ^ uint64_t(uint32_t(t[size_t(i)]))) * 1099511628211ull;
    return f;
  };
  auto row = [&](const std::vector<int32_t>& table, int64_t p) -> uint64_t& {
    return rows[size_t(table[size_t(p / B)]) * size_t(B) + size_t(p % B)];
  };

  struct Live {
    std::vector<int32_t> tokens;
    int64_t computed = 0;
  };
  std::map<BlockManager::SeqId, Live> live;  // ordered: picking "the k-th live sequence" is deterministic
  std::vector<std::vector<int32_t>> history;  // token lists of released sequences, to come back as if preempted
  // A few shared "system prompts" so prefixes repeat.
  std::vector<std::vector<int32_t>> families;
  for (int f = 0; f < 4; f++) {
    std::vector<int32_t> v(40);
    for (auto& x : v) x = uni(0, 1000);
    families.push_back(v);
  }
  BlockManager::SeqId next_id = 0;

  auto pick = [&]() {
    auto it = live.begin();
    std::advance(it, uni(0, int(live.size()) - 1));
    return it;
  };

  for (int op = 0; op < cfg.ops; op++) {
    const int kind = uni(0, 99);
    if ((kind < 20 && live.size() < 8) || live.empty()) {
      // begin: a new prompt off a family, or a released sequence coming back.
      std::vector<int32_t> t;
      if (!history.empty() && uni(0, 3) == 0) {
        t = history[size_t(uni(0, int(history.size()) - 1))];
      } else {
        const auto& fam = families[size_t(uni(0, 3))];
        const int len = uni(1, 36), shared = uni(0, len);
        t.assign(fam.begin(), fam.begin() + shared);
        while (int(t.size()) < len) t.push_back(uni(0, 3));  // a tiny alphabet: accidental repeats too
      }
      const int64_t cap = uni(0, 4) == 0 ? uni(-1, int(t.size()) + 2) : int64_t(t.size()) - 1;
      const BlockManager::SeqId id = next_id++;
      // The const look-up predicts begin() exactly and changes nothing.
      int evictable = -1;
      const int64_t q0 = m.prefix_query_tokens(), h0 = m.prefix_hit_tokens();
      const int64_t look = m.cached_prefix(t, cap, &evictable);
      EXPECT_EQ(m.prefix_query_tokens(), q0);
      EXPECT_EQ(m.prefix_hit_tokens(), h0);
      const int free_before_begin = m.free_blocks();
      const int64_t hit = m.begin(id, t, cap);
      EXPECT_EQ(hit, look) << "op " << op;
      EXPECT_EQ(m.free_blocks(), free_before_begin - evictable) << "op " << op;
      EXPECT_EQ(hit % B, 0);
      EXPECT_LE(hit, std::max<int64_t>(0, std::min<int64_t>(cap, int64_t(t.size()))));
      const auto table = table_of(m, id);
      EXPECT_EQ(int64_t(table.size()) * B, hit);
      for (int64_t p = 0; p < hit; p++)
        ASSERT_EQ(row(table, p), fingerprint(t, p)) << "op " << op << ": reused row " << p << " is wrong";
      res.hits += hit;
      live[id] = Live{t, hit};
    } else if (kind < 45) {
      // reserve: room for what is left of the prompt, or a chunk of it, or a few decode steps.
      auto it = pick();
      const Live& s = it->second;
      const int64_t total = uni(0, 1) ? int64_t(s.tokens.size()) + uni(0, 3) : s.computed + uni(1, 9);
      const auto before = table_of(m, it->first);
      const int free_before = m.free_blocks();
      const int64_t need = int64_t(m.blocks_for(total)) - int64_t(before.size());
      const bool ok = m.reserve(it->first, total);
      EXPECT_EQ(ok, need <= free_before) << "op " << op;
      const auto after = table_of(m, it->first);
      if (!ok) {
        res.failed_reserves++;
        EXPECT_EQ(after, before);
        EXPECT_EQ(m.free_blocks(), free_before);
      } else {
        EXPECT_EQ(int64_t(after.size()), std::max<int64_t>(int64_t(before.size()), m.blocks_for(total)));
        EXPECT_TRUE(std::equal(before.begin(), before.end(), after.begin()));
        EXPECT_EQ(m.free_blocks(), free_before - int(std::max<int64_t>(need, 0)));
        // A block just handed out holds nothing anyone may read.
        for (size_t j = before.size(); j < after.size(); j++)
          for (int r = 0; r < B; r++) rows[size_t(after[j]) * size_t(B) + size_t(r)] = kPoison;
      }
    } else if (kind < 80) {
      // A forward over the next rows the table has room for, then commit; a sequence that computed all its
      // tokens first samples one or more (decode, or a speculative accept).
      auto it = pick();
      Live& s = it->second;
      const auto table = table_of(m, it->first);
      if (s.computed == int64_t(s.tokens.size())) {
        const int g = uni(1, 3);
        for (int i = 0; i < g; i++) s.tokens.push_back(uni(0, 3));
      }
      const int64_t limit = std::min<int64_t>(int64_t(s.tokens.size()), int64_t(table.size()) * B);
      if (limit > s.computed) {
        const int64_t to = uni(int(s.computed) + 1, int(limit));
        for (int64_t p = s.computed; p < to; p++) {
          const int32_t b = table[size_t(p / B)];
          // Writing a shared or cached row would corrupt what another sequence reads.
          ASSERT_EQ(m.refcount(b), 1) << "op " << op;
          ASSERT_FALSE(m.is_cached(b)) << "op " << op;
          row(table, p) = fingerprint(s.tokens, p);
        }
        const int cached_before = m.cached_blocks();
        m.commit(it->first, s.tokens, to);
        const int64_t newly_full = to / B - s.computed / B;
        if (m.cached_blocks() - cached_before < newly_full) res.dup_or_collision_commits++;
        s.computed = to;
      }
    } else if (kind < 98) {
      auto it = pick();
      history.push_back(it->second.tokens);
      m.release(it->first);
      EXPECT_FALSE(m.has(it->first));
      live.erase(it);
    } else {
      const int free_before = m.free_blocks();
      m.clear_prefix_cache();
      EXPECT_EQ(m.free_blocks(), free_before);  // evictable became free: both count as allocatable
      for (int32_t b = 0; b < m.num_blocks(); b++) {
        if (m.is_cached(b)) {
          EXPECT_GT(m.refcount(b), 0) << "op " << op << ": block " << b << " left evictable";
        }
      }
    }

    m.check_invariants();
    // Used blocks are exactly the distinct blocks of the live tables.
    std::set<int32_t> held;
    uint64_t digest = 0;
    for (const auto& [id, s] : live) {
      for (int32_t b : m.table(id)) {
        held.insert(b);
        digest = digest * 1000003 + uint64_t(b) + 1;
      }
      digest = digest * 1000003 + uint64_t(id);
    }
    EXPECT_EQ(m.used_blocks(), int(held.size())) << "op " << op;
    EXPECT_EQ(m.used_blocks() + m.free_blocks(), m.num_blocks());
    if (!cfg.prefix_caching) {
      EXPECT_EQ(m.cached_blocks(), 0);
    }
    res.trace.push_back(digest);
    if (testing::Test::HasFatalFailure()) return;
  }

  for (const auto& [id, s] : live) m.release(id);
  m.check_invariants();
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.free_blocks(), m.num_blocks());
  m.clear_prefix_cache();
  EXPECT_EQ(m.cached_blocks(), 0);
  m.check_invariants();
  res.evictions = m.evictions();
  EXPECT_EQ(m.prefix_hit_tokens(), res.hits);
}

}  // namespace

TEST(BlockManagerStress, RandomOpsKeepInvariantsAndReuseOnlyMatchingRows) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(seed);
    StressResult r;
    stress({24, 4, true, &BlockManager::chain_hash, seed, 5000}, r);
    ASSERT_FALSE(HasFatalFailure());
    // The run must have exercised what it checks.
    EXPECT_GT(r.hits, 0);
    EXPECT_GT(r.evictions, 0);
    EXPECT_GT(r.failed_reserves, 0);
    EXPECT_GT(r.dup_or_collision_commits, 0);
  }
}

TEST(BlockManagerStress, CollidingHashStillReusesOnlyMatchingRows) {
  // A 2-bit hash: most commits collide, orphans and broken chains are common.
  auto weak = [](uint64_t parent, std::span<const int32_t> t) -> uint64_t {
    uint64_t s = parent;
    for (int32_t x : t) s += uint64_t(x);
    return s & 3;
  };
  for (uint32_t seed : {4u, 5u}) {
    SCOPED_TRACE(seed);
    StressResult r;
    stress({24, 4, true, weak, seed, 5000}, r);
    ASSERT_FALSE(HasFatalFailure());
    EXPECT_GT(r.hits, 0);
    EXPECT_GT(r.dup_or_collision_commits, 0);
  }
}

TEST(BlockManagerStress, OtherShapes) {
  for (auto cfg : {StressConfig{8, 1, true, &BlockManager::chain_hash, 6, 3000},
                   StressConfig{64, 8, true, &BlockManager::chain_hash, 7, 3000},
                   StressConfig{24, 4, false, &BlockManager::chain_hash, 8, 3000}}) {
    SCOPED_TRACE(cfg.seed);
    StressResult r;
    stress(cfg, r);
    ASSERT_FALSE(HasFatalFailure());
  }
}

TEST(BlockManagerStress, SameCallsGiveSameBlockIds) {
  const StressConfig cfg{24, 4, true, &BlockManager::chain_hash, 9, 2000};
  StressResult a, b;
  stress(cfg, a);
  stress(cfg, b);
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(a.trace, b.trace);
  EXPECT_EQ(a.trace.size(), 2000u);
}
