// trellm run: generate from a prompt.
#include <cstdio>

#include "common.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "format/generation_config.h"
#include "model/glm4_moe_lite.h"
#include "runtime/generate.h"

namespace trellm::cli {

namespace {

struct RunArgs {
  std::string model, prompt_ids, device = "auto";
  int max_tokens = 64, ctx = 0, top_k = -1;  // ctx 0: min(4096, max_position_embeddings)
  float temperature = -1, top_p = -1, min_p = -1;
  uint64_t seed = 0;
  bool print_ids = false, ignore_eos = false;
};

int run(const RunArgs& a) {
  const std::string dir = resolve_model(a.model);
  auto backend = make_backend(a.device);
  auto model = Model::load(dir, *backend);
  const Config& c = model->config();

  // Sampling: flags override the model's generation_config.json, which overrides transformers' defaults.
  GenerationConfig gc = GenerationConfig::from_dir(dir);
  GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  opt.stop_at_eos = !a.ignore_eos;
  SamplingParams& sp = opt.sampling;
  sp.temperature = a.temperature >= 0 ? a.temperature : float(gc.temperature.value_or(1.0));
  if (a.temperature < 0 && gc.do_sample.has_value() && !*gc.do_sample) sp.temperature = 0;
  sp.top_k = a.top_k >= 0 ? a.top_k : int(gc.top_k.value_or(0));
  sp.top_p = a.top_p >= 0 ? a.top_p : float(gc.top_p.value_or(1.0));
  sp.min_p = a.min_p >= 0 ? a.min_p : float(gc.min_p.value_or(0.0));
  sp.seed = a.seed;

  if (a.prompt_ids.empty()) fail("give a prompt with --prompt-ids 1,2,3 (text prompts arrive with the tokenizer)");
  std::vector<int32_t> prompt = parse_ids(a.prompt_ids);
  if (a.max_tokens < 0) fail("--max-tokens must be >= 0");
  if (a.ctx != 0 && a.ctx < 2) fail("--ctx must be at least 2");
  if (a.ctx > c.max_position_embeddings)
    fail("--ctx ", a.ctx, " exceeds the model's max_position_embeddings = ", c.max_position_embeddings);
  const int64_t max_ctx = a.ctx ? a.ctx : std::min<int64_t>(4096, c.max_position_embeddings);
  // Allocate only what this run can use.
  const int ctx = int(std::min<int64_t>(max_ctx, int64_t(prompt.size()) + a.max_tokens + 1));

  Generator gen(*model, std::max<int>(ctx, 2));
  GenerateStats st;
  std::vector<int32_t> out = gen.generate(prompt, opt, nullptr, &st);
  for (size_t i = 0; i < out.size(); i++) std::printf(i ? " %d" : "%d", out[i]);
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "trellm: %d prompt tokens in %.3f s (%.1f tok/s), %d generated in %.3f s (%.1f tok/s)%s [%s, %d threads]\n",
               st.prompt_tokens, st.prefill_s, st.prefill_tok_s(), st.generated, st.decode_s, st.decode_tok_s(),
               st.hit_eos ? ", stopped at EOS" : "", backend->name().c_str(), ThreadPool::global().size());
  return 0;
}

}  // namespace

void add_run(CLI::App& app) {
  static RunArgs a;
  auto* cmd = app.add_subcommand("run", "Generate tokens from a prompt");
  cmd->add_option("-m,--model", a.model, "Model directory (default: the built-in model)");
  cmd->add_option("--prompt-ids", a.prompt_ids, "Prompt as token ids, e.g. 1,2,3");
  cmd->add_option("-n,--max-tokens", a.max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--ctx", a.ctx, "Context length limit, prompt + generated (default: min(4096, max_position_embeddings))");
  cmd->add_option("--temperature", a.temperature, "Sampling temperature; 0 = greedy (default: generation_config.json, else 1)");
  cmd->add_option("--top-k", a.top_k, "Keep the k most likely tokens; 0 = off");
  cmd->add_option("--top-p", a.top_p, "Nucleus sampling mass; 1 = off");
  cmd->add_option("--min-p", a.min_p, "Drop tokens below min-p × the top probability; 0 = off");
  cmd->add_option("--seed", a.seed, "Sampling seed (0 = random)");
  cmd->add_flag("--print-ids", a.print_ids, "Print the generated ids space-separated on one stdout line");
  cmd->add_flag("--ignore-eos", a.ignore_eos, "Keep generating past EOS tokens");
  cmd->add_option("--device", a.device, "cpu, cuda, cuda:N, or auto (the GPU when there is one)")->capture_default_str();
  cmd->callback([] { std::exit(run(a)); });
}

}  // namespace trellm::cli
