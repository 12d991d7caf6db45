// The scheduler over a real BlockManager, driven the way the engine drives it: schedule() -> a pretend forward ->
// computed(step) -> append(id, token) for chunks that sample -> finish(id) at max tokens.
//
// The pretend forward is a fake KV cache that reads and writes rows through the sequence's block table: row p holds
// a fingerprint chained from row p-1 (as read from the cache) and token p, and the sampled token is a hash of every
// row of the sequence as read from the cache. So the tokens a sequence produces are a function of its whole history
// only when every row it reads (its own, reused prefix-cache rows, rows recomputed after a preemption) is right;
// the forward also checks each read row against the fingerprint of the tokens directly, to say which one is wrong.
// The harness checks after every step: the token budget, rows contiguous, decode rows first, one chunk per
// sequence, no chunk for a finished sequence, chunk starts, sample flags, FCFS admission, the latest arrival as
// victim, max_seqs, the block manager's invariants, and that a scheduler with work never plans an empty step.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "runtime/block_manager.h"
#include "runtime/scheduler.h"

using trellm::BlockManager;
using trellm::Scheduler;
using trellm::SchedulerConfig;
using SeqId = Scheduler::SeqId;

namespace {

constexpr int32_t kVocab = 50000;
constexpr uint64_t kRowRoot = 0x243f6a8885a308d3ull;
constexpr uint64_t kPoison = 0xdeadbeefdeadbeefull;

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// The cache row of position p, from the row before it and token p.
uint64_t row_value(uint64_t prev_row, int32_t token, int64_t p) {
  return mix(prev_row ^ mix(uint64_t(uint32_t(token)) + (uint64_t(p) << 32)));
}
// The next token from rows[0, n): depends on every row.
int32_t token_from_rows(const std::vector<uint64_t>& rows) {
  uint64_t h = 0;
  for (size_t i = 0; i < rows.size(); i++) h = mix(h ^ rows[i] ^ uint64_t(i));
  return int32_t(h % uint64_t(kVocab));
}
std::vector<uint64_t> reference_rows(const std::vector<int32_t>& t, size_t n) {
  std::vector<uint64_t> r(n);
  for (size_t p = 0; p < n; p++) r[p] = row_value(p == 0 ? kRowRoot : r[p - 1], t[p], int64_t(p));
  return r;
}
// What a sequence must produce: the model applied to its own history only.
std::vector<int32_t> reference_run(std::vector<int32_t> t, int64_t max_new) {
  for (int64_t i = 0; i < max_new; i++) t.push_back(token_from_rows(reference_rows(t, t.size())));
  return t;
}

std::vector<int32_t> tokens_from(int n, int32_t first) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; i++) v[size_t(i)] = first + i;
  return v;
}

struct Harness {
  struct Mirror {  // what the harness knows of a live sequence from the steps it saw
    std::vector<int32_t> prompt;
    int64_t max_new = 0, generated = 0;
    uint64_t arrival = 0;
    bool running = false;
    int64_t computed = 0;
    int64_t added_at = 0;
  };

  BlockManager bm;
  Scheduler sched;
  int bt;
  std::vector<uint64_t> kv;  // the fake cache: one value per pool row
  std::map<SeqId, Mirror> live;
  std::map<SeqId, std::vector<int32_t>> done;  // finished at max tokens: prompt + generated
  std::set<SeqId> cancelled;
  std::vector<SeqId> admitted_order;  // first chunks of sequences not running, in order
  std::vector<SeqId> preempted_order;
  int64_t steps = 0, max_wait = 0;
  uint64_t next_arrival = 0;
  int64_t max_steps_per_seq = 1 << 30;
  // Between the forward and computed(): may finish sequences of the step (cancellation during a step).
  std::function<void(const Scheduler::Step&)> mid_step;

  Harness(int blocks, int block_tokens, const SchedulerConfig& cfg, bool prefix = true)
      : bm(blocks, block_tokens, prefix), sched(bm, cfg), bt(block_tokens),
        kv(size_t(blocks) * size_t(block_tokens), kPoison) {}

  void add(SeqId id, std::vector<int32_t> prompt, int64_t max_new) {
    ASSERT_EQ(sched.refuse_reason(int64_t(prompt.size()), max_new), "");
    Mirror m;
    m.prompt = prompt;
    m.max_new = max_new;
    m.arrival = next_arrival++;
    m.added_at = steps;
    live[id] = m;
    sched.add(id, std::move(prompt), max_new);
    EXPECT_TRUE(sched.has(id));
  }

  void cancel(SeqId id) {
    sched.finish(id);
    EXPECT_FALSE(sched.has(id));
    live.erase(id);
    cancelled.insert(id);
  }

  uint64_t& row(SeqId id, int64_t p) {
    const auto table = sched.table(id);
    EXPECT_LT(size_t(p / bt), table.size());
    return kv[size_t(table[size_t(p / bt)]) * size_t(bt) + size_t(p % bt)];
  }

