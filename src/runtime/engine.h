// The batched engine: many sequences at once through one model, one paged latent cache and one scheduler.
//
// One thread owns the model, the backend and the scheduler (the engine thread: step() callers, or the loop
// start() runs). Clients on other threads submit() requests and read their tokens from the returned Request;
// Request::cancel() sets a flag the engine reads at its next step, which then frees the sequence's blocks.
// Each step: scheduler rows (decode rows first, then prompt chunks under the token budget) -> one forward of all
// rows through the paged cache -> one batched sampling call with each request's own parameters and noise counter
// -> stop checks on the host. A request's tokens do not depend on what else runs beside it (bit for bit on the CPU
// backend): every row's arithmetic is independent of the others', and sampling noise is counted per request.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "model/glm4_moe_lite.h"
#include "runtime/block_manager.h"
#include "runtime/scheduler.h"

namespace trellm {

constexpr int kMaxDraftTokens = 8;  // EngineOptions::draft_tokens

// The engine's tunables, printed at start (describe()).
struct EngineOptions {
  int max_seqs = 64;              // sequences running at once
  int max_step_tokens = 2048;     // rows per step (decode rows + prompt chunks): the prefill chunk
  int64_t context = 0;            // positions per sequence (prompt + output); 0: max_position_embeddings
  int kv_blocks = 0;              // cache blocks of kKvBlockTokens tokens; 0: from kv_memory_gb
  double kv_memory_gb = 0;        // cache bytes; 0: 90 % of the GPU memory left after weights and scratch (CUDA),
                                  // enough for max_seqs full contexts up to 2 GB (CPU)
  bool prefix_caching = true;
  // Decode-only steps replay a step captured per batch-size bucket (1, 2, 4, ...; rows padded): CUDA graphs on
  // the GPU. Default: on for device backends; on the CPU a capture is a plain call (tests turn it on there).
  std::optional<bool> decode_graphs;
  std::optional<DType> kv_dtype;  // default: the backend's (CPU F32, CUDA BF16)
  // Speculative decoding with the model's MTP layer (runtime/speculative.h): each step verifies draft_tokens drafts
  // per sequence in one forward of draft_tokens + 1 rows and drafts the next ones by chaining the MTP layer; the
  // output is the main model's (greedy: exactly the tokens plain decoding gives). 0: off. Off by itself while more
  // than spec_max_seqs sequences run or wait: past that a batch's extra rows cost more than they save (H200,
  // full-size shapes: speculation needs acceptance above 0.32-0.60 at 1 sequence, 0.62-0.69 at 2 to 8;
  // bench/results/speculative.md).
  int draft_tokens = 0;
  int spec_max_seqs = 2;
};

// Per-request generation settings.
struct GenParams {
  SamplingParams sampling;         // seed 0: from the clock (resolved at submit)
  int64_t max_tokens = 128;        // new tokens, >= 1
  bool ignore_eos = false;         // keep going past the model's EOS ids (stop_ids still stop)
  std::vector<int32_t> stop_ids;   // more stop tokens (generation_config's, a client's); the stop token is emitted
  int logprobs = -1;               // -1: none; 0: the sampled token's log-probability; N > 0: and the top N
};

enum class FinishReason { None, Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"; "" for None

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
};
struct GenToken {
  int32_t id = 0;
  float logprob = 0;               // of the sampled token under the model's distribution (raw logits)
  std::vector<TokenLogprob> top;   // the top-N, most likely first (GenParams::logprobs > 0)
};

// A submitted request, shared by the engine and its client.
class Request {
 public:
  int64_t id() const { return id_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }
  // Prompt tokens whose cache rows came from the prefix cache (known once the request first ran).
  int64_t cached_tokens() const { return cached_tokens_.load(); }
  // Any thread: the engine ends the request (FinishReason::Cancelled) and frees its blocks at its next step.
  void cancel();
  bool cancel_requested() const { return cancel_.load(); }
  // Moves the tokens produced since the last call into `out` (appending) and returns the finish reason, None while
  // the request runs. Waits up to `timeout` for news when there is none yet.
  FinishReason wait(std::vector<GenToken>& out, std::chrono::milliseconds timeout = std::chrono::milliseconds(100));
  // Waits for the end and returns every remaining token.
  std::vector<GenToken> wait_all(FinishReason* reason = nullptr);
  std::string error() const;  // FinishReason::Error: what went wrong

