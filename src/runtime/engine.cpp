#include "runtime/engine.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "core/error.h"
#include "runtime/sampler.h"

namespace trellm {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
  }
  return "";
}

// ---- Request ------------------------------------------------------------------------------------------------

void Request::cancel() {
  cancel_.store(true);
  if (wake_engine_) wake_engine_();
}

void Request::push(const GenToken& t) {
  {
    std::lock_guard lk(mu_);
    pending_.push_back(t);
  }
  cv_.notify_all();
}

void Request::finish(FinishReason r, std::string error) {
  {
    std::lock_guard lk(mu_);
    if (finish_ != FinishReason::None) return;
    finish_ = r;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

FinishReason Request::wait(std::vector<GenToken>& out, std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return !pending_.empty() || finish_ != FinishReason::None; });
  out.insert(out.end(), pending_.begin(), pending_.end());
  pending_.clear();
  return finish_;
}

std::vector<GenToken> Request::wait_all(FinishReason* reason) {
  std::vector<GenToken> out;
  FinishReason r = FinishReason::None;
  while ((r = wait(out, std::chrono::milliseconds(1000))) == FinishReason::None) {
  }
  wait(out, std::chrono::milliseconds(0));  // tokens pushed just before the finish
  if (reason) *reason = r;
  return out;
}

std::string Request::error() const {
  std::lock_guard lk(mu_);
  return error_;
}

// ---- Engine -------------------------------------------------------------------------------------------------

namespace {

int64_t default_context(const Model& m, const EngineOptions& o) {
  return o.context > 0 ? o.context : std::max<int64_t>(1, m.config().max_position_embeddings);
}

// Cache blocks from the options and, on a GPU, from the memory left once the weights and the run state are in.
int plan_kv_blocks(Model& m, const EngineOptions& o, int64_t context, int spec, int spec_stride) {
  if (o.kv_blocks > 0) return o.kv_blocks;
  const DType dt = o.kv_dtype.value_or(m.backend().kv_dtype());
  const Config& c = m.config();
  // With speculation the MTP layer keeps its own pool of the same blocks (one layer more), and the drafts' logits
  // take K x spec_stride rows of the vocabulary.
  const double layers = double(c.num_hidden_layers + (spec > 0 ? int64_t(m.weights().mtp.size()) : 0));
  const double block_bytes = m.kv_bytes_per_cached_token(dt) * kKvBlockTokens * layers / double(c.num_hidden_layers);
  const double spec_bytes = spec > 0 ? 4.0 * double(spec) * spec_stride * double(c.vocab_size) : 0.0;
  double budget = o.kv_memory_gb * 1e9;
  if (budget <= 0) {
    if (m.backend().host_memory()) {
      budget = std::min(2e9, double(o.max_seqs) * double(kv_blocks_for(context)) * block_bytes);
    } else {
      const auto [used, total] = m.backend().memory_used_total();
      budget = 0.9 * double(total > used ? total - used : 0) - spec_bytes;
    }
  }
  const int blocks = int(std::min(budget / block_bytes, 1e9));
  if (blocks < 1)
    fail("the KV cache budget of ", budget / 1e9, " GB holds no block of ", kKvBlockTokens, " tokens (",
         block_bytes / 1e6, " MB each): raise --kv-memory");
  return blocks;
}

// Decode-only steps run as graphs of 1, 2, 4, ... rows: max_seqs rounded up to a power of two.
int pow2_at_least(int m) {
  int b = 1;
  while (b < m) b *= 2;
  return b;
}

// Options checked before anything is sized from them.
const EngineOptions& checked(const EngineOptions& o) {
  if (o.max_seqs < 1) fail("max_seqs ", o.max_seqs, " must be >= 1");
  if (o.max_step_tokens < 1) fail("the step token budget ", o.max_step_tokens, " must be >= 1");
  if (o.draft_tokens < 0 || o.draft_tokens > kMaxDraftTokens)
    fail("draft tokens ", o.draft_tokens, " must be in 0..", kMaxDraftTokens);
  if (o.draft_tokens > 0 && o.spec_max_seqs < 1) fail("spec_max_seqs ", o.spec_max_seqs, " must be >= 1");
  return o;
}

int spec_of(const Model& m, const EngineOptions& o) {
  if (o.draft_tokens == 0) return 0;
  if (m.weights().mtp.empty())
    fail("speculative decoding with the MTP layer needs a model that has one (config.json num_nextn_predict_layers ",
         m.config().num_nextn_predict_layers, ", no model.layers.", m.config().num_hidden_layers, ".* tensors)");
  return o.draft_tokens;
}
// Sequences a speculative step serves at once: spec_max_seqs (at most max_seqs), rounded up to a power of two.
int spec_stride_of(const EngineOptions& o, int spec) {
  return spec > 0 ? pow2_at_least(std::min(o.spec_max_seqs, o.max_seqs)) : 1;
}
// Rows of a step and logit rows: a prompt chunk, a padded decode bucket, or a padded speculative bucket.
int step_rows(const EngineOptions& o, int spec) {
  return std::max({o.max_step_tokens, pow2_at_least(o.max_seqs), spec > 0 ? spec_stride_of(o, spec) * (spec + 1) : 0});
}
int logit_rows(const EngineOptions& o, int spec) {
  return std::max(pow2_at_least(o.max_seqs), spec > 0 ? spec_stride_of(o, spec) * (spec + 1) : 0);
}

}  // namespace

