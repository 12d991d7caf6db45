// Speculative decoding in the batched engine, with the model's own MTP layer as the draft model.
//
// A speculating sequence enters a step with K drafts: its decode chunk is K + 1 rows (the newest token, then the
// drafts) and the forward gives the main model's logits of each. spec_verify accepts a prefix of the drafts and
// emits one more token (the correction, or a bonus token when every draft passed), so each step emits 1..K+1
// tokens whose distribution is exactly the main model's (greedy: exactly plain greedy's tokens). The cache rows of
// accepted drafts stay (they were computed from exactly those tokens); rows of rejected ones are rewritten before
// anything reads them and their blocks return to the pool at the next schedule() (Scheduler::trim via speculate()).
//
// Then the MTP layer drafts the next K: its step 0 runs on the step's rows of each sequence (position p: the token
// at p + 1, the main model's final hidden state at p), filling the MTP cache and giving draft 1 from the last
// accepted row; steps 1..K-1 chain the layer on its own output (vLLM's way with one MTP layer). Prompt chunks go
// through the MTP layer too, so its cache covers the prompt. Drafts are drawn by sample_rows from the MTP logits
// with the request's parameters (seed ^ kSpecDraftSalt); their logits stay in draft_logits_ for the next step's
// verification.
//
// Decode-only steps where every sequence verifies K drafts run as one captured graph per batch bucket (verify,
// then every draft step, with spec_prepare computing the data-dependent rows on the device); other steps run the
// same ops from the host.
#include <algorithm>

#include "core/error.h"
#include "runtime/engine.h"