  void check_plan(const Scheduler::Step& plan) {
    const SchedulerConfig& cfg = sched.config();
    EXPECT_LE(plan.rows, cfg.max_step_tokens) << "step " << steps << ": over the token budget";
    EXPECT_LE(int(plan.chunks.size()), cfg.max_seqs);
    EXPECT_LE(sched.running(), cfg.max_seqs) << "step " << steps;
    const std::set<SeqId> pre(plan.preempted.begin(), plan.preempted.end());
    EXPECT_EQ(pre.size(), plan.preempted.size()) << "step " << steps << ": preempted twice";
    std::set<SeqId> ids;
    int row = 0, decode_rows = 0;
    bool seen_prompt_chunk = false;
    std::vector<SeqId> admitted;
    for (const auto& c : plan.chunks) {
      ASSERT_TRUE(live.count(c.id)) << "step " << steps << ": chunk for finished or unknown sequence " << c.id;
      ASSERT_TRUE(sched.has(c.id));
      EXPECT_TRUE(ids.insert(c.id).second) << "step " << steps << ": two chunks of sequence " << c.id;
      EXPECT_FALSE(pre.count(c.id)) << "step " << steps << ": sequence " << c.id << " preempted and scheduled";
      EXPECT_EQ(c.row, row) << "step " << steps;
      EXPECT_GE(c.count, 1);
      row += c.count;
      const Mirror& m = live.at(c.id);
      const auto& toks = sched.tokens(c.id);
      EXPECT_LE(c.start + c.count, int64_t(toks.size()));
      EXPECT_EQ(c.sample, c.start + c.count == int64_t(toks.size())) << "step " << steps << " seq " << c.id;
      EXPECT_GE(int64_t(sched.table(c.id).size()) * bt, c.start + c.count) << "rows beyond the reserved blocks";
      const bool decode = m.running && m.computed == int64_t(toks.size()) - 1;
      if (decode) {
        EXPECT_FALSE(seen_prompt_chunk) << "step " << steps << ": decode row of " << c.id << " after a prompt chunk";
        EXPECT_EQ(c.count, 1);
        decode_rows++;
      } else {
        seen_prompt_chunk = true;
      }
      if (m.running) {
        EXPECT_EQ(c.start, m.computed) << "step " << steps << " seq " << c.id;
      } else {  // admission: from 0 or from a prefix-cache hit, always computing the newest token
        EXPECT_EQ(c.start % bt, 0) << "step " << steps << " seq " << c.id;
        EXPECT_LT(c.start, int64_t(toks.size()));
        admitted.push_back(c.id);
      }
    }
    EXPECT_EQ(row, plan.rows);
    // Every decoding sequence got its row or was preempted, unless decode rows used up the budget.
    for (const auto& [id, m] : live)
      if (m.running && m.computed == int64_t(sched.tokens(id).size()) - 1 && !ids.count(id) && !pre.count(id)) {
        EXPECT_EQ(decode_rows, cfg.max_step_tokens) << "step " << steps << ": decoding sequence " << id << " skipped";
      }
    // Victims: a preempted sequence was running, and every later arrival that was running is preempted too or
    // has a row in this step (the latest arrival not in the step goes first).
    for (SeqId v : plan.preempted) {
      ASSERT_TRUE(live.count(v));
      EXPECT_TRUE(live.at(v).running) << "step " << steps << ": preempted " << v << " was not running";
      for (const auto& [id, m] : live)
        if (m.running && m.arrival > live.at(v).arrival) {
          EXPECT_TRUE(pre.count(id) || ids.count(id))
              << "step " << steps << ": preempted " << v << " while the later " << id << " kept its blocks";
        }
    }
    // FCFS admission: the admitted are the head of the queue in arrival order (the queue holds the waiting and
    // this step's victims), in that order.
    std::vector<std::pair<uint64_t, SeqId>> queue;
    for (const auto& [id, m] : live)
      if (!m.running || pre.count(id)) queue.push_back({m.arrival, id});
    std::sort(queue.begin(), queue.end());
    ASSERT_LE(admitted.size(), queue.size());
    for (size_t i = 0; i < admitted.size(); i++)
      EXPECT_EQ(admitted[i], queue[i].second) << "step " << steps << ": admission out of arrival order";
  }

  void forward(const Scheduler::Step& plan) {
    for (const auto& c : plan.chunks) {
      const auto& toks = sched.tokens(c.id);
      // The rows this chunk attends to must hold what its own history would have put there.
      const auto ref = reference_rows(toks, size_t(c.start + c.count));
      for (int64_t p = 0; p < c.start; p++)
        if (row(c.id, p) != ref[size_t(p)]) {
          ADD_FAILURE() << "step " << steps << ": sequence " << c.id << " reads a wrong row " << p;
          break;
        }
      for (int64_t p = c.start; p < c.start + c.count; p++) {
        const int32_t b = sched.table(c.id)[size_t(p / bt)];
        EXPECT_EQ(bm.refcount(b), 1) << "writing a shared block";
        EXPECT_FALSE(bm.is_cached(b)) << "writing a cached block";
        row(c.id, p) = row_value(p == 0 ? kRowRoot : row(c.id, p - 1), toks[size_t(p)], p);
      }
    }
  }

  int32_t sample(SeqId id) {
    const int64_t n = int64_t(sched.tokens(id).size());
    std::vector<uint64_t> rows(static_cast<size_t>(n));
    for (int64_t p = 0; p < n; p++) rows[size_t(p)] = row(id, p);
    return token_from_rows(rows);
  }

  // One engine step. Returns the plan (checked).
  Scheduler::Step step() {
    const bool idle = sched.idle();
    Scheduler::Step plan = sched.schedule();
    EXPECT_EQ(plan.empty(), idle) << "step " << steps << ": " << (idle ? "a step while idle" : "an empty step with work");
    check_plan(plan);
    bm.check_invariants();
    if (testing::Test::HasFatalFailure()) return plan;
    forward(plan);
    if (mid_step) mid_step(plan);
    sched.computed(plan);
    for (SeqId v : plan.preempted) {
      Mirror& m = live.at(v);
      m.running = false;
      m.computed = 0;
      preempted_order.push_back(v);
    }
    for (const auto& c : plan.chunks) {
      if (!live.count(c.id)) continue;  // cancelled during the step
      Mirror& m = live.at(c.id);
      if (!m.running) admitted_order.push_back(c.id);
      m.running = true;
      m.computed = c.start + c.count;
    }
    for (const auto& c : plan.chunks) {
      if (!c.sample || !live.count(c.id)) continue;
      Mirror& m = live.at(c.id);
      sched.append(c.id, sample(c.id));
      if (++m.generated == m.max_new) {
        done[c.id] = sched.tokens(c.id);
        sched.finish(c.id);
        EXPECT_FALSE(sched.has(c.id));
        live.erase(c.id);
      }
    }
    bm.check_invariants();
    steps++;
    for (const auto& [id, m] : live) {
      max_wait = std::max(max_wait, steps - m.added_at);
      EXPECT_LE(steps - m.added_at, max_steps_per_seq) << "sequence " << id << " makes no progress";
    }
    return plan;
  }

