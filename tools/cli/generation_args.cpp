#include "generation_args.h"

#include <algorithm>
#include <cstdio>

#include "core/timer.h"

#include "core/error.h"
#include "format/generation_config.h"

namespace trellm::cli {

void GenerationArgs::add_to(CLI::App* cmd) {
  cmd->add_option("-m,--model", model, "Model directory (default: the built-in model)");
  cmd->add_option("-n,--max-tokens", max_tokens, "Tokens to generate per reply");
  cmd->add_option("--ctx", ctx, "Context length, prompt + generated (default: min(4096, max_position_embeddings))");
  cmd->add_option("--temperature", temperature, "Sampling temperature; 0 = greedy (default: generation_config.json, else 1)");
  cmd->add_option("--top-k", top_k, "Keep the k most likely tokens; 0 = off");
  cmd->add_option("--top-p", top_p, "Nucleus sampling mass; 1 = off");
  cmd->add_option("--min-p", min_p, "Drop tokens below min-p x the top probability; 0 = off");
  cmd->add_option("--seed", seed, "Sampling seed (0 = random)");
  cmd->add_flag("--ignore-eos", ignore_eos, "Keep generating past EOS tokens");
  cmd->add_option("--device", device, "cpu, cuda, cuda:N, or auto (the GPU when there is one)")->capture_default_str();
  cmd->add_option("--speculative", speculative,
                  "Speculative decoding: 'mtp' drafts with the model's MTP layer and verifies the drafts in one forward "
                  "(the output is the model's own: greedy gives exactly the same tokens)")
      ->check(CLI::IsMember({"mtp"}));
  cmd->add_option("--draft-tokens", draft_tokens, "Draft tokens per step with --speculative")
      ->check(CLI::Range(1, kMaxDraftTokens))
      ->capture_default_str();
}

EngineGenerator::EngineGenerator(Model& model, int context, int draft_tokens) {
  EngineOptions o;
  o.max_seqs = 1;
  o.context = context;
  o.draft_tokens = draft_tokens;
  o.spec_max_seqs = 1;
  o.kv_blocks = kv_blocks_for(context);
  engine_ = std::make_unique<Engine>(model, o);
}

std::vector<int32_t> EngineGenerator::generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                               const std::function<bool(int32_t)>& on_token, GenerateStats* stats) {
  GenParams p;
  p.sampling = opt.sampling;
  p.max_tokens = std::min<int64_t>(opt.max_tokens, engine_->context() - int64_t(prompt.size()));
  if (p.max_tokens < 1) fail("the prompt has ", prompt.size(), " tokens but the context holds ", engine_->context(), " (raise --ctx)");
  p.ignore_eos = !opt.stop_at_eos;
  if (opt.stop_at_eos) p.stop_ids.assign(opt.extra_stop_ids.begin(), opt.extra_stop_ids.end());
  GenerateStats st;
  st.prompt_tokens = int(prompt.size());
  Timer t;
  auto req = engine_->submit(prompt, p);
  std::vector<int32_t> out;
  std::vector<GenToken> got;
  FinishReason r = FinishReason::None;
  while (r == FinishReason::None) {
    engine_->step();
    got.clear();
    r = req->wait(got, std::chrono::milliseconds(0));
    for (const GenToken& g : got) {
      if (out.empty()) st.prefill_s = t.seconds(), t.reset();
      out.push_back(g.id);
      if (on_token && !on_token(g.id)) {
        req->cancel();
        engine_->run_until_idle();
        r = FinishReason::Cancelled;
        break;
      }
    }
  }
  if (r == FinishReason::Error) fail(req->error());
  st.decode_s = out.empty() ? 0 : t.seconds();
  st.generated = int(out.size());
  const Config& c = engine_->model().config();
  st.hit_eos = !out.empty() && (std::find(c.eos_token_id.begin(), c.eos_token_id.end(), int64_t(out.back())) != c.eos_token_id.end() ||
                                std::find(p.stop_ids.begin(), p.stop_ids.end(), out.back()) != p.stop_ids.end());
  if (stats) *stats = st;
  return out;
}

std::string EngineGenerator::acceptance() const {
  const Engine::Stats s = engine_->stats();
  char buf[160];
  std::snprintf(buf, sizeof buf, "drafts accepted %lld of %lld (%.1f %%), %.2f tokens per verification step",
                (long long)s.spec_accepted_tokens, (long long)s.spec_draft_tokens,
                s.spec_draft_tokens ? 100.0 * double(s.spec_accepted_tokens) / double(s.spec_draft_tokens) : 0.0,
                s.spec_steps ? double(s.spec_accepted_tokens + s.spec_steps) / double(s.spec_steps) : 0.0);
  return buf;
}

SamplingParams sampling_defaults(const GenerationConfig& gc) {
  SamplingParams sp;
  sp.temperature = float(gc.temperature.value_or(1.0));
  if (gc.do_sample.has_value() && !*gc.do_sample) sp.temperature = 0;
  sp.top_k = int(gc.top_k.value_or(0));
  sp.top_p = float(gc.top_p.value_or(1.0));
  sp.min_p = float(gc.min_p.value_or(0.0));
  return sp;
}

GenerateOptions GenerationArgs::options(const std::string& dir, int default_max_tokens) const {
  GenerationConfig gc = GenerationConfig::from_dir(dir);
  GenerateOptions opt;
  opt.max_tokens = max_tokens >= 0 ? max_tokens : default_max_tokens;
  opt.stop_at_eos = !ignore_eos;
  SamplingParams& sp = opt.sampling;
  sp = sampling_defaults(gc);  // then the flags given
  if (temperature >= 0) sp.temperature = temperature;
  if (top_k >= 0) sp.top_k = top_k;
  if (top_p >= 0) sp.top_p = top_p;
  if (min_p >= 0) sp.min_p = min_p;
  sp.seed = seed;
  opt.extra_stop_ids.assign(gc.eos_token_id.begin(), gc.eos_token_id.end());
  return opt;
}

int GenerationArgs::context(int64_t max_pos) const {
  if (ctx != 0 && ctx < 2) fail("--ctx must be at least 2");
  if (ctx > max_pos) fail("--ctx ", ctx, " exceeds the model's max_position_embeddings = ", max_pos);
  return int(ctx ? ctx : std::min<int64_t>(4096, max_pos));
}

}  // namespace trellm::cli
