#include "runtime/generate.h"

#include <algorithm>

#include "core/error.h"
#include "core/timer.h"

namespace trellm {

namespace {
bool is_stop(const Config& c, const GenerateOptions& opt, int32_t tok) {
  return std::find(c.eos_token_id.begin(), c.eos_token_id.end(), tok) != c.eos_token_id.end() ||
         std::find(opt.extra_stop_ids.begin(), opt.extra_stop_ids.end(), tok) != opt.extra_stop_ids.end();
}
TensorView first(TensorView t, int64_t n) {
  t.shape[0] = n;
  return t;
}
}  // namespace

Generator::Generator(Model& model, int context, int prefill_chunk, std::optional<DType> kv_dtype)
    : model_(model),
      context_(context),
      rs_(model.make_run_state(std::max(1, std::min(prefill_chunk, context)), 1, 1,
                               kv_blocks_for(context))),
      kv_(model.make_kv_cache(context, kv_dtype)),
      logits_(size_t(model.config().vocab_size)) {
  history_ = TensorView(model.backend().alloc(size_t(context + 1) * 4), DType::I32, {context + 1});
  params_ = TensorView(model.backend().alloc(sizeof(SamplingParams)), DType::U8, {int64_t(sizeof(SamplingParams))});
  // The one sequence owns the whole cache: block table 0, 1, 2, ... (the captured decode step reads it at every
  // position; single-sequence forward() calls rewrite its prefix with the same ids).
  std::vector<int32_t> table(size_t(kv_.blocks));
  for (int b = 0; b < kv_.blocks; b++) table[size_t(b)] = b;
  TRELLM_ASSERT(kv_.blocks <= rs_.max_blocks, "context of ", context, " tokens beyond the run state's block tables");
  model.backend().from_host(rs_.tables.data, table.data(), table.size() * 4);
  const int32_t zero = 0;
  model.backend().from_host(rs_.seq.data, &zero, 4);
}

Model::Layout Generator::decode_layout() const {
  Model::Layout l;
  l.n = 1;
  l.bound = context();
  l.table_stride = kv_.blocks;
  return l;
}

Generator::~Generator() {
  step_.reset();
  model_.backend().release(history_.data);
  model_.backend().release(params_.data);
}

void Generator::prefill(const std::vector<int32_t>& prompt) {
  int pos = 0;
  const int P = int(prompt.size());
  while (pos < P) {
    const int n = std::min(rs_.max_tokens, P - pos);
    model_.forward(rs_, kv_, prompt.data() + pos, n, pos, false);
    pos += n;
  }
}

std::vector<int32_t> Generator::generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                         const std::function<bool(int32_t)>& on_token, GenerateStats* stats) {
  const Config& c = model_.config();
  if (prompt.empty()) fail("the prompt is empty");
  for (int32_t t : prompt)
    if (t < 0 || t >= c.vocab_size) fail("prompt token id ", t, " is outside the vocabulary (0..", c.vocab_size - 1, ")");
  if (int64_t(prompt.size()) >= context())
    fail("the prompt has ", prompt.size(), " tokens but the context holds ", context(),
         " (raise --ctx, up to max_position_embeddings = ", c.max_position_embeddings, ")");
  GenerateStats st;
  st.prompt_tokens = int(prompt.size());
  const int P = int(prompt.size());
  const int limit = int(std::min<int64_t>(opt.max_tokens, context() - P));
  Backend& B = model_.backend();
  Timer t;
  prefill(prompt);
  B.synchronize();
  st.prefill_s = t.seconds();
  std::vector<int32_t> out;
  validate_sampling(opt.sampling);
  SamplingParams sp = opt.sampling;
  sp.seed = resolve_seed(sp.seed);
  if (limit > 0 && opt.use_graph) {
    out = generate_graph(P, limit, opt, sp, on_token, st);
  } else if (limit > 0) {
    Sampler sampler(sp);
    t.reset();
    B.to_host(logits_.data(), rs_.logits.data, logits_.size() * sizeof(float));
    int pos = P;
    for (int i = 0; i < limit; i++) {
      int32_t tok = sampler.sample(logits_.data(), int64_t(logits_.size()));
      out.push_back(tok);
      bool eos = is_stop(c, opt, tok);
      if (on_token && !on_token(tok)) break;
      if (eos && opt.stop_at_eos) {
        st.hit_eos = true;
        break;
      }
      if (i + 1 == limit) break;
      model_.forward(rs_, kv_, &tok, 1, pos++, false);
      B.to_host(logits_.data(), rs_.logits.data, logits_.size() * sizeof(float));
    }
    st.decode_s = t.seconds();
  }
  st.generated = int(out.size());
  if (stats) *stats = st;
  return out;
}