  void run(int64_t max_steps = 10000) {
    for (int64_t i = 0; !sched.idle(); i++) {
      ASSERT_LT(i, max_steps) << "no end in sight";
      step();
      if (testing::Test::HasFatalFailure()) return;
    }
    EXPECT_TRUE(live.empty());
    EXPECT_EQ(bm.used_blocks(), 0);
    EXPECT_EQ(sched.running(), 0);
    EXPECT_EQ(sched.waiting(), 0);
  }
};

std::vector<int32_t> run_alone(int blocks, int bt, const SchedulerConfig& cfg, bool prefix,
                               const std::vector<int32_t>& prompt, int64_t max_new) {
  Harness h(blocks, bt, cfg, prefix);
  h.add(1, prompt, max_new);
  h.run();
  EXPECT_EQ(h.sched.preemptions(), 0);
  return h.done.count(1) ? h.done.at(1) : std::vector<int32_t>{};
}

const Scheduler::Chunk* chunk_of(const Scheduler::Step& s, SeqId id) {
  for (const auto& c : s.chunks)
    if (c.id == id) return &c;
  return nullptr;
}

}  // namespace

TEST(Scheduler, BudgetAndDecodeRowsFirst) {
  Harness h(64, 4, SchedulerConfig{8, 6, 0});
  for (SeqId id = 1; id <= 3; id++) h.add(id, tokens_from(2, int32_t(10 * id)), 10);
  // Step 1: the three prompts, 6 rows exactly.
  auto s = h.step();
  ASSERT_EQ(s.chunks.size(), 3u);
  EXPECT_EQ(s.rows, 6);
  for (int i = 0; i < 3; i++) {
    EXPECT_EQ(s.chunks[size_t(i)].id, SeqId(i + 1));
    EXPECT_EQ(s.chunks[size_t(i)].count, 2);
    EXPECT_TRUE(s.chunks[size_t(i)].sample);
  }
  // A long prompt arrives: the three decode rows come first, it gets the 3 rows left.
  h.add(4, tokens_from(20, 500), 2);
  s = h.step();
  ASSERT_EQ(s.chunks.size(), 4u);
  for (int i = 0; i < 3; i++) {
    EXPECT_EQ(s.chunks[size_t(i)].id, SeqId(i + 1));
    EXPECT_EQ(s.chunks[size_t(i)].count, 1);
    EXPECT_EQ(s.chunks[size_t(i)].start, 2);
    EXPECT_TRUE(s.chunks[size_t(i)].sample);
  }
  EXPECT_EQ(s.chunks[3].id, 4);
  EXPECT_EQ(s.chunks[3].start, 0);
  EXPECT_EQ(s.chunks[3].count, 3);
  EXPECT_FALSE(s.chunks[3].sample);
  EXPECT_EQ(s.rows, 6);
  s = h.step();
  ASSERT_EQ(s.chunks.size(), 4u);
  EXPECT_EQ(s.chunks[3].start, 3);
  EXPECT_EQ(s.chunks[3].count, 3);
  h.run();
  for (SeqId id = 1; id <= 4; id++) ASSERT_TRUE(h.done.count(id));
  EXPECT_EQ(h.done.at(1).size(), 12u);
  EXPECT_EQ(h.done.at(4).size(), 22u);
}

TEST(Scheduler, DecodeRowsAloneCanFillTheBudget) {
  Harness h(64, 4, SchedulerConfig{8, 2, 0});
  for (SeqId id = 1; id <= 3; id++) h.add(id, tokens_from(1, int32_t(id)), 4);
  auto s = h.step();  // 1 and 2 are admitted, the budget is spent
  ASSERT_EQ(s.chunks.size(), 2u);
  EXPECT_EQ(h.sched.waiting(), 1);
  s = h.step();  // two decode rows: 3 still waits
  ASSERT_EQ(s.chunks.size(), 2u);
  EXPECT_EQ(s.chunks[0].id, 1);
  EXPECT_EQ(s.chunks[1].id, 2);
  EXPECT_EQ(h.sched.waiting(), 1);
  h.run();
  EXPECT_EQ(h.done.size(), 3u);
}

TEST(Scheduler, ChunkedPrefillOfALongPrompt) {
  Harness h(64, 4, SchedulerConfig{8, 8, 0});
  const auto prompt = tokens_from(30, 1000);
  h.add(7, prompt, 3);
  const std::vector<std::pair<int64_t, int>> expect = {{0, 8}, {8, 8}, {16, 8}, {24, 6}, {30, 1}, {31, 1}};
  for (size_t i = 0; i < expect.size(); i++) {
    const auto s = h.step();
    ASSERT_EQ(s.chunks.size(), 1u) << "step " << i;
    EXPECT_EQ(s.chunks[0].start, expect[i].first) << "step " << i;
    EXPECT_EQ(s.chunks[0].count, expect[i].second) << "step " << i;
    EXPECT_EQ(s.chunks[0].sample, i >= 3) << "step " << i;  // only the last prompt chunk and the decode rows
    if (h.sched.has(7)) {  // blocks for exactly the rows so far
      EXPECT_EQ(int64_t(h.sched.table(7).size()), (s.chunks[0].start + s.chunks[0].count + 3) / 4) << "step " << i;
    }
  }
  EXPECT_TRUE(h.sched.idle());
  ASSERT_TRUE(h.done.count(7));
  EXPECT_EQ(h.done.at(7), reference_run(prompt, 3));
}