Engine::Engine(Model& model, const EngineOptions& options)
    : model_(model),
      backend_(model.backend()),
      opt_(checked(options)),
      context_(default_context(model, opt_)),
      // rows: a prompt chunk, or a padded decode bucket; logit rows: every row of a bucket; tables: one per sequence
      rs_(model.make_run_state(step_rows(opt_, spec_of(model, opt_)), logit_rows(opt_, spec_of(model, opt_)),
                               pow2_at_least(opt_.max_seqs), kv_blocks_for(context_))),
      // one block more than the block manager hands out: the padding rows of graph steps write there
      kv_(model.make_kv_cache_blocks(plan_kv_blocks(model, opt_, context_, spec_of(model, opt_),
                                                    spec_stride_of(opt_, spec_of(model, opt_))) + 1,
                                     opt_.kv_dtype)),
      blocks_(kv_.blocks - 1, kKvBlockTokens, opt_.prefix_caching),
      sched_(blocks_, SchedulerConfig{opt_.max_seqs, opt_.max_step_tokens,
                                      std::min<int64_t>(context_, int64_t(kv_.blocks - 1) * kKvBlockTokens)}) {
  context_ = sched_.config().max_context;  // a cache smaller than the context caps it
  max_bucket_ = pow2_at_least(opt_.max_seqs);
  graph_stride_ = kv_blocks_for(context_);
  pad_block_ = kv_.blocks - 1;
  ones_.assign(size_t(max_bucket_), 1);
  const int S = max_bucket_;
  params_ = TensorView(backend_.alloc(sizeof(SamplingParams) * size_t(S)), DType::U8, {int64_t(sizeof(SamplingParams)) * S});
  steps_ = TensorView(backend_.alloc(4 * size_t(S)), DType::I32, {S});
  tokens_ = TensorView(backend_.alloc(4 * size_t(S)), DType::I32, {S});
  const size_t T = size_t(rs_.max_tokens);
  h_tokens_.resize(T);
  h_pos_.resize(T);
  h_seq_.resize(T);
  h_runs_.reserve(size_t(S));
  h_logit_rows_.reserve(size_t(S));
  h_steps_.resize(size_t(S));
  h_sampled_.resize(size_t(S));
  h_params_.resize(size_t(S));
  h_logits_.resize(size_t(model_.config().vocab_size));
  spec_ = spec_of(model_, opt_);
  spec_stride_ = spec_stride_of(opt_, spec_);
  init_speculation();
}

Engine::~Engine() {
  stop();
  backend_.release(params_.data);
  backend_.release(steps_.data);
  backend_.release(tokens_.data);
  for (TensorView* t : {&draft_logits_, &spec_result_, &spec_src_, &spec_base_, &spec_drafts_, &spec_steps_, &draft_params_,
                        &spec_iota_, &spec_rows_})
    if (!t->empty()) backend_.release(t->data);
}

