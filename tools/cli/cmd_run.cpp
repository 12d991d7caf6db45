// trellm run: generate from a prompt (text through the model's tokenizer, or token ids), streaming the text.
#include <cstdio>

#include "common.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "generation_args.h"
#include "model/glm4_moe_lite.h"
#include "runtime/chat_template.h"
#include "runtime/tokenizer.h"

namespace trellm::cli {

namespace {

struct RunArgs {
  GenerationArgs gen;
  std::string prompt, prompt_ids, system;
  bool print_ids = false, chat = false, no_thinking = false;
};

int run(const RunArgs& a) {
  const std::string dir = resolve_model(a.gen.model);
  if (a.prompt.empty() == a.prompt_ids.empty()) fail("give exactly one of --prompt \"text\" and --prompt-ids 1,2,3");
  if (a.gen.max_tokens < -1) fail("--max-tokens must be >= 0");
  auto backend = make_backend(a.gen.device);
  auto model = Model::load(dir, *backend);
  const Config& c = model->config();
  GenerateOptions opt = a.gen.options(dir, 128);

  std::optional<Tokenizer> tok;
  std::vector<int32_t> prompt;
  if (!a.prompt.empty()) {
    tok = load_tokenizer(dir);
    std::string text = a.prompt;
    if (a.chat) {  // the model's chat template, the prompt as one user turn
      ChatTemplate tpl = ChatTemplate::from_model_dir(dir);
      nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
      if (!a.system.empty()) msgs.push_back({{"role", "system"}, {"content", a.system}});
      msgs.push_back({{"role", "user"}, {"content", a.prompt}});
      text = tpl.render(msgs, nullptr, true, {{"enable_thinking", !a.no_thinking}});
    }
    prompt = tok->encode(text);
    if (prompt.empty()) fail("--prompt encodes to no tokens");
  } else {
    prompt = parse_ids(a.prompt_ids);
  }
  const int ctx = a.gen.context(c.max_position_embeddings);
  const int gen_ctx = int(std::min<int64_t>(ctx, int64_t(prompt.size()) + opt.max_tokens + 1));
  std::unique_ptr<Generator> gen;
  std::unique_ptr<EngineGenerator> spec;  // --speculative: the engine drafts with the MTP layer
  if (a.gen.speculative.empty()) gen = std::make_unique<Generator>(*model, gen_ctx);
  else spec = std::make_unique<EngineGenerator>(*model, gen_ctx, a.gen.draft_tokens);

  // Stream: text as it completes (never half a character), or ids collected for --print-ids.
  const bool stream_text = tok && !a.print_ids;
  std::optional<StreamDecoder> dec;
  if (stream_text) dec.emplace(*tok);
  GenerateStats st;
  auto on_token = [&](int32_t t) {
    if (stream_text) {
      std::fputs(dec->push(t).c_str(), stdout);
      std::fflush(stdout);
    }
    return true;
  };
  std::vector<int32_t> out = gen ? gen->generate(prompt, opt, on_token, &st) : spec->generate(prompt, opt, on_token, &st);
  if (stream_text) {
    std::fputs(dec->finish().c_str(), stdout);
  } else {
    for (size_t i = 0; i < out.size(); i++) std::printf(i ? " %d" : "%d", out[i]);
  }
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "trellm: %d prompt tokens in %.3f s (%.1f tok/s), %d generated in %.3f s (%.1f tok/s)%s [%s, %d threads]\n",
               st.prompt_tokens, st.prefill_s, st.prefill_tok_s(), st.generated, st.decode_s, st.decode_tok_s(),
               st.hit_eos ? ", stopped at EOS" : "", backend->name().c_str(), ThreadPool::global().size());
  if (spec) std::fprintf(stderr, "trellm: speculative decoding (MTP, %d draft tokens): %s\n", a.gen.draft_tokens, spec->acceptance().c_str());
  return 0;
}

}  // namespace

void add_run(CLI::App& app) {
  static RunArgs a;
  auto* cmd = app.add_subcommand("run", "Generate text from a prompt");
  a.gen.add_to(cmd);
  cmd->add_option("-p,--prompt", a.prompt, "Prompt text (tokenized with the model's tokenizer.json)");
  cmd->add_option("--prompt-ids", a.prompt_ids, "Prompt as token ids, e.g. 1,2,3");
  cmd->add_flag("--chat", a.chat, "Wrap the prompt in the model's chat template as a user turn");
  cmd->add_option("--system", a.system, "System prompt (with --chat)");
  cmd->add_flag("--no-thinking", a.no_thinking, "With --chat: enable_thinking=false (GLM answers without reasoning)");
  cmd->add_flag("--print-ids", a.print_ids, "Print the generated ids space-separated on one stdout line instead of text");
  cmd->callback([] { std::exit(run(a)); });
}

}  // namespace trellm::cli