TEST(Scheduler, ChunkedPrefillSharesTheBudgetWithDecodeRows) {
  Harness h(64, 4, SchedulerConfig{8, 8, 0});
  h.add(1, tokens_from(3, 0), 8);
  h.step();
  h.add(2, tokens_from(20, 100), 2);
  std::vector<int64_t> starts;
  for (int i = 0; i < 3; i++) {
    const auto s = h.step();
    ASSERT_EQ(s.chunks.size(), 2u);
    EXPECT_EQ(s.chunks[0].id, 1);  // the decode row first
    EXPECT_EQ(s.chunks[0].count, 1);
    EXPECT_EQ(s.chunks[1].id, 2);
    starts.push_back(s.chunks[1].start);
    EXPECT_EQ(s.chunks[1].count, i < 2 ? 7 : 6);
    EXPECT_EQ(s.chunks[1].sample, i == 2);
  }
  EXPECT_EQ(starts, (std::vector<int64_t>{0, 7, 14}));
  h.run();
  EXPECT_EQ(h.done.at(1), reference_run(tokens_from(3, 0), 8));
  EXPECT_EQ(h.done.at(2), reference_run(tokens_from(20, 100), 2));
}

TEST(Scheduler, FcfsABigRequestAtTheHeadBlocksLaterSmallOnes) {
  // 8 blocks of 4 tokens. 1 holds 5 blocks while it runs; 2 needs 4 at once, 3 would fit in the 3 left.
  Harness h(8, 4, SchedulerConfig{8, 64, 0});
  h.add(1, tokens_from(17, 0), 4);
  h.add(2, tokens_from(16, 100), 4);
  h.add(3, tokens_from(2, 200), 2);
  auto s = h.step();
  ASSERT_EQ(s.chunks.size(), 1u);
  EXPECT_EQ(s.chunks[0].id, 1);
  EXPECT_EQ(h.bm.free_blocks(), 3);
  int64_t first_of_2 = -1, first_of_3 = -1;
  while (!h.sched.idle()) {
    const int64_t at = h.steps;
    const bool one_running = h.live.count(1) != 0;
    s = h.step();
    if (one_running) {
      EXPECT_EQ(chunk_of(s, 3), nullptr) << "3 overtook 2 at step " << at;
      EXPECT_EQ(chunk_of(s, 2), nullptr);
    }
    if (chunk_of(s, 2) && first_of_2 < 0) first_of_2 = at;
    if (chunk_of(s, 3) && first_of_3 < 0) first_of_3 = at;
  }
  EXPECT_GE(first_of_2, 1);
  EXPECT_GE(first_of_3, first_of_2);
  EXPECT_EQ(h.admitted_order, (std::vector<SeqId>{1, 2, 3}));
  EXPECT_EQ(h.sched.preemptions(), 0);
  EXPECT_EQ(h.done.size(), 3u);
}

TEST(Scheduler, MaxSeqsIsRespected) {
  Harness h(64, 4, SchedulerConfig{2, 64, 0});
  for (SeqId id = 1; id <= 5; id++) h.add(id, tokens_from(3, int32_t(id * 10)), int64_t(id));
  while (!h.sched.idle()) {
    const auto s = h.step();
    EXPECT_LE(h.sched.running(), 2);
    EXPECT_LE(s.chunks.size(), 2u);
    std::set<SeqId> running;
    for (const auto& [id, m] : h.live)
      if (m.running) running.insert(id);
    EXPECT_LE(running.size(), 2u);
  }
  EXPECT_EQ(h.admitted_order, (std::vector<SeqId>{1, 2, 3, 4, 5}));
  for (SeqId id = 1; id <= 5; id++) EXPECT_EQ(int64_t(h.done.at(id).size()), 3 + id);
}

TEST(Scheduler, PreemptsTheLatestArrivalAndRecomputesIt) {
  // 8 blocks of 4. Three prompts of 6 with 8 new tokens each need 4 blocks apiece at the end: 12 > 8.
  Harness h(8, 4, SchedulerConfig{8, 64, 0});
  std::vector<std::vector<int32_t>> prompts;
  for (SeqId id = 1; id <= 3; id++) {
    prompts.push_back(tokens_from(6, int32_t(100 * id)));
    h.add(id, prompts.back(), 8);
  }
  bool added_4 = false;
  int64_t preempted_at = -1, readmitted_at = -1, first_of_4 = -1;
  size_t tokens_at_preemption = 0;
  while (!h.sched.idle()) {
    const int64_t at = h.steps;
    const auto s = h.step();
    if (!s.preempted.empty() && preempted_at < 0) {
      preempted_at = at;
      EXPECT_EQ(s.preempted, (std::vector<SeqId>{3}));  // the latest arrival
      EXPECT_EQ(h.sched.waiting(), 1);
      tokens_at_preemption = h.sched.tokens(3).size();
      EXPECT_GT(tokens_at_preemption, prompts[2].size());  // it had generated tokens
      // A later arrival must queue behind it.
      h.add(4, tokens_from(2, 900), 2);
      added_4 = true;
    }
    if (const auto* c = chunk_of(s, 3); c && preempted_at >= 0 && at > preempted_at && readmitted_at < 0) {
      readmitted_at = at;
      // Recomputed from 0, or from what survived in the prefix cache, through its generated tokens.
      EXPECT_EQ(c->start % 4, 0);
      EXPECT_EQ(c->start + c->count, int64_t(tokens_at_preemption));
      EXPECT_TRUE(c->sample);
      EXPECT_EQ(h.sched.tokens(3).size(), tokens_at_preemption + 1);  // and sampled the next one
    }
    if (chunk_of(s, 4) && first_of_4 < 0) first_of_4 = at;
  }
  ASSERT_TRUE(added_4);
  EXPECT_GE(readmitted_at, 0);
  EXPECT_GE(first_of_4, readmitted_at);
  EXPECT_GE(h.sched.preemptions(), 1);
  EXPECT_EQ(h.preempted_order.front(), 3);
  for (SeqId id = 1; id <= 3; id++) {
    ASSERT_TRUE(h.done.count(id));
    EXPECT_EQ(h.done.at(id).size(), 14u) << id;  // exactly max_new tokens
    EXPECT_EQ(h.done.at(id), reference_run(prompts[size_t(id - 1)], 8)) << id;
    EXPECT_EQ(h.done.at(id), run_alone(8, 4, SchedulerConfig{8, 64, 0}, true, prompts[size_t(id - 1)], 8)) << id;
  }
  EXPECT_EQ(h.done.at(4).size(), 4u);
}