std::string Engine::describe() const {
  const DType dt = kv_.layers.empty() ? backend_.kv_dtype() : kv_.layers[0].dtype;
  std::ostringstream s;
  s << "KV cache " << kv_blocks() << " blocks x " << kKvBlockTokens << " = " << kv_token_capacity() << " tokens ("
    << model_.kv_bytes_per_cached_token(dt) * double(kv_token_capacity()) / 1e9 << " GB " << dtype_name(dt)
    << "); max " << opt_.max_seqs << " sequences, " << opt_.max_step_tokens << " tokens per step, context "
    << context_ << "; prefix caching " << (opt_.prefix_caching ? "on" : "off") << "; decode graphs "
    << (opt_.decode_graphs.value_or(!backend_.host_memory()) ? "on" : "off");
  if (spec_ > 0)
    s << "; speculative decoding: MTP, " << spec_ << " draft tokens, while at most " << opt_.spec_max_seqs
      << " sequences run";
  return s.str();
}

std::shared_ptr<Request> Engine::submit(std::vector<int32_t> prompt, const GenParams& params) {
  const Config& c = model_.config();
  for (int32_t t : prompt)
    if (t < 0 || t >= c.vocab_size) fail("prompt token id ", t, " is outside the vocabulary (0..", c.vocab_size - 1, ")");
  if (params.max_tokens < 1) fail("max_tokens ", params.max_tokens, " must be >= 1");
  if (params.logprobs > 20) fail("logprobs ", params.logprobs, " must be at most 20");
  validate_sampling(params.sampling);
  const std::string why = sched_.refuse_reason(int64_t(prompt.size()), params.max_tokens);
  if (!why.empty()) fail(why);
  auto req = std::make_shared<Request>();
  req->id_ = next_id_++;
  req->prompt_tokens_ = int64_t(prompt.size());
  req->wake_engine_ = [this] { cv_.notify_all(); };
  GenParams p = params;
  p.sampling.seed = resolve_seed(p.sampling.seed);
  {
    std::lock_guard lk(mu_);
    if (stop_) fail("the engine is shutting down");
    inbox_.push_back({req, {std::move(prompt), std::move(p)}});
  }
  cv_.notify_all();
  return req;
}

void Engine::drain_inbox() {
  decltype(inbox_) in;
  {
    std::lock_guard lk(mu_);
    in.swap(inbox_);
  }
  for (auto& [req, work] : in) {
    auto& [prompt, params] = work;
    const int64_t max_new = params.max_tokens;
    sched_.add(req->id(), std::move(prompt), max_new);
    active_.emplace(req->id(), Active{req, std::move(params), 0});
  }
  std::vector<int64_t> cancelled;
  for (auto& [id, a] : active_)
    if (a.req->cancel_requested()) cancelled.push_back(id);
  for (int64_t id : cancelled) end(id, FinishReason::Cancelled);
}

void Engine::end(int64_t id, FinishReason r, const std::string& error) {
  auto it = active_.find(id);
  if (it == active_.end()) return;
  sched_.finish(id);
  it->second.req->finish(r, error);
  active_.erase(it);
  finished_++;
}

void Engine::fail_all(const std::string& error) {
  std::vector<int64_t> ids;
  for (auto& [id, a] : active_) ids.push_back(id);
  for (int64_t id : ids) end(id, FinishReason::Error, error);
}

bool Engine::step() {
  drain_inbox();
  if (sched_.idle()) {
    update_stats();
    return false;
  }
  plan_speculation();
  const Scheduler::Step plan = sched_.schedule();
  for (int64_t id : plan.preempted)  // their drafts are gone with their blocks
    if (auto it = active_.find(id); it != active_.end()) it->second.drafts.clear();
  if (plan.empty()) {
    update_stats();
    return false;
  }
  try {
    run_step(plan);
  } catch (const std::exception& e) {  // a failed step (out of memory, a device error): its requests end, the engine goes on
    fail_all(std::string("the engine step failed: ") + e.what());
  }
  steps_run_++;
  update_stats();
  return true;
}

void Engine::run_until_idle() {
  while (step()) {
  }
}

int Engine::bucket_for(int m) const { return std::min(max_bucket_, pow2_at_least(m)); }

