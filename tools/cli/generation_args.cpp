#include "generation_args.h"

#include <algorithm>

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