 private:
  friend class Engine;
  void push(const GenToken& t);
  void finish(FinishReason r, std::string error = {});

  int64_t id_ = 0, prompt_tokens_ = 0;
  std::atomic<int64_t> cached_tokens_{0};
  std::atomic<bool> cancel_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<GenToken> pending_;
  FinishReason finish_ = FinishReason::None;
  std::string error_;
  std::function<void()> wake_engine_;
};

class Engine {
 public:
  // Sizes the cache and scratch once (errors with the numbers when they do not fit).
  Engine(Model& model, const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Any thread. Queues a request; an Error (naming the parameter, with the numbers) when it can never run: a
  // token outside the vocabulary, bad sampling parameters, prompt + max_tokens beyond the context or the cache.
  std::shared_ptr<Request> submit(std::vector<int32_t> prompt, const GenParams& params);

  // The engine thread (do not mix with start()): one step. False when there was nothing to run.
  bool step();
  void run_until_idle();
  // A background engine thread that steps while there is work; stop() ends the requests in flight (Cancelled
  // unless `drain`, which lets them finish first) and joins it.
  void start();
  void stop(bool drain = false);

  struct Stats {
    int running = 0, waiting = 0;
    int kv_blocks = 0, kv_blocks_used = 0;
    int64_t prefix_query_tokens = 0, prefix_hit_tokens = 0;
    int64_t prompt_tokens = 0, generation_tokens = 0;   // computed prompt rows (cache hits excluded), sampled
    int64_t preemptions = 0, steps = 0, graph_steps = 0;
    int64_t requests_finished = 0;
    int64_t spec_steps = 0;                              // sequence-steps that verified drafts
    int64_t spec_draft_tokens = 0, spec_accepted_tokens = 0;  // drafts verified, drafts accepted
  };
  Stats stats() const;  // any thread
  int kv_blocks() const { return blocks_.num_blocks(); }  // blocks requests can use
  int64_t kv_token_capacity() const { return int64_t(kv_blocks()) * kKvBlockTokens; }
  int64_t context() const { return context_; }
  const EngineOptions& options() const { return opt_; }
  std::string describe() const;  // options and cache size, for the start-up banner
  Model& model() const { return model_; }
  // The engine thread, between steps (tests): the block manager's accounting.
  const BlockManager& block_manager() const { return blocks_; }

 private:
  struct Active {
    std::shared_ptr<Request> req;
    GenParams params;
    int64_t generated = 0;
    std::vector<int32_t> drafts;  // speculative: the drafts the next decode row verifies
    int draft_slot = 0;           // their logits: rows j * spec_stride_ + draft_slot of draft_logits_
  };
  void drain_inbox();
  void run_step(const Scheduler::Step& plan);
  // A decode-only step of m rows as the CUDA graph of its bucket (m padded with rows that write a spare block).
  void run_graph_step(const Scheduler::Step& plan);
  int bucket_for(int m) const;
  struct Graph;
  // Launches g, or (first use, or scratch reallocated since) runs `body` uncaptured and captures it.
  void run_captured(Graph& g, const std::function<void()>& body);
  // Samples the rows of `sampling` chunks (logit row j = chunk sampling[j]) unless `sampled` already holds them,
  // then emits the tokens and ends finished requests.
  void sample_and_emit(const Scheduler::Step& plan, const std::vector<int>& sampling, bool sampled);
  // Emits the tokens a sampling chunk produced (one, or a verified chunk's accepted drafts and correction), each
  // with its logprobs from logits row first_logit + t, until a stop; returns whether the request still runs.
  bool emit(int64_t id, std::span<const int32_t> tokens, int first_logit, int drafts);
  GenToken make_token(const Active& a, int32_t token, int logit_row);
  // ---- speculative decoding (engine_spec.cpp) ----
  bool spec_on() const { return spec_ != 0; }
  void plan_speculation();  // before schedule(): which sequences draft in this step
  // The eager step when drafts or the MTP are involved: forward, verify each sampling chunk, emit, then the MTP
  // layer over the step's rows and its chained drafts.
  void run_spec_step(const Scheduler::Step& plan);
  // A decode-only step where every sequence verifies spec_ drafts: forward, verification and drafting as one
  // captured graph per batch bucket.
  void run_spec_graph_step(const Scheduler::Step& plan);
  void init_speculation();  // the MTP cache and the drafting buffers (constructor)
  bool spec_graphable(const Scheduler::Step& plan) const;  // a decode-only step run_spec_graph_step serves
  // Verifies each sampling chunk of an eager step (first_logit: its first logit row) and emits its tokens;
  // accepted[k] = the drafts chunk k accepted when it still runs and may draft (-1 otherwise).
  void verify_and_emit(const Scheduler::Step& plan, const std::vector<int>& sampling, const std::vector<int>& first_logit,
                       std::vector<int>& accepted);
  // The MTP layer over an eager step's rows (each sequence's next tokens), then the chained drafts of the
  // sequences that may draft; stride: the step's block-table stride (h_tables_).
  void draft_after(const Scheduler::Step& plan, int stride, const std::vector<int>& accepted);
  // Draft j of the m sequences whose MTP logits are in rs_.logits[0, m): kept for verification (draft_logits_
  // rows j * spec_stride_ + slot) and sampled into spec_drafts_[j * spec_stride_ + slot].
  void sample_drafts(int m, int j);
  void end(int64_t id, FinishReason r, const std::string& error = {});
  void fail_all(const std::string& error);
  void update_stats();

  Model& model_;
  Backend& backend_;
  EngineOptions opt_;
  int64_t context_ = 0;
  RunState rs_;  // before the cache: a GPU cache takes what memory the run state leaves
  KvCache kv_;
  BlockManager blocks_;
  Scheduler sched_;
  TensorView params_, steps_, tokens_;  // backend: SamplingParams [max_seqs], I32 [max_seqs], I32 [max_seqs]
  std::unordered_map<int64_t, Active> active_;
  // CUDA graphs of decode-only steps, per batch-size bucket (1, 2, 4, ..., max_seqs rounded up)
  struct Graph {
    std::unique_ptr<StepGraph> graph;
    uint64_t epoch = 0;  // Backend::memory_epoch() at capture
  };
  std::unordered_map<int, Graph> graphs_;
  int max_bucket_ = 1;
  int graph_stride_ = 1;   // block-table stride of graph steps: blocks_for(context)
  int32_t pad_block_ = 0;  // the pool's last block, outside the block manager: padding rows write there
  std::vector<int> ones_;  // runs of one row
  // speculative decoding (draft_tokens > 0 and an MTP layer)
  int spec_ = 0;                 // drafts per step (K)
  bool spec_step_ = false;       // this step speculates (spec_max_seqs)
  int spec_stride_ = 1;          // sequences a step can draft for (the bucket of spec_max_seqs)
  KvCache mtp_kv_;               // the MTP layer's latent cache, addressed by the main cache's block tables
  TensorView draft_logits_;      // [K * spec_stride_, V]: draft j of slot s at row j * spec_stride_ + s
  TensorView spec_result_, spec_src_, spec_base_, spec_drafts_, spec_steps_, draft_params_, spec_iota_, spec_rows_;
  std::unordered_map<int, Graph> spec_graphs_;
  std::vector<int32_t> h_result_, h_drafts_;
  std::vector<int> spec_runs_;   // runs of K + 1 rows (speculative graph steps)
  int64_t spec_steps_run_ = 0, spec_drafted_ = 0, spec_accepted_ = 0;
  // host staging, sized once
  std::vector<int32_t> h_tokens_, h_pos_, h_seq_, h_tables_, h_logit_rows_, h_steps_, h_sampled_;
  std::vector<int> h_runs_;
  std::vector<SamplingParams> h_params_;
  std::vector<float> h_logits_;

  // inbox from client threads
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::shared_ptr<Request>, std::pair<std::vector<int32_t>, GenParams>>> inbox_;
  std::atomic<int64_t> next_id_{1};
  std::atomic<bool> stop_{false}, drain_{false};
  std::thread thread_;
  Stats stats_;  // under mu_
  int64_t prompt_rows_ = 0, generated_ = 0, steps_run_ = 0, graph_steps_ = 0, finished_ = 0;
};

}  // namespace trellm