void Engine::run_step(const Scheduler::Step& plan) {
  const bool decode_only = std::all_of(plan.chunks.begin(), plan.chunks.end(),
                                       [](const Scheduler::Chunk& c) { return c.count - c.drafts == 1 && c.sample; });
  const bool spec = spec_step_ || std::any_of(plan.chunks.begin(), plan.chunks.end(),
                                              [](const Scheduler::Chunk& c) { return c.drafts > 0; });
  if (decode_only && opt_.decode_graphs.value_or(!backend_.host_memory())) {
    if (!spec) return run_graph_step(plan);
    if (spec_graphable(plan)) return run_spec_graph_step(plan);
  }
  const int n = plan.rows;
  TRELLM_ASSERT(n >= 1 && n <= rs_.max_tokens && int(plan.chunks.size()) <= rs_.max_seqs);
  // Rows, their positions and block tables (one per chunk, packed at the longest table's stride).
  size_t stride = 1;
  for (const auto& c : plan.chunks) stride = std::max(stride, sched_.table(c.id).size());
  h_tables_.assign(plan.chunks.size() * stride, 0);
  h_runs_.clear();
  h_logit_rows_.clear();
  std::vector<int> sampling, first_logit;  // chunk indices that sample, in logit-row order; their first logit row
  for (size_t k = 0; k < plan.chunks.size(); k++) {
    const auto& c = plan.chunks[k];
    const std::vector<int32_t>& toks = sched_.tokens(c.id);
    const int known = c.count - c.drafts;  // the sequence's own tokens, then its drafts
    for (int j = 0; j < c.count; j++) {
      h_tokens_[size_t(c.row + j)] = j < known ? toks[size_t(c.start + j)] : active_.at(c.id).drafts[size_t(j - known)];
      h_pos_[size_t(c.row + j)] = int32_t(c.start + j);
      h_seq_[size_t(c.row + j)] = int32_t(k);
    }
    const auto table = sched_.table(c.id);
    std::copy(table.begin(), table.end(), h_tables_.begin() + ptrdiff_t(k * stride));
    h_runs_.push_back(c.count);
    if (c.sample) {  // a verified chunk needs every row's logits, a plain one its last
      first_logit.push_back(int(h_logit_rows_.size()));
      for (int j = c.count - 1 - c.drafts; j < c.count; j++) h_logit_rows_.push_back(c.row + j);
      sampling.push_back(int(k));
    }
    if (c.start < sched_.prompt_tokens(c.id)) prompt_rows_ += std::min<int64_t>(known, sched_.prompt_tokens(c.id) - c.start);
    if (auto it = active_.find(c.id); it != active_.end() && it->second.generated == 0)
      it->second.req->cached_tokens_.store(sched_.cached_prompt_tokens(c.id));
  }
  StepBatch b;
  b.tokens = {h_tokens_.data(), size_t(n)};
  b.pos = {h_pos_.data(), size_t(n)};
  b.seq = {h_seq_.data(), size_t(n)};
  b.tables = h_tables_;
  b.table_stride = int(stride);
  b.runs = h_runs_;
  if (!sampling.empty()) {
    b.logits = Logits::Rows;
    b.logit_rows = h_logit_rows_;
  }  // else: a step of prompt chunks only; its one (Last) logit row is not read
  model_.forward(rs_, kv_, b);
  sched_.computed(plan);
  if (!spec) {
    if (!sampling.empty()) sample_and_emit(plan, sampling, /*sampled=*/false);
    return;
  }
  // Speculative: verify (or sample) each sampling chunk, emit, then draft with the MTP layer.
  std::vector<int> accepted(plan.chunks.size(), -1);  // per chunk: drafts accepted; -1: no row to draft from
  verify_and_emit(plan, sampling, first_logit, accepted);
  if (spec_step_) draft_after(plan, int(stride), accepted);
}