void Generator::ensure_step_captured() {
  // Captured once; again when the backend reallocated scratch the graph points to (a longer prefill since).
  if (step_ && step_epoch_ == model_.backend().memory_epoch()) return;
  step_.reset();
  // One uncaptured run at the full bound sizes every scratch buffer; the capture then records the step. The
  // warm-up computes the same step the first replay recomputes (same token, same position), so it is harmless.
  TensorView tok = first(rs_.tokens, 1), pos = first(rs_.pos, 1);
  const Model::Layout l = decode_layout();
  model_.forward_uploaded(rs_, kv_, l);
  step_epoch_ = model_.backend().memory_epoch();
  step_ = model_.backend().capture([this, tok, pos, l] {
    model_.forward_uploaded(rs_, kv_, l);
    model_.backend().sample_step(first(rs_.logits, 1), params_, tok, pos, history_);
  });
}

std::vector<int32_t> Generator::decode_steps(int32_t token, int pos, int steps) {
  TRELLM_ASSERT(pos >= 0 && pos + steps <= context() && steps >= 1);
  Backend& B = model_.backend();
  const int32_t zero = 0;
  SamplingParams greedy;
  greedy.temperature = 0;
  B.from_host(params_.data, &greedy, sizeof greedy);
  B.from_host(rs_.tokens.data, &token, 4);
  B.from_host(rs_.pos.data, &pos, 4);
  B.from_host(history_.data, &zero, 4);
  ensure_step_captured();
  for (int i = 0; i < steps; i++) step_->launch();
  std::vector<int32_t> out(static_cast<size_t>(steps));
  B.to_host(out.data(), history_.ptr<int32_t>() + 1, out.size() * 4);
  return out;
}

// Decoding as a replayed step: [forward one token at the device-held position; sample into the token slot;
// position += 1; append to history]. The host launches steps and reads the new tokens every opt.read_every
// launches; a step launched past an EOS only writes cache rows that are never read.
std::vector<int32_t> Generator::generate_graph(int P, int limit, const GenerateOptions& opt, const SamplingParams& sp,
                                               const std::function<bool(int32_t)>& on_token, GenerateStats& st) {
  const Config& c = model_.config();
  Backend& B = model_.backend();
  Timer t;
  TensorView tok = first(rs_.tokens, 1), pos = first(rs_.pos, 1);
  const int32_t init[2] = {0, P - 1};
  B.from_host(history_.data, &init[0], 4);
  B.from_host(pos.data, &init[1], 4);
  B.from_host(params_.data, &sp, sizeof sp);
  B.sample_step(first(rs_.logits, 1), params_, tok, pos, history_);  // the first token, from the prefill's logits
  ensure_step_captured();
  std::vector<int32_t> out;
  int launched = 1;  // tokens produced on the device so far (the first came from the prefill)
  const int every = std::max(1, opt.read_every);
  bool stop = false;
  while (!stop) {
    // Produce up to `every` more tokens, never more than the limit.
    const int target = std::min(limit, launched + (out.empty() ? 0 : every));
    while (launched < target) {
      step_->launch();
      launched++;
    }
    const int have = int(out.size());
    std::vector<int32_t> fresh(size_t(launched - have));
    B.to_host(fresh.data(), history_.ptr<int32_t>() + 1 + have, fresh.size() * 4);
    for (int32_t tk : fresh) {
      out.push_back(tk);
      const bool eos = is_stop(c, opt, tk);
      if ((on_token && !on_token(tk)) || (eos && opt.stop_at_eos) || int(out.size()) == limit) {
        st.hit_eos = eos && opt.stop_at_eos;
        stop = true;
        break;
      }
    }
  }
  st.decode_s = t.seconds();
  return out;
}

}  // namespace trellm