TEST(Scheduler, PreemptedSequenceComesBackThroughThePrefixCache) {
  // 2's blocks survive its preemption (nothing needs them before it returns), so it restarts at its hit.
  Harness h(6, 4, SchedulerConfig{8, 64, 0});
  h.add(1, tokens_from(8, 0), 9);   // 8 + 8 rows at the end: 4 blocks
  h.add(2, tokens_from(8, 50), 6);  // 2 blocks for its prompt, a third at row 8, a fourth at 12 that 1 needs first
  int64_t start_again = -1;
  bool preempted = false;
  while (!h.sched.idle()) {
    const auto s = h.step();
    if (std::find(s.preempted.begin(), s.preempted.end(), 2) != s.preempted.end()) preempted = true;
    if (const auto* c = chunk_of(s, 2); c && preempted && start_again < 0) start_again = c->start;
  }
  ASSERT_TRUE(preempted);
  EXPECT_EQ(start_again, 8);  // the two full blocks came back
  EXPECT_GT(h.bm.prefix_hit_tokens(), 0);
  EXPECT_EQ(h.done.at(1), reference_run(tokens_from(8, 0), 9));
  EXPECT_EQ(h.done.at(2), reference_run(tokens_from(8, 50), 6));
}

TEST(Scheduler, PromptChunkWaitsAndStopsAdmission) {
  // 6 blocks of 4, 9 rows a step. 1 decodes (3 blocks at the end); 2 (later) prefills 8 rows a chunk. When 2's
  // second chunk needs 2 blocks and 1 is free, 2 waits: it does not preempt itself, and nobody after it (a new
  // small request that would fit in the free block) overtakes it.
  Harness h(6, 4, SchedulerConfig{8, 9, 0});
  h.add(1, tokens_from(8, 0), 5);
  h.step();  // 1's prompt: 2 blocks
  h.add(2, tokens_from(20, 100), 1);
  auto s = h.step();  // 1's decode row at 8 takes a third block, 2's first chunk two more
  ASSERT_NE(chunk_of(s, 2), nullptr);
  EXPECT_EQ(chunk_of(s, 2)->start, 0);
  EXPECT_EQ(chunk_of(s, 2)->count, 8);
  EXPECT_EQ(h.bm.free_blocks(), 1);
  s = h.step();  // [8, 16) needs 2 blocks: 2 waits
  EXPECT_EQ(chunk_of(s, 2), nullptr);
  ASSERT_EQ(s.chunks.size(), 1u);
  EXPECT_EQ(s.chunks[0].id, 1);
  EXPECT_TRUE(s.preempted.empty());
  EXPECT_TRUE(h.sched.has(2));
  EXPECT_EQ(h.sched.waiting(), 0);  // still running, holding its blocks
  h.add(3, tokens_from(1, 300), 1);  // fits in the free block
  s = h.step();
  EXPECT_EQ(chunk_of(s, 2), nullptr);
  EXPECT_EQ(chunk_of(s, 3), nullptr) << "3 overtook the waiting 2";
  EXPECT_TRUE(s.preempted.empty());
  EXPECT_EQ(h.bm.free_blocks(), 1);
  EXPECT_EQ(h.sched.waiting(), 1);
  s = h.step();  // 1's last row (12 tokens -> 13): it finishes
  EXPECT_FALSE(h.sched.has(1));
  s = h.step();  // 2 goes on at 8; then 3 is admitted
  ASSERT_NE(chunk_of(s, 2), nullptr);
  EXPECT_EQ(chunk_of(s, 2)->start, 8);
  h.run();
  EXPECT_EQ(h.sched.preemptions(), 0);
  EXPECT_EQ(h.admitted_order, (std::vector<SeqId>{1, 2, 3}));
  EXPECT_EQ(h.done.at(1), reference_run(tokens_from(8, 0), 5));
  EXPECT_EQ(h.done.at(2), reference_run(tokens_from(20, 100), 1));
  EXPECT_EQ(h.done.at(3), reference_run(tokens_from(1, 300), 1));
}

TEST(Scheduler, SameTokensAsRunningAlone) {
  struct Case {
    const char* name;
    int blocks, bt;
    SchedulerConfig cfg;
    bool prefix;
    bool shared_prefix;
    bool expect_preemption;
  };
  for (const Case& k : {Case{"roomy", 256, 4, {8, 16, 0}, true, false, false},
                        Case{"preempting", 10, 4, {6, 16, 0}, true, false, true},
                        Case{"prefix hits", 256, 4, {8, 16, 0}, true, true, false},
                        Case{"preempting with prefix hits", 12, 4, {6, 32, 0}, true, true, true},
                        Case{"preempting without prefix caching", 10, 4, {6, 16, 0}, false, true, true}}) {
    SCOPED_TRACE(k.name);
    std::mt19937 rng(42);
    auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    Harness h(k.blocks, k.bt, k.cfg, k.prefix);
    const auto system = tokens_from(12, 7000);
    std::map<SeqId, std::pair<std::vector<int32_t>, int64_t>> reqs;
    for (SeqId id = 1; id <= 12; id++) {
      std::vector<int32_t> p;
      if (k.shared_prefix) p.assign(system.begin(), system.begin() + uni(4, 12));
      for (int i = uni(1, 8); i > 0; i--) p.push_back(uni(0, 30000));
      const int64_t max_new = uni(1, std::min(12, 38 - int(p.size())));
      reqs[id] = {p, max_new};
    }
    // Arrivals spread over the first steps.
    SeqId next = 1;
    while (next <= 12 || !h.sched.idle()) {
      for (int i = uni(0, 2); i > 0 && next <= 12; i--, next++) h.add(next, reqs[next].first, reqs[next].second);
      if (!h.sched.idle()) h.step();
      ASSERT_FALSE(HasFatalFailure());
      ASSERT_LT(h.steps, 5000);
    }
    EXPECT_EQ(h.bm.used_blocks(), 0);
    if (k.expect_preemption) {
      EXPECT_GT(h.sched.preemptions(), 0);
    } else {
      EXPECT_EQ(h.sched.preemptions(), 0);
    }
    if (k.shared_prefix && k.prefix) {
      EXPECT_GT(h.bm.prefix_hit_tokens(), 0);
    }
    for (const auto& [id, r] : reqs) {
      ASSERT_TRUE(h.done.count(id)) << id;
      EXPECT_EQ(int64_t(h.done.at(id).size()), int64_t(r.first.size()) + r.second) << id;
      EXPECT_EQ(h.done.at(id), run_alone(k.blocks, k.bt, k.cfg, k.prefix, r.first, r.second)) << id;
      EXPECT_EQ(h.done.at(id), reference_run(r.first, r.second)) << id;
    }
  }
}