void Engine::run_graph_step(const Scheduler::Step& plan) {
  const int m = int(plan.chunks.size()), bucket = bucket_for(m);
  TRELLM_ASSERT(m >= 1 && m <= bucket && bucket <= rs_.max_seqs);
  const size_t stride = size_t(graph_stride_);
  h_tables_.assign(size_t(bucket) * stride, pad_block_);
  std::vector<int> sampling(static_cast<size_t>(m));
  for (int j = 0; j < bucket; j++) {
    h_seq_[size_t(j)] = j;
    if (j >= m) {  // padding: token 0 at position 0 of a table of spare blocks, greedy
      h_tokens_[size_t(j)] = 0;
      h_pos_[size_t(j)] = 0;
      h_params_[size_t(j)] = SamplingParams{0.0f, 0, 1.0f, 0.0f, 1};
      h_steps_[size_t(j)] = 0;
      continue;
    }
    const Scheduler::Chunk& c = plan.chunks[size_t(j)];
    h_tokens_[size_t(j)] = sched_.tokens(c.id)[size_t(c.start)];
    h_pos_[size_t(j)] = int32_t(c.start);
    const auto table = sched_.table(c.id);
    TRELLM_ASSERT(table.size() <= stride, "block table of ", table.size(), " blocks beyond the graph stride ", stride);
    std::copy(table.begin(), table.end(), h_tables_.begin() + ptrdiff_t(size_t(j) * stride));
    const Active& a = active_.at(c.id);
    h_params_[size_t(j)] = a.params.sampling;
    h_steps_[size_t(j)] = int32_t(a.generated);
    sampling[size_t(j)] = j;
  }
  backend_.from_host(rs_.tokens.data, h_tokens_.data(), 4 * size_t(bucket));
  backend_.from_host(rs_.pos.data, h_pos_.data(), 4 * size_t(bucket));
  backend_.from_host(rs_.seq.data, h_seq_.data(), 4 * size_t(bucket));
  backend_.from_host(rs_.tables.data, h_tables_.data(), 4 * h_tables_.size());
  backend_.from_host(params_.data, h_params_.data(), sizeof(SamplingParams) * size_t(bucket));
  backend_.from_host(steps_.data, h_steps_.data(), 4 * size_t(bucket));
  auto body = [this, bucket] {
    Model::Layout l;
    l.n = bucket;
    l.bound = graph_stride_ * kKvBlockTokens;
    l.n_tables = bucket;
    l.table_stride = graph_stride_;
    l.runs = {ones_.data(), size_t(bucket)};
    l.logits = Logits::All;
    model_.forward_uploaded(rs_, kv_, l);
    backend_.sample_rows(TensorView(rs_.logits.data, DType::F32, {bucket, model_.config().vocab_size}),
                         TensorView(params_.data, DType::U8, {int64_t(sizeof(SamplingParams)) * bucket}),
                         TensorView(steps_.data, DType::I32, {bucket}), TensorView(tokens_.data, DType::I32, {bucket}));
  };
  run_captured(graphs_[bucket], body);
  backend_.to_host(h_sampled_.data(), tokens_.data, 4 * size_t(m));
  graph_steps_++;
  sched_.computed(plan);
  sample_and_emit(plan, sampling, /*sampled=*/true);
}

void Engine::run_captured(Graph& g, const std::function<void()>& body) {
  if (g.graph && g.epoch == backend_.memory_epoch()) return g.graph->launch();
  // A fresh capture: one uncaptured run sizes every scratch buffer and computes this very step (its results are
  // used: a speculative step rewrites its own inputs, so a replay would not start from them), then the capture.
  // Scratch that grows later (a longer prefill) changes the epoch.
  g.graph.reset();
  body();
  g.epoch = backend_.memory_epoch();
  g.graph = backend_.capture(body);
}

void Engine::sample_and_emit(const Scheduler::Step& plan, const std::vector<int>& sampling, bool sampled) {
  const int m = int(sampling.size());
  const int64_t V = model_.config().vocab_size;
  TensorView logits(rs_.logits.data, DType::F32, {m, V});
  if (!sampled) {
    for (int j = 0; j < m; j++) {
      const Active& a = active_.at(plan.chunks[size_t(sampling[size_t(j)])].id);
      h_params_[size_t(j)] = a.params.sampling;
      h_steps_[size_t(j)] = int32_t(a.generated);
    }
    backend_.from_host(params_.data, h_params_.data(), sizeof(SamplingParams) * size_t(m));
    backend_.from_host(steps_.data, h_steps_.data(), 4 * size_t(m));
    backend_.sample_rows(logits, TensorView(params_.data, DType::U8, {int64_t(sizeof(SamplingParams)) * m}),
                         TensorView(steps_.data, DType::I32, {m}), TensorView(tokens_.data, DType::I32, {m}));
    backend_.to_host(h_sampled_.data(), tokens_.data, 4 * size_t(m));
  }
  for (int j = 0; j < m; j++) {
    const int32_t t = h_sampled_[size_t(j)];
    emit(plan.chunks[size_t(sampling[size_t(j)])].id, {&t, 1}, j, 0);
  }
}

