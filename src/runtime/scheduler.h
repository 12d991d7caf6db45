// The iteration-level scheduler of the batched engine: continuous batching with chunked prefill.
//
// Each step it picks rows under a token budget: first one decode row for every running sequence that has all but
// its newest token cached, then the next prompt chunks of running sequences still prefilling, then new sequences
// from the queue in arrival order (FCFS: a sequence that does not fit stops admission, nobody overtakes it) while
// fewer than max_seqs run. Cache blocks come from the BlockManager; a sequence whose next row finds no free block
// preempts the most recently arrived later sequence not yet scheduled in this step (itself when there is none): the
// victim's blocks are released and it goes back to the head of the queue with its generated tokens, to be
// recomputed later (through the prefix cache where its blocks survived), so it later produces exactly what it
// would have. A prompt chunk that finds no block preempts only later arrivals (none when even all of them would not
// make room) and otherwise waits for the next step, and then so do the prompt chunks and admissions after it in
// this step (nobody overtakes it). Admission checks the prefix hit and the room without touching the cache, so a
// sequence that does not fit leaves the prefix-cache metrics and the LRU order alone. It knows token ids,
// positions and blocks: not the model, sampling or HTTP.
#pragma once
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/block_manager.h"

namespace trellm {

struct SchedulerConfig {
  int max_seqs = 64;           // sequences running at once (each has one decode row per step)
  int max_step_tokens = 2048;  // rows per step: decode rows plus prompt chunks
  int64_t max_context = 0;     // positions per sequence (prompt + generated); 0: the whole cache
};

class Scheduler {
 public:
  using SeqId = BlockManager::SeqId;
  Scheduler(BlockManager& blocks, const SchedulerConfig& config);

  // Why a sequence of this size can never run (empty when it can): prompt + max_new_tokens positions must fit in
  // max_context and in the whole cache.
  std::string refuse_reason(int64_t prompt_tokens, int64_t max_new_tokens) const;
  // Queues a new sequence at the back. `id` must be new; refuse_reason() must be empty (asserted).
  void add(SeqId id, std::vector<int32_t> prompt, int64_t max_new_tokens);

  // Speculative decoding (the engine's MTP drafts): the next decode row of `id` carries `drafts` draft rows after
  // its newest token (their tokens are the engine's; they are verified in the step), and the step may write cache
  // rows at `lookahead` positions past its last row (the draft model's chained steps; -1: the step does not draft). The blocks for both are
  // reserved with the row; when they would pass the context or the step's budget the row goes out plain (no
  // drafts, no lookahead: Chunk::drafts 0, Chunk::lookahead false). A sampling prompt chunk reserves the lookahead
  // too. Rows past what the engine then accepts (accept()) are rolled back: their blocks return at the next
  // schedule(). Preemption drops the drafts.
  void speculate(SeqId id, int drafts, int lookahead);

  // One sequence's rows in a step: tokens [start, start + count) of the sequence, at step rows [row, row + count).
  struct Chunk {
    SeqId id = 0;
    int row = 0, count = 0;
    int64_t start = 0;
    bool sample = false;  // the chunk ends at the sequence's newest token: the step samples the next one
    int drafts = 0;       // of the count rows, the last `drafts` are draft tokens to verify (speculate())
    bool lookahead = false;  // the lookahead positions past the chunk are reserved
  };
  struct Step {
    std::vector<Chunk> chunks;      // decode rows first, then prompt chunks (also their block-table order)
    std::vector<SeqId> preempted;   // sequences sent back to the queue to make room in this step
    int rows = 0;
    bool empty() const { return chunks.empty(); }
  };
  // Plans the next step (its rows' blocks are reserved). Empty when nothing can run.
  Step schedule();
  // After the step's forward: the chunks' rows are cached (full blocks enter the prefix cache).
  void computed(const Step& step);
  // A token sampled for sequence `id` (a chunk with sample = true, after computed()).
  void append(SeqId id, int32_t token);
  // The tokens a verified chunk emits (after computed()): its first drafts accepted, then the correction or bonus
  // token. All but the last have valid cache rows (the accepted drafts' rows); the last is the new newest token.
  void accept(SeqId id, std::span<const int32_t> emitted);
  // Sequence `id` is done (finished, cancelled, failed), wherever it is: its blocks are released now. Between
  // schedule() and computed() too: computed() then skips its chunk.
  void finish(SeqId id);

  bool has(SeqId id) const { return seqs_.count(id) != 0; }
  const std::vector<int32_t>& tokens(SeqId id) const;  // prompt + generated so far
  int64_t prompt_tokens(SeqId id) const;
  int64_t cached_prompt_tokens(SeqId id) const;        // prompt tokens found in the prefix cache at first admission
  std::span<const int32_t> table(SeqId id) const { return blocks_.table(id); }
  int running() const { return int(running_.size()); }
  int waiting() const { return int(waiting_.size()); }
  bool idle() const { return running_.empty() && waiting_.empty(); }
  int64_t preemptions() const { return preemptions_; }
  const SchedulerConfig& config() const { return cfg_; }
  const BlockManager& blocks() const { return blocks_; }

 private:
  struct Seq {
    std::vector<int32_t> tokens;
    int64_t prompt = 0, max_new = 0;
    int64_t computed = 0;         // tokens with cache rows
    int64_t cached_prompt = -1;   // prefix-cache hit at first admission (-1: not yet admitted)
    int drafts = 0, lookahead = -1;  // speculate(); lookahead -1: none
    uint64_t arrival = 0;
    bool running = false;
  };
  Seq& get(SeqId id);
  const Seq& get(SeqId id) const;
  // Reserves blocks for `total` positions of `id`, preempting later arrivals not in `scheduled` while it cannot.
  // False when it still cannot: `id` was preempted itself (self) or waits for the next step.
  // A prompt chunk (!self) preempts nobody when even all those candidates would not free enough.
  bool reserve_or_preempt(SeqId id, int64_t total, const std::vector<SeqId>& scheduled, bool self, Step& step);
  void preempt(SeqId id, Step& step);
  // Blocks that releasing all of `victims` would return to free_blocks() (those no other table holds).
  int freed_by(const std::vector<SeqId>& victims) const;

  BlockManager& blocks_;
  SchedulerConfig cfg_;
  bool cache_bound_ = false;     // max_context is the whole cache (none was given, or a larger one)
  std::unordered_map<SeqId, Seq> seqs_;
  std::vector<SeqId> running_;   // arrival order
  std::deque<SeqId> waiting_;    // FCFS; preempted sequences return to the front
  uint64_t next_arrival_ = 0;
  int64_t preemptions_ = 0;
};

}  // namespace trellm