namespace trellm {

namespace {
TensorView head(TensorView t, int64_t n) {  // the first n rows (or elements) of t
  t.shape[0] = n;
  return t;
}
TensorView slice(TensorView t, int64_t at, int64_t n) {  // elements [at, at + n) of a 1-D I32 tensor
  return TensorView(static_cast<int32_t*>(t.data) + at, DType::I32, {n});
}
}  // namespace

void Engine::init_speculation() {
  if (spec_ == 0) return;
  const int64_t V = model_.config().vocab_size, S = spec_stride_, K = spec_;
  model_.add_mtp_state(rs_);
  mtp_kv_ = model_.make_mtp_kv_cache_blocks(kv_.blocks, opt_.kv_dtype);
  // Zeros: a row the MTP layer never wrote (a prompt computed while speculation was off) must not be NaN garbage.
  for (TensorView& t : mtp_kv_.layers) backend_.fill_random(t, 0, 0.0f);
  auto i32 = [&](int64_t n) { return TensorView(backend_.alloc(4 * size_t(n)), DType::I32, {n}); };
  draft_logits_ = TensorView(backend_.alloc(4 * size_t(K * S * V)), DType::F32, {K * S, V});
  spec_result_ = i32(S * (K + 2));
  spec_src_ = i32(S);
  spec_base_ = i32(S);
  spec_drafts_ = i32(K * S);
  spec_steps_ = i32(S);
  spec_rows_ = i32(rs_.max_tokens);
  spec_iota_ = i32(S);
  draft_params_ = TensorView(backend_.alloc(sizeof(SamplingParams) * size_t(S)), DType::U8, {int64_t(sizeof(SamplingParams)) * S});
  std::vector<int32_t> iota(static_cast<size_t>(S));
  for (int64_t i = 0; i < S; i++) iota[size_t(i)] = int32_t(i);
  backend_.from_host(spec_iota_.data, iota.data(), 4 * iota.size());
  h_result_.assign(size_t(S * (K + 2)), 0);
  h_drafts_.assign(size_t(K * S), 0);
  spec_runs_.assign(size_t(S), int(K + 1));
}

void Engine::plan_speculation() {
  if (spec_ == 0) return;
  // Verifying K drafts costs each sequence K more rows; with many sequences the batch is already wide enough
  // that those rows cost more than the tokens they save (bench/results/speculative.md measures where).
  spec_step_ = sched_.running() + sched_.waiting() <= opt_.spec_max_seqs;
  for (auto& [id, a] : active_) {
    if (!sched_.has(id)) continue;
    if (!spec_step_) a.drafts.clear();
    sched_.speculate(id, int(a.drafts.size()), spec_step_ ? spec_ - 1 : -1);
  }
}

bool Engine::spec_graphable(const Scheduler::Step& plan) const {
  if (!spec_step_ || int(plan.chunks.size()) > spec_stride_) return false;
  for (const Scheduler::Chunk& c : plan.chunks) {
    if (c.drafts != spec_ || !c.lookahead) return false;
    if (active_.at(c.id).params.logprobs >= 0) return false;  // logprobs read the verified rows' logits on the host
  }
  return true;
}

void Engine::sample_drafts(int m, int j) {
  const int64_t V = model_.config().vocab_size;
  backend_.gather_rows(TensorView(draft_logits_[int64_t(j) * spec_stride_].data, DType::F32, {m, V}), head(rs_.logits, m),
                       head(spec_iota_, m));
  backend_.sample_rows(head(rs_.logits, m), head(draft_params_, int64_t(sizeof(SamplingParams)) * m), head(spec_steps_, m),
                       slice(spec_drafts_, int64_t(j) * spec_stride_, m));
}

namespace {
SamplingParams draft_params(SamplingParams p) {
  p.seed ^= kSpecDraftSalt;
  return p;
}
}  // namespace

void Engine::verify_and_emit(const Scheduler::Step& plan, const std::vector<int>& sampling, const std::vector<int>& first_logit,
                             std::vector<int>& accepted) {
  const int m = int(sampling.size()), K = spec_;
  const int64_t V = model_.config().vocab_size;
  TRELLM_ASSERT(m <= spec_stride_, "a speculative step of ", m, " sampling sequences (at most ", spec_stride_, ")");
  std::vector<int32_t> src(static_cast<size_t>(m));
  for (int j = 0; j < m; j++) {
    const Active& a = active_.at(plan.chunks[size_t(sampling[size_t(j)])].id);
    h_params_[size_t(j)] = a.params.sampling;
    h_steps_[size_t(j)] = int32_t(a.generated);
    src[size_t(j)] = a.draft_slot;
  }
  backend_.from_host(params_.data, h_params_.data(), sizeof(SamplingParams) * size_t(m));
  backend_.from_host(steps_.data, h_steps_.data(), 4 * size_t(m));
  backend_.from_host(spec_src_.data, src.data(), 4 * size_t(m));
  for (int j = 0; j < m; j++) {
    const Scheduler::Chunk& c = plan.chunks[size_t(sampling[size_t(j)])];
    SpecVerify v;
    v.K = c.drafts;
    v.target = TensorView(rs_.logits[first_logit[size_t(j)]].data, DType::F32, {c.drafts + 1, V});
    v.draft = draft_logits_;
    v.draft_stride = spec_stride_;
    v.src = slice(spec_src_, j, 1);
    v.tokens = slice(rs_.tokens, c.row + c.count - 1 - c.drafts, c.drafts + 1);
    v.params = TensorView(static_cast<char*>(params_.data) + sizeof(SamplingParams) * size_t(j), DType::U8,
                          {int64_t(sizeof(SamplingParams))});
    v.steps = slice(steps_, j, 1);
    v.out = slice(spec_result_, int64_t(j) * (K + 2), c.drafts + 2);
    backend_.spec_verify(v);
  }
  backend_.to_host(h_result_.data(), spec_result_.data, 4 * size_t(m) * size_t(K + 2));
  for (int j = 0; j < m; j++) {
    const size_t k = size_t(sampling[size_t(j)]);
    const Scheduler::Chunk& c = plan.chunks[k];
    const int32_t* r = &h_result_[size_t(j) * size_t(K + 2)];
    active_.at(c.id).drafts.clear();
    const bool alive = emit(c.id, {r + 1, size_t(r[0]) + 1}, first_logit[size_t(j)], c.drafts);
    accepted[k] = alive && c.lookahead ? r[0] : -1;
  }
}

void Engine::draft_after(const Scheduler::Step& plan, int stride, const std::vector<int>& accepted) {
  const int K = spec_;
  // Step 0: each chunk's rows r with the token at its position + 1 (for a sampling chunk: up to its last accepted row).
  std::vector<int32_t> tok, pos, seq, hid, logit_rows;
  std::vector<int> runs;
  struct Drafting {
    int64_t id;
    int32_t last_pos, table;
  };
  std::vector<Drafting> drafting;
  for (size_t k = 0; k < plan.chunks.size(); k++) {
    const Scheduler::Chunk& c = plan.chunks[k];
    if (!sched_.has(c.id) || (c.sample && accepted[k] < 0)) continue;  // ended, or will not draft
    const int rows = c.sample ? c.count - c.drafts + accepted[k] : c.count;
    const std::vector<int32_t>& t = sched_.tokens(c.id);
    for (int r = 0; r < rows; r++) {
      tok.push_back(t[size_t(c.start + 1 + r)]);
      pos.push_back(int32_t(c.start + r));
      seq.push_back(int32_t(k));
      hid.push_back(c.row + r);
    }
    runs.push_back(rows);
    if (c.sample) {
      logit_rows.push_back(int32_t(tok.size()) - 1);
      drafting.push_back({c.id, int32_t(c.start + rows - 1), int32_t(k)});
    }
  }
  if (tok.empty()) return;
  const int n = int(tok.size()), nd = int(drafting.size());
  const int64_t H = model_.config().hidden_size;
  bool identity = n == plan.rows;
  for (int i = 0; identity && i < n; i++) identity = hid[size_t(i)] == i;
  // Rows `idx` of src gathered into rs_.y (free until the MTP layer's embedding, which follows its hnorm(hidden)).
  auto gathered = [&](TensorView src, const std::vector<int32_t>& idx) {
    const int64_t m = int64_t(idx.size());
    backend_.from_host(spec_rows_.data, idx.data(), 4 * idx.size());
    TensorView out(rs_.y.data, DType::F32, {m, H});
    backend_.gather_rows(out, src, head(spec_rows_, m));
    return out;
  };
  const TensorView hidden = identity ? head(rs_.x, n) : gathered(head(rs_.x, plan.rows), hid);  // main hidden states
  StepBatch b;
  b.tokens = tok;
  b.pos = pos;
  b.seq = seq;
  b.tables = h_tables_;
  b.table_stride = stride;
  b.runs = runs;
  if (nd > 0) {
    b.logits = Logits::Rows;
    b.logit_rows = logit_rows;
  }
  model_.forward_mtp(rs_, mtp_kv_, b, hidden);
  if (nd == 0) return;
  // Drafts 0..K-1 of the drafting sequences (slot d = their order here).
  for (int d = 0; d < nd; d++) {
    Active& a = active_.at(drafting[size_t(d)].id);
    h_params_[size_t(d)] = draft_params(a.params.sampling);
    a.draft_slot = d;
  }
  backend_.from_host(draft_params_.data, h_params_.data(), sizeof(SamplingParams) * size_t(nd));
  std::vector<int32_t> ctok(static_cast<size_t>(nd)), cpos(static_cast<size_t>(nd)), cseq(static_cast<size_t>(nd));
  std::vector<int> ones(static_cast<size_t>(nd), 1);
  for (int j = 0; j < K; j++) {
    if (j > 0) {  // chained: draft j-1 at the next position, the layer's own output as the hidden state
      for (int d = 0; d < nd; d++) {
        ctok[size_t(d)] = h_drafts_[size_t((j - 1) * spec_stride_ + d)];
        cpos[size_t(d)] = drafting[size_t(d)].last_pos + j;
        cseq[size_t(d)] = drafting[size_t(d)].table;
      }
      // step 0's output rows of the drafting sequences, then the previous chained step's
      const TensorView h = j == 1 ? gathered(head(rs_.h, n), logit_rows) : head(rs_.h, nd);
      StepBatch cb;
      cb.tokens = ctok;
      cb.pos = cpos;
      cb.seq = cseq;
      cb.tables = h_tables_;
      cb.table_stride = stride;
      cb.runs = ones;
      cb.logits = Logits::All;
      model_.forward_mtp(rs_, mtp_kv_, cb, h);
    }
    for (int d = 0; d < nd; d++) h_steps_[size_t(d)] = int32_t(active_.at(drafting[size_t(d)].id).generated + j);
    backend_.from_host(spec_steps_.data, h_steps_.data(), 4 * size_t(nd));
    sample_drafts(nd, j);
    backend_.to_host(&h_drafts_[size_t(j * spec_stride_)], slice(spec_drafts_, int64_t(j) * spec_stride_, nd).data, 4 * size_t(nd));
  }
  for (int d = 0; d < nd; d++) {
    Active& a = active_.at(drafting[size_t(d)].id);
    a.drafts.resize(size_t(K));
    for (int j = 0; j < K; j++) a.drafts[size_t(j)] = h_drafts_[size_t(j * spec_stride_ + d)];
  }
}

void Engine::run_spec_graph_step(const Scheduler::Step& plan) {
  const int m = int(plan.chunks.size()), K = spec_, R = K + 1;
  const int B = std::min(spec_stride_, bucket_for(m));
  TRELLM_ASSERT(m >= 1 && m <= B && B * R <= rs_.max_tokens && B * R <= rs_.logit_rows);
  const size_t stride = size_t(graph_stride_);
  h_tables_.assign(size_t(B) * stride, pad_block_);
  std::vector<int32_t> src(static_cast<size_t>(B), 0);
  std::vector<SamplingParams> dparams(static_cast<size_t>(B));
  for (int i = 0; i < B; i++) {
    const bool pad = i >= m;  // padding: tokens 0 at positions 0..K of a table of spare blocks, greedy
    const Scheduler::Chunk* c = pad ? nullptr : &plan.chunks[size_t(i)];
    const Active* a = pad ? nullptr : &active_.at(c->id);
    for (int r = 0; r < R; r++) {
      const size_t row = size_t(i * R + r);
      h_tokens_[row] = pad ? 0 : r == 0 ? sched_.tokens(c->id)[size_t(c->start)] : a->drafts[size_t(r - 1)];
      h_pos_[row] = pad ? r : int32_t(c->start + r);
      h_seq_[row] = i;
    }
    h_params_[size_t(i)] = pad ? SamplingParams{0.0f, 0, 1.0f, 0.0f, 1} : a->params.sampling;
    dparams[size_t(i)] = draft_params(h_params_[size_t(i)]);
    h_steps_[size_t(i)] = pad ? 0 : int32_t(a->generated);
    if (pad) continue;
    src[size_t(i)] = a->draft_slot;
    const auto table = sched_.table(c->id);
    TRELLM_ASSERT(table.size() <= stride, "block table of ", table.size(), " blocks beyond the graph stride ", stride);
    std::copy(table.begin(), table.end(), h_tables_.begin() + ptrdiff_t(size_t(i) * stride));
  }
  backend_.from_host(rs_.tokens.data, h_tokens_.data(), 4 * size_t(B * R));
  backend_.from_host(rs_.pos.data, h_pos_.data(), 4 * size_t(B * R));
  backend_.from_host(rs_.seq.data, h_seq_.data(), 4 * size_t(B * R));
  backend_.from_host(rs_.tables.data, h_tables_.data(), 4 * h_tables_.size());
  backend_.from_host(params_.data, h_params_.data(), sizeof(SamplingParams) * size_t(B));
  backend_.from_host(steps_.data, h_steps_.data(), 4 * size_t(B));
  backend_.from_host(spec_src_.data, src.data(), 4 * size_t(B));
  backend_.from_host(draft_params_.data, dparams.data(), sizeof(SamplingParams) * size_t(B));
  auto body = [this, B, K, R] {
    const int64_t V = model_.config().vocab_size;
    Model::Layout l;
    l.n = B * R;
    l.bound = graph_stride_ * kKvBlockTokens;
    l.n_tables = B;
    l.table_stride = graph_stride_;
    l.runs = {spec_runs_.data(), size_t(B)};
    l.logits = Logits::All;
    model_.forward_uploaded(rs_, kv_, l);
    SpecVerify v;
    v.K = K;
    v.target = TensorView(rs_.logits.data, DType::F32, {B * R, V});
    v.draft = draft_logits_;
    v.draft_stride = spec_stride_;
    v.src = head(spec_src_, B);
    v.tokens = head(rs_.tokens, B * R);
    v.params = head(params_, int64_t(sizeof(SamplingParams)) * B);
    v.steps = head(steps_, B);
    v.out = head(spec_result_, int64_t(B) * (K + 2));
    backend_.spec_verify(v);
    SpecPrepare p;
    p.K = K;
    p.result = v.out;
    p.steps = v.steps;
    p.base = head(spec_base_, B);
    p.steps_out = head(spec_steps_, B);
    for (int j = 0; j < K; j++) {
      p.j = j;
      TensorView hidden = head(rs_.x, B * R);  // step 0: the main model's final hidden states of every row
      Model::Layout lj = l;
      if (j == 0) {
        p.tokens = head(rs_.tokens, B * R);
        p.pos = head(rs_.pos, B * R);
        p.logit_idx = head(rs_.logit_idx, B);
        lj.logits = Logits::Rows;
        lj.n_logits = B;
      } else {
        p.drafts = slice(spec_drafts_, int64_t(j - 1) * spec_stride_, B);
        p.tokens = head(rs_.tokens, B);
        p.pos = head(rs_.pos, B);
        p.seq = head(rs_.seq, B);
        p.logit_idx = TensorView();
        lj.n = B;
        lj.runs = {ones_.data(), size_t(B)};
        hidden = head(rs_.h, B);
        if (j == 1) {  // step 0's output rows of the last accepted positions
          hidden = head(rs_.y, B);
          backend_.gather_rows(hidden, head(rs_.h, B * R), head(rs_.logit_idx, B));
        }
      }
      backend_.spec_prepare(p);
      model_.forward_mtp_uploaded(rs_, mtp_kv_, lj, hidden);
      sample_drafts(B, j);
    }
  };
  run_captured(spec_graphs_[B], body);
  backend_.to_host(h_result_.data(), spec_result_.data, 4 * size_t(B) * size_t(K + 2));
  backend_.to_host(h_drafts_.data(), spec_drafts_.data, 4 * h_drafts_.size());
  graph_steps_++;
  sched_.computed(plan);
  for (int i = 0; i < m; i++) {
    const int64_t id = plan.chunks[size_t(i)].id;
    const int32_t* r = &h_result_[size_t(i) * size_t(K + 2)];
    Active& a = active_.at(id);
    a.drafts.clear();
    if (!emit(id, {r + 1, size_t(r[0]) + 1}, 0, K)) continue;
    a.drafts.resize(size_t(K));
    for (int j = 0; j < K; j++) a.drafts[size_t(j)] = h_drafts_[size_t(j * spec_stride_ + i)];
    a.draft_slot = i;
  }
}

}  // namespace trellm