GenToken Engine::make_token(const Active& a, int32_t token, int logit_row) {
  const int64_t V = model_.config().vocab_size;
  GenToken t;
  t.id = token;
  if (a.params.logprobs < 0) return t;
  // log-softmax of this row's raw logits, in double
  backend_.to_host(h_logits_.data(), rs_.logits[logit_row].data, sizeof(float) * size_t(V));
  double mx = -INFINITY, sum = 0;
  for (int64_t v = 0; v < V; v++) mx = std::max(mx, double(h_logits_[size_t(v)]));
  for (int64_t v = 0; v < V; v++) sum += std::exp(double(h_logits_[size_t(v)]) - mx);
  const double lse = mx + std::log(sum);
  t.logprob = float(double(h_logits_[size_t(t.id)]) - lse);
  if (a.params.logprobs > 0) {
    std::vector<int32_t> idx(static_cast<size_t>(V));
    for (int64_t v = 0; v < V; v++) idx[size_t(v)] = int32_t(v);
    const size_t k = size_t(std::min<int64_t>(a.params.logprobs, V));
    std::partial_sort(idx.begin(), idx.begin() + ptrdiff_t(k), idx.end(), [&](int32_t x, int32_t y) {
      return h_logits_[size_t(x)] > h_logits_[size_t(y)] || (h_logits_[size_t(x)] == h_logits_[size_t(y)] && x < y);
    });
    for (size_t i = 0; i < k; i++) t.top.push_back({idx[i], float(double(h_logits_[size_t(idx[i])]) - lse)});
  }
  return t;
}

bool Engine::emit(int64_t id, std::span<const int32_t> tokens, int first_logit, int drafts) {
  const Config& c = model_.config();
  Active& a = active_.at(id);
  if (drafts > 0) {
    spec_steps_run_++;
    spec_drafted_ += drafts;
    spec_accepted_ += int64_t(tokens.size()) - 1;
  }
  const int64_t have = int64_t(sched_.tokens(id).size());
  FinishReason fin = FinishReason::None;
  size_t keep = 0;
  while (keep < tokens.size() && fin == FinishReason::None) {
    const int32_t t = tokens[keep];
    a.req->push(make_token(a, t, first_logit + int(keep)));
    keep++;
    const bool eos = !a.params.ignore_eos &&
                     std::find(c.eos_token_id.begin(), c.eos_token_id.end(), int64_t(t)) != c.eos_token_id.end();
    const bool stop_id = std::find(a.params.stop_ids.begin(), a.params.stop_ids.end(), t) != a.params.stop_ids.end();
    if (eos || stop_id) fin = FinishReason::Stop;
    else if (a.generated + int64_t(keep) >= a.params.max_tokens || have + int64_t(keep) >= context_) fin = FinishReason::Length;
  }
  a.generated += int64_t(keep);
  generated_ += int64_t(keep);
  if (fin != FinishReason::None) {
    end(id, fin);
    return false;
  }
  sched_.accept(id, tokens.first(keep));
  return true;
}

void Engine::update_stats() {
  std::lock_guard lk(mu_);
  stats_.running = sched_.running();
  stats_.waiting = sched_.waiting() + int(inbox_.size());
  stats_.kv_blocks = blocks_.num_blocks();
  stats_.kv_blocks_used = blocks_.used_blocks();
  stats_.prefix_query_tokens = blocks_.prefix_query_tokens();
  stats_.prefix_hit_tokens = blocks_.prefix_hit_tokens();
  stats_.prompt_tokens = prompt_rows_;
  stats_.generation_tokens = generated_;
  stats_.preemptions = sched_.preemptions();
  stats_.steps = steps_run_;
  stats_.graph_steps = graph_steps_;
  stats_.requests_finished = finished_;
  stats_.spec_steps = spec_steps_run_;
  stats_.spec_draft_tokens = spec_drafted_;
  stats_.spec_accepted_tokens = spec_accepted_;
}

Engine::Stats Engine::stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

void Engine::start() {
  TRELLM_ASSERT(!thread_.joinable(), "engine thread already running");
  stop_ = false;
  thread_ = std::thread([this] {
    for (;;) {
      const bool did = step();
      std::unique_lock lk(mu_);
      if (stop_ && (!drain_ || (sched_.idle() && inbox_.empty()))) break;
      if (!did && inbox_.empty()) cv_.wait_for(lk, std::chrono::milliseconds(50));
    }
    drain_inbox();
    std::vector<int64_t> ids;
    for (auto& [id, a] : active_) ids.push_back(id);
    for (int64_t id : ids) end(id, FinishReason::Cancelled);
    update_stats();
  });
}

void Engine::stop(bool drain) {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
    drain_ = drain;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

}  // namespace trellm