TEST(Scheduler, PrefixHitStartsAtTheCachedOffset) {
  Harness h(64, 4, SchedulerConfig{8, 64, 0});
  const auto prompt = tokens_from(10, 300);  // two full blocks + 2
  h.add(1, prompt, 5);
  h.step();  // 1's prompt is computed: its full blocks enter the prefix cache
  h.add(2, prompt, 5);
  const auto s = h.step();
  const auto* c = chunk_of(s, 2);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->start, 8);
  EXPECT_EQ(c->count, 2);
  EXPECT_TRUE(c->sample);
  EXPECT_EQ(h.sched.cached_prompt_tokens(2), 8);
  EXPECT_EQ(h.sched.cached_prompt_tokens(1), 0);
  EXPECT_EQ(h.sched.table(2)[0], h.sched.table(1)[0]);
  EXPECT_EQ(h.sched.table(2)[1], h.sched.table(1)[1]);
  EXPECT_NE(h.sched.table(2)[2], h.sched.table(1)[2]);
  EXPECT_EQ(h.bm.prefix_hit_tokens(), 8);
  EXPECT_EQ(h.bm.prefix_query_tokens(), 20);
  // A prompt of exactly two blocks reuses only one: its last token must be computed.
  h.add(3, tokens_from(8, 300), 1);
  const auto s3 = h.step();
  ASSERT_NE(chunk_of(s3, 3), nullptr);
  EXPECT_EQ(chunk_of(s3, 3)->start, 4);
  h.run();
  EXPECT_EQ(h.done.at(1), h.done.at(2));
  EXPECT_EQ(h.done.at(2), reference_run(prompt, 5));
  EXPECT_EQ(h.done.at(3), reference_run(tokens_from(8, 300), 1));
}

TEST(Scheduler, AdmissionCountsEvictableHitBlocksAndTouchesNothingWhenItWaits) {
  // A prompt whose two-block prefix is cached but evictable: taking it removes those two blocks from the free
  // count, so a third new block must come from elsewhere. Checked before begin(): while it cannot be admitted the
  // prefix-cache metrics do not move.
  for (int q_tokens : {4, 5}) {  // 1 takes one block (fits exactly) or two (one short)
    SCOPED_TRACE(q_tokens);
    BlockManager bm(5, 4);
    Scheduler s(bm, SchedulerConfig{8, 64, 0});
    const auto p = tokens_from(9, 0);
    s.add(1, p, 1);
    auto st = s.schedule();
    s.computed(st);
    s.append(1, 77);
    s.finish(1);  // its two full blocks stay cached, evictable
    ASSERT_EQ(bm.free_blocks(), 5);
    ASSERT_EQ(bm.cached_blocks(), 2);
    s.add(2, tokens_from(q_tokens, 500), 3);
    auto big = tokens_from(8, 0);  // p's first two blocks, then 7 more tokens: needs 2 new blocks
    for (int i = 0; i < 7; i++) big.push_back(900 + i);
    s.add(3, big, 1);
    const int64_t q0 = bm.prefix_query_tokens(), h0 = bm.prefix_hit_tokens();
    st = s.schedule();
    bm.check_invariants();
    if (q_tokens == 4) {
      // 4 free blocks: 1 takes one, 3 finds 2 evictable hits + 1 free + 1 free = room for its 2 new blocks.
      ASSERT_EQ(st.chunks.size(), 2u);
      EXPECT_EQ(st.chunks[1].id, 3);
      EXPECT_EQ(st.chunks[1].start, 8);
      EXPECT_EQ(st.chunks[1].count, 7);
      EXPECT_EQ(bm.free_blocks(), 0);
      EXPECT_EQ(bm.prefix_hit_tokens(), h0 + 8);
      EXPECT_EQ(s.cached_prompt_tokens(3), 8);
    } else {
      // 1 takes two: 3 free blocks, two of them 3's own hits. 3 waits, and nothing was counted.
      ASSERT_EQ(st.chunks.size(), 1u);
      EXPECT_EQ(st.chunks[0].id, 2);
      EXPECT_EQ(s.waiting(), 1);
      EXPECT_EQ(bm.prefix_query_tokens(), q0 + q_tokens);  // 2's admission only
      EXPECT_EQ(bm.prefix_hit_tokens(), h0);
      EXPECT_EQ(bm.cached_blocks(), 2);
      EXPECT_EQ(bm.evictions(), 0);
      // Several more failed attempts change nothing either.
      s.computed(st);
      s.append(2, 1);
      const int64_t q1 = bm.prefix_query_tokens();
      st = s.schedule();  // 2's decode row fits in its block; 3 still cannot come in
      ASSERT_EQ(st.chunks.size(), 1u);
      EXPECT_EQ(bm.prefix_query_tokens(), q1);
      EXPECT_EQ(bm.prefix_hit_tokens(), h0);
      s.computed(st);
      s.append(2, 2);
      s.finish(2);
      st = s.schedule();  // now it fits: begin() counts it once
      ASSERT_EQ(st.chunks.size(), 1u);
      EXPECT_EQ(st.chunks[0].id, 3);
      EXPECT_EQ(st.chunks[0].start, 8);
      EXPECT_EQ(bm.prefix_query_tokens(), q1 + 15);
      EXPECT_EQ(bm.prefix_hit_tokens(), h0 + 8);
    }
    bm.check_invariants();
  }
}

