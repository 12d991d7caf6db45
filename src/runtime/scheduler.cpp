#include "runtime/scheduler.h"

#include <algorithm>
#include <sstream>

#include "core/error.h"

namespace trellm {

Scheduler::Scheduler(BlockManager& blocks, const SchedulerConfig& config) : blocks_(blocks), cfg_(config) {
  TRELLM_ASSERT(cfg_.max_seqs >= 1 && cfg_.max_step_tokens >= 1, "scheduler: max_seqs ", cfg_.max_seqs,
                ", max_step_tokens ", cfg_.max_step_tokens);
  const int64_t whole = int64_t(blocks_.num_blocks()) * blocks_.block_tokens();
  cache_bound_ = cfg_.max_context <= 0 || cfg_.max_context >= whole;
  if (cache_bound_) cfg_.max_context = whole;
}

Scheduler::Seq& Scheduler::get(SeqId id) {
  auto it = seqs_.find(id);
  TRELLM_ASSERT(it != seqs_.end(), "scheduler: no sequence ", id);
  return it->second;
}
const Scheduler::Seq& Scheduler::get(SeqId id) const {
  auto it = seqs_.find(id);
  TRELLM_ASSERT(it != seqs_.end(), "scheduler: no sequence ", id);
  return it->second;
}

std::string Scheduler::refuse_reason(int64_t prompt_tokens, int64_t max_new_tokens) const {
  std::ostringstream m;
  const int64_t whole = int64_t(blocks_.num_blocks()) * blocks_.block_tokens();
  if (prompt_tokens < 1) m << "the prompt is empty";
  else if (max_new_tokens < 0) m << "max_tokens " << max_new_tokens << " is negative";
  else if (prompt_tokens > cfg_.max_context || max_new_tokens > cfg_.max_context - prompt_tokens) {  // no overflow
    const int64_t total = prompt_tokens + std::min(max_new_tokens, INT64_MAX - prompt_tokens);
    if (cache_bound_)  // the context is the whole cache: name the cache
      m << "the request needs " << total << " tokens of KV cache (prompt " << prompt_tokens << " + max_tokens "
        << max_new_tokens << ") but the whole cache holds " << whole << " tokens (" << blocks_.num_blocks()
        << " blocks of " << blocks_.block_tokens() << ")";
    else
      m << "the prompt (" << prompt_tokens << " tokens) plus max_tokens (" << max_new_tokens << ") is " << total
        << " tokens, more than the context of " << cfg_.max_context << " tokens";
  }
  return m.str();
}

void Scheduler::add(SeqId id, std::vector<int32_t> prompt, int64_t max_new_tokens) {
  TRELLM_ASSERT(!has(id), "scheduler: sequence ", id, " exists");
  const std::string why = refuse_reason(int64_t(prompt.size()), max_new_tokens);
  TRELLM_ASSERT(why.empty(), "scheduler: ", why);
  Seq s;
  s.prompt = int64_t(prompt.size());
  s.max_new = max_new_tokens;
  s.tokens = std::move(prompt);
  s.arrival = next_arrival_++;
  seqs_.emplace(id, std::move(s));
  waiting_.push_back(id);
}

void Scheduler::speculate(SeqId id, int drafts, int lookahead) {
  TRELLM_ASSERT(drafts >= 0 && lookahead >= -1, "scheduler: speculate(", id, ", ", drafts, ", ", lookahead, ")");
  Seq& s = get(id);
  s.drafts = drafts;
  s.lookahead = lookahead;
}

void Scheduler::preempt(SeqId id, Step& step) {
  Seq& s = get(id);
  s.drafts = 0;
  blocks_.release(id);
  s.computed = 0;
  s.running = false;
  running_.erase(std::find(running_.begin(), running_.end(), id));
  // Ahead of everything that arrived later: the queue stays in arrival order.
  auto at = std::find_if(waiting_.begin(), waiting_.end(), [&](SeqId w) { return get(w).arrival > s.arrival; });
  waiting_.insert(at, id);
  step.preempted.push_back(id);
  preemptions_++;
}

int Scheduler::freed_by(const std::vector<SeqId>& victims) const {
  std::unordered_map<int32_t, int> refs;  // references the victims hold, per block
  for (SeqId v : victims)
    for (int32_t b : blocks_.table(v)) refs[b]++;
  int freed = 0;
  for (const auto& [b, n] : refs) freed += n == blocks_.refcount(b);
  return freed;
}

bool Scheduler::reserve_or_preempt(SeqId id, int64_t total, const std::vector<SeqId>& scheduled, bool self, Step& step) {
  if (blocks_.reserve(id, total)) return true;
  // The later arrivals not in this step, latest first: the only ones `id` may take blocks from (FCFS: never an
  // earlier one, never a row already planned).
  const uint64_t mine = get(id).arrival;
  std::vector<SeqId> victims;
  for (auto it = running_.rbegin(); it != running_.rend() && get(*it).arrival > mine; ++it)
    if (std::find(scheduled.begin(), scheduled.end(), *it) == scheduled.end()) victims.push_back(*it);
  // A prompt chunk that would still wait after all of them were preempted preempts none: their work would be
  // lost for nothing.
  if (!self) {
    const int need = blocks_.blocks_for(total) - int(blocks_.table(id).size());
    if (need > blocks_.free_blocks() + freed_by(victims)) return false;
  }
  for (SeqId v : victims) {
    preempt(v, step);
    if (blocks_.reserve(id, total)) return true;
  }
  TRELLM_ASSERT(self, "scheduler: sequence ", id, " found no room after the preemptions meant to make it");
  preempt(id, step);
  return false;
}

Scheduler::Step Scheduler::schedule() {
  Step step;
  int budget = cfg_.max_step_tokens;
  std::vector<SeqId> scheduled;
  auto take = [&](SeqId id, int count, int drafts, bool lookahead) {
    Seq& s = get(id);
    Chunk c;
    c.id = id;
    c.row = step.rows;
    c.count = count;
    c.start = s.computed;
    c.sample = s.computed + count - drafts == int64_t(s.tokens.size());
    c.drafts = drafts;
    c.lookahead = lookahead;
    step.chunks.push_back(c);
    step.rows += count;
    budget -= count;
    scheduled.push_back(id);
  };
  // Rows reserved past the sequences' tokens in the last step (rejected drafts, the draft model's lookahead) go back.
  for (SeqId id : running_) blocks_.trim(id, std::max<int64_t>(int64_t(get(id).tokens.size()), get(id).computed));
  // The positions a sampling chunk ending at `end` may also reserve for the draft model (none past the context).
  auto lookahead_fits = [&](const Seq& s, int64_t end) { return s.lookahead >= 0 && end + s.lookahead <= cfg_.max_context; };
  // 1. Decode rows: running sequences with exactly their newest token uncached, in arrival order; with their drafts
  //    when those and the lookahead fit in the context and the budget.
  const std::vector<SeqId> order = running_;
  for (SeqId id : order) {
    if (budget == 0) break;
    if (!has(id) || !get(id).running) continue;  // preempted earlier in this loop
    const Seq& s = get(id);
    if (int64_t(s.tokens.size()) - s.computed != 1) continue;
    int drafts = s.drafts;
    bool ahead = lookahead_fits(s, s.computed + 1 + drafts);
    if (drafts > 0 && (!ahead || 1 + drafts > budget)) drafts = 0, ahead = false;
    const int64_t total = s.computed + 1 + drafts + (ahead ? s.lookahead : 0);
    if (reserve_or_preempt(id, total, scheduled, /*self=*/true, step)) take(id, 1 + drafts, drafts, ahead);
  }
  // 2. The next chunk of running sequences still prefilling, in arrival order. One that finds no room waits, and
  //    so does everyone after it (FCFS: a later chunk or admission taking free blocks would overtake it).
  bool blocked = false;
  for (SeqId id : std::vector<SeqId>(running_)) {
    if (budget == 0) break;
    if (!get(id).running || std::find(scheduled.begin(), scheduled.end(), id) != scheduled.end()) continue;
    const Seq& s = get(id);
    const int n = int(std::min<int64_t>(budget, int64_t(s.tokens.size()) - s.computed));
    if (n <= 0) continue;
    const bool ahead = s.computed + n == int64_t(s.tokens.size()) && lookahead_fits(s, s.computed + n);
    if (!reserve_or_preempt(id, s.computed + n + (ahead ? s.lookahead : 0), scheduled, /*self=*/false, step)) {
      blocked = true;
      break;
    }
    take(id, n, 0, ahead);
  }
  // 3. Admission, FCFS, while there is budget and room. A preempted sequence that returned to the queue in this
  //    step waits for the next one (its blocks were just taken for someone else). The prefix hit and the room are
  //    checked first without touching the cache (no metrics, no LRU order), so begin() runs only on success.
  while (!blocked && budget > 0 && !waiting_.empty() && int(running_.size()) < cfg_.max_seqs) {
    const SeqId id = waiting_.front();
    if (std::find(step.preempted.begin(), step.preempted.end(), id) != step.preempted.end()) break;
    Seq& s = get(id);
    const int64_t max_cached = int64_t(s.tokens.size()) - 1;  // the newest token is computed: its logits sample
    int evictable_hits = 0;
    const int64_t cached = blocks_.cached_prefix(s.tokens, max_cached, &evictable_hits);
    const int n = int(std::min<int64_t>(budget, int64_t(s.tokens.size()) - cached));
    const bool ahead = cached + n == int64_t(s.tokens.size()) && lookahead_fits(s, cached + n);
    const int64_t total = cached + n + (ahead ? s.lookahead : 0);
    // New blocks past the hit (a multiple of block_tokens); the hit's evictable blocks leave the free count.
    const int need = blocks_.blocks_for(total) - blocks_.blocks_for(cached);
    if (need > blocks_.free_blocks() - evictable_hits) break;  // it stays first in the queue
    const int64_t hit = blocks_.begin(id, s.tokens, max_cached);
    TRELLM_ASSERT(hit == cached, "scheduler: begin() hit ", hit, " tokens, cached_prefix() said ", cached);
    const bool reserved = blocks_.reserve(id, total);
    TRELLM_ASSERT(reserved, "scheduler: no room for sequence ", id, " after the check");
    waiting_.pop_front();
    s.computed = cached;
    if (s.cached_prompt < 0) s.cached_prompt = std::min(cached, s.prompt);
    s.running = true;
    running_.insert(std::upper_bound(running_.begin(), running_.end(), id,
                                     [&](SeqId a, SeqId b) { return get(a).arrival < get(b).arrival; }),
                    id);
    take(id, n, 0, ahead);
  }
  return step;
}

void Scheduler::computed(const Step& step) {
  for (const Chunk& c : step.chunks) {
    if (!has(c.id)) continue;  // finished (cancelled) after schedule(): its rows are dropped with its blocks
    Seq& s = get(c.id);
    TRELLM_ASSERT(s.running && s.computed == c.start, "scheduler: chunk of sequence ", c.id, " out of order");
    s.computed += c.count - c.drafts;  // the drafts' rows count once accepted (accept())
    blocks_.commit(c.id, s.tokens, s.computed);
  }
}

void Scheduler::accept(SeqId id, std::span<const int32_t> emitted) {
  Seq& s = get(id);
  TRELLM_ASSERT(!emitted.empty() && s.running && s.computed == int64_t(s.tokens.size()), "scheduler: ", emitted.size(),
                " tokens for sequence ", id, " before its rows were computed");
  TRELLM_ASSERT(int64_t(s.tokens.size() + emitted.size()) <= cfg_.max_context, "scheduler: sequence ", id,
                " past the context");
  TRELLM_ASSERT(s.computed + int64_t(emitted.size()) - 1 <= int64_t(blocks_.table(id).size()) * blocks_.block_tokens(),
                "scheduler: accepted rows of sequence ", id, " past its reserved blocks");
  s.tokens.insert(s.tokens.end(), emitted.begin(), emitted.end());
  s.computed += int64_t(emitted.size()) - 1;
  s.drafts = 0;
  blocks_.commit(id, s.tokens, s.computed);
}

void Scheduler::append(SeqId id, int32_t token) {
  Seq& s = get(id);
  TRELLM_ASSERT(s.running && s.computed == int64_t(s.tokens.size()), "scheduler: token for sequence ", id,
                " before its rows were computed");
  TRELLM_ASSERT(int64_t(s.tokens.size()) < cfg_.max_context, "scheduler: sequence ", id, " past the context");
  s.tokens.push_back(token);
}

void Scheduler::finish(SeqId id) {
  if (!has(id)) return;
  Seq& s = get(id);
  if (blocks_.has(id)) blocks_.release(id);
  if (s.running) running_.erase(std::find(running_.begin(), running_.end(), id));
  else if (auto it = std::find(waiting_.begin(), waiting_.end(), id); it != waiting_.end()) waiting_.erase(it);
  seqs_.erase(id);
}

const std::vector<int32_t>& Scheduler::tokens(SeqId id) const { return get(id).tokens; }
int64_t Scheduler::prompt_tokens(SeqId id) const { return get(id).prompt; }
int64_t Scheduler::cached_prompt_tokens(SeqId id) const { return std::max<int64_t>(0, get(id).cached_prompt); }

}  // namespace trellm
