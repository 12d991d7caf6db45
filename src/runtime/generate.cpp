#include "runtime/generate.h"

#include <algorithm>

#include "core/error.h"
#include "core/timer.h"

namespace trellm {

Generator::Generator(Model& model, int context, int prefill_chunk, std::optional<DType> kv_dtype)
    : model_(model),
      rs_(model.make_run_state(std::max(1, std::min(prefill_chunk, context)))),
      kv_(model.make_kv_cache(context, kv_dtype)),
      logits_(size_t(model.config().vocab_size)) {}

std::vector<int32_t> Generator::generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                         const std::function<bool(int32_t)>& on_token, GenerateStats* stats) {
  const Config& c = model_.config();
  if (prompt.empty()) fail("the prompt is empty");
  for (int32_t t : prompt)
    if (t < 0 || t >= c.vocab_size) fail("prompt token id ", t, " is outside the vocabulary (0..", c.vocab_size - 1, ")");
  if (int64_t(prompt.size()) >= kv_.capacity)
    fail("the prompt has ", prompt.size(), " tokens but the context holds ", kv_.capacity,
         " (raise --ctx, up to max_position_embeddings = ", c.max_position_embeddings, ")");
  GenerateStats st;
  st.prompt_tokens = int(prompt.size());
  Sampler sampler(opt.sampling);
  Backend& B = model_.backend();
  Timer t;
  int pos = 0;
  const int P = int(prompt.size());
  while (pos < P) {
    const int n = std::min(rs_.max_tokens, P - pos);
    model_.forward(rs_, kv_, prompt.data() + pos, n, pos, false);
    pos += n;
  }
  B.to_host(logits_.data(), rs_.logits.data, logits_.size() * sizeof(float));
  st.prefill_s = t.seconds();
  t.reset();
  std::vector<int32_t> out;
  const int limit = std::min<int64_t>(opt.max_tokens, kv_.capacity - P);
  for (int i = 0; i < limit; i++) {
    int32_t tok = sampler.sample(logits_.data(), int64_t(logits_.size()));
    out.push_back(tok);
    bool eos = std::find(c.eos_token_id.begin(), c.eos_token_id.end(), tok) != c.eos_token_id.end();
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
  st.generated = int(out.size());
  if (stats) *stats = st;
  return out;
}

}  // namespace trellm