TEST(Scheduler, CancellationFreesBlocksAtOnce) {
  Harness h(16, 4, SchedulerConfig{1, 8, 0});  // one sequence at a time: the others wait
  h.add(1, tokens_from(20, 0), 4);
  h.add(2, tokens_from(5, 100), 6);
  h.step();  // 1: rows 0..7
  EXPECT_EQ(h.bm.used_blocks(), 2);
  EXPECT_EQ(h.sched.waiting(), 1);
  // Mid-prefill.
  h.cancel(1);
  EXPECT_EQ(h.bm.used_blocks(), 0);
  EXPECT_EQ(h.bm.free_blocks(), 16);
  EXPECT_EQ(h.sched.running(), 0);
  h.bm.check_invariants();
  // Mid-decode.
  h.add(3, tokens_from(3, 200), 5);
  for (int i = 0; i < 3; i++) h.step();  // 2: prefill + two decode rows
  ASSERT_TRUE(h.live.count(2));
  EXPECT_EQ(h.live.at(2).generated, 3);
  EXPECT_EQ(h.bm.used_blocks(), 2);
  h.cancel(2);
  EXPECT_EQ(h.bm.used_blocks(), 0);
  EXPECT_EQ(h.sched.running(), 0);
  // While waiting: 4 queued behind 3.
  h.add(4, tokens_from(3, 300), 5);
  h.step();  // 3 admitted
  EXPECT_EQ(h.sched.waiting(), 1);
  const int used = h.bm.used_blocks();
  h.cancel(4);
  EXPECT_EQ(h.sched.waiting(), 0);
  EXPECT_EQ(h.bm.used_blocks(), used);
  h.run();
  EXPECT_EQ(h.done.size(), 1u);
  EXPECT_EQ(h.done.at(3), reference_run(tokens_from(3, 200), 5));
  EXPECT_EQ(h.admitted_order, (std::vector<SeqId>{1, 2, 3}));
  h.cancel(99);  // unknown: a no-op
}

TEST(Scheduler, CancellationDuringAStepAndOfAPreemptedSequence) {
  Harness h(8, 4, SchedulerConfig{8, 64, 0});
  h.add(1, tokens_from(6, 0), 8);
  h.add(2, tokens_from(6, 100), 8);
  h.add(3, tokens_from(6, 200), 8);
  // Between the forward and computed(): 2 is cancelled; its chunk is dropped, its blocks are free at once.
  h.mid_step = [&](const Scheduler::Step& s) {
    if (chunk_of(s, 2) && h.steps == 1) {
      h.cancel(2);
      EXPECT_FALSE(h.bm.has(2));
    }
  };
  h.step();
  h.step();
  EXPECT_EQ(h.cancelled.count(2), 1u);
  h.mid_step = nullptr;
  // Preemption of 3 (the latest), then it is cancelled while it waits.
  h.add(4, tokens_from(6, 300), 8);
  bool cancelled_preempted = false;
  while (!h.sched.idle()) {
    const auto s = h.step();
    for (SeqId v : s.preempted)
      if (!cancelled_preempted && h.live.count(v)) {
        const int used = h.bm.used_blocks();
        EXPECT_FALSE(h.bm.has(v));
        h.cancel(v);
        EXPECT_EQ(h.bm.used_blocks(), used);
        cancelled_preempted = true;
      }
  }
  EXPECT_TRUE(cancelled_preempted);
  EXPECT_EQ(h.bm.used_blocks(), 0);
  EXPECT_EQ(h.done.count(1), 1u);
  EXPECT_EQ(h.done.at(1), reference_run(tokens_from(6, 0), 8));
}

TEST(Scheduler, RefuseReasonNamesTheNumbers) {
  BlockManager bm(8, 4);  // 32 tokens
  Scheduler whole(bm, SchedulerConfig{4, 16, 0});
  EXPECT_EQ(whole.config().max_context, 32);
  EXPECT_EQ(whole.refuse_reason(30, 2), "");
  EXPECT_EQ(whole.refuse_reason(32, 0), "");
  const std::string big = whole.refuse_reason(30, 3);
  EXPECT_NE(big.find("33"), std::string::npos) << big;
  EXPECT_NE(big.find("32"), std::string::npos) << big;
  EXPECT_NE(big.find("cache"), std::string::npos) << big;
  EXPECT_NE(big.find("8 blocks of 4"), std::string::npos) << big;
  EXPECT_NE(whole.refuse_reason(40, 0).find("40"), std::string::npos);
  EXPECT_NE(whole.refuse_reason(0, 4).find("empty"), std::string::npos);
  EXPECT_NE(whole.refuse_reason(4, -1).find("-1"), std::string::npos);
  EXPECT_NE(whole.refuse_reason(4, INT64_MAX), "");  // no overflow into a small total

  Scheduler ctx(bm, SchedulerConfig{4, 16, 20});
  EXPECT_EQ(ctx.config().max_context, 20);
  EXPECT_EQ(ctx.refuse_reason(15, 5), "");
  const std::string over = ctx.refuse_reason(15, 6);
  EXPECT_NE(over.find("15"), std::string::npos) << over;
  EXPECT_NE(over.find("6"), std::string::npos) << over;
  EXPECT_NE(over.find("21"), std::string::npos) << over;
  EXPECT_NE(over.find("context of 20"), std::string::npos) << over;
  // A context larger than the cache is the cache.
  Scheduler larger(bm, SchedulerConfig{4, 16, 1000});
  EXPECT_EQ(larger.config().max_context, 32);
  EXPECT_NE(larger.refuse_reason(30, 3).find("whole cache holds 32"), std::string::npos);
}

TEST(SchedulerDeathTest, RefusedAddAborts) {
  BlockManager bm(8, 4);
  Scheduler s(bm, SchedulerConfig{4, 16, 0});
  EXPECT_DEATH(s.add(1, tokens_from(30, 0), 3), "whole cache");
  s.add(1, tokens_from(3, 0), 3);
  EXPECT_DEATH(s.add(1, tokens_from(3, 0), 3), "exists");
}

// ---------------------------------------------------------------------------------------------------------------
// Stress: random arrivals, lengths, max tokens and cancellations over a small pool, every step checked by the
// harness; every sequence must finish (or be cancelled) within a bounded number of steps, with its own tokens.

namespace {

struct StressCase {
  int blocks, bt;
  SchedulerConfig cfg;
  bool prefix;
  uint32_t seed;
  int requests;
};

struct StressStats {
  int64_t preemptions = 0, hits = 0, cancelled = 0, finished = 0;
};

void stress(const StressCase& k, StressStats& st) {
  std::mt19937 rng(k.seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Harness h(k.blocks, k.bt, k.cfg, k.prefix);
  h.max_steps_per_seq = 4000;
  const int64_t ctx = h.sched.config().max_context;
  std::vector<std::vector<int32_t>> families;
  for (int f = 0; f < 3; f++) {
    std::vector<int32_t> v(static_cast<size_t>(ctx));
    for (auto& x : v) x = uni(0, kVocab - 1);
    families.push_back(v);
  }
  std::map<SeqId, std::pair<std::vector<int32_t>, int64_t>> reqs;
  SeqId next = 1;
  int refused = 0;
  while (next <= k.requests || !h.sched.idle()) {
    // Arrivals (now and then one that can never run: refused, not added).
    if (next <= k.requests && uni(0, 2) == 0) {
      for (int i = uni(1, 3); i > 0 && next <= k.requests; i--) {
        const int len = uni(1, int(ctx));
        std::vector<int32_t> p;
        if (uni(0, 1)) {
          const auto& f = families[size_t(uni(0, 2))];
          p.assign(f.begin(), f.begin() + uni(0, len));
        }
        while (int(p.size()) < len) p.push_back(uni(0, 7));  // a small alphabet: accidental repeats too
        const int64_t room = ctx - len;
        if (uni(0, 9) == 0) {
          EXPECT_NE(h.sched.refuse_reason(len, room + uni(1, 5)), "");
          refused++;
          continue;
        }
        if (room < 1) p.pop_back();
        const int64_t max_new = uni(1, int(std::max<int64_t>(1, std::min<int64_t>(ctx - int64_t(p.size()), 24))));
        reqs[next] = {p, max_new};
        h.add(next, p, max_new);
        next++;
      }
    }
    // Cancellations: now and then a random live sequence, waiting or running, or one of the step in flight.
    if (!h.live.empty() && uni(0, 29) == 0) {
      auto it = h.live.begin();
      std::advance(it, uni(0, int(h.live.size()) - 1));
      h.cancel(it->first);
    }
    h.mid_step = [&](const Scheduler::Step& s) {
      if (!s.chunks.empty() && uni(0, 39) == 0) {
        const SeqId id = s.chunks[size_t(uni(0, int(s.chunks.size()) - 1))].id;
        if (h.live.count(id)) h.cancel(id);
      }
    };
    if (!h.sched.idle()) h.step();
    if (testing::Test::HasFatalFailure()) return;
    ASSERT_LT(h.steps, 200000) << "no end in sight";
  }
  EXPECT_TRUE(h.live.empty());
  EXPECT_EQ(h.bm.used_blocks(), 0);
  EXPECT_EQ(h.bm.free_blocks(), h.bm.num_blocks());
  h.bm.check_invariants();
  for (const auto& [id, r] : reqs) {
    if (h.cancelled.count(id)) continue;
    ASSERT_TRUE(h.done.count(id)) << "sequence " << id << " neither finished nor cancelled";
    EXPECT_EQ(int64_t(h.done.at(id).size()), int64_t(r.first.size()) + r.second);
    EXPECT_EQ(h.done.at(id), reference_run(r.first, r.second)) << "sequence " << id;
  }
  // Solo runs in a fresh scheduler for a few.
  int solo = 0;
  for (const auto& [id, r] : reqs)
    if (h.done.count(id) && solo++ < 5) {
      EXPECT_EQ(h.done.at(id), run_alone(k.blocks, k.bt, k.cfg, k.prefix, r.first, r.second)) << id;
    }
  EXPECT_GT(refused, 0);
  st.preemptions = h.sched.preemptions();
  st.hits = h.bm.prefix_hit_tokens();
  st.cancelled = int64_t(h.cancelled.size());
  st.finished = int64_t(h.done.size());
}

}  // namespace

TEST(SchedulerStress, RandomArrivalsSmallPool) {
  for (uint32_t seed : {1u, 2u, 3u, 4u, 5u, 6u, 7u, 8u}) {
    SCOPED_TRACE(seed);
    StressStats st;
    stress({12, 4, SchedulerConfig{4, 12, 0}, true, seed, 400}, st);
    ASSERT_FALSE(HasFatalFailure());
    // The run must have exercised what it checks.
    EXPECT_GT(st.preemptions, 0);
    EXPECT_GT(st.hits, 0);
    EXPECT_GT(st.cancelled, 0);
    EXPECT_GT(st.finished, 200);
  }
}

TEST(SchedulerStress, OtherShapes) {
  for (const StressCase& k : {StressCase{8, 8, SchedulerConfig{6, 5, 0}, true, 11, 120},
                              StressCase{24, 2, SchedulerConfig{8, 3, 30}, true, 12, 120},
                              StressCase{16, 1, SchedulerConfig{3, 64, 0}, true, 13, 120},
                              StressCase{12, 4, SchedulerConfig{4, 12, 0}, false, 14, 120},
                              StressCase{3, 16, SchedulerConfig{2, 7, 0}, true, 15, 80},
                              StressCase{10, 4, SchedulerConfig{1, 1, 0}, true, 16, 40}}) {
    SCOPED_TRACE(k.seed);
    StressStats st;
    stress(k, st);
    ASSERT_FALSE(HasFatalFailure());
    EXPECT_GT(st.finished, 0);
  }
}
