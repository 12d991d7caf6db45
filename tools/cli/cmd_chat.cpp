// trellm chat: an interactive conversation through the model's chat template. Reasoning (<think>…</think>) is
// shown dimmed, or hidden with --hide-thinking; tool calls are printed as JSON.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "common.h"
#include "core/error.h"
#include "generation_args.h"
#include "model/glm4_moe_lite.h"
#include "runtime/chat_template.h"
#include "runtime/glm_output.h"
#include "runtime/tokenizer.h"

namespace trellm::cli {

namespace {

struct ChatArgs {
  GenerationArgs gen;
  std::string system;
  bool hide_thinking = false, no_thinking = false, plain = false;
};

int run_chat(const ChatArgs& a) {
  const std::string dir = resolve_model(a.gen.model);
  auto backend = make_backend(a.gen.device);
  auto model = Model::load(dir, *backend);
  Tokenizer tok = load_tokenizer(dir);
  ChatTemplate tpl = ChatTemplate::from_model_dir(dir);
  GenerateOptions opt = a.gen.options(dir, 1024);
  const int ctx = a.gen.context(model->config().max_position_embeddings);
  std::unique_ptr<Generator> gen;
  std::unique_ptr<EngineGenerator> spec;  // --speculative: the engine drafts with the MTP layer
  if (a.gen.speculative.empty()) gen = std::make_unique<Generator>(*model, ctx);
  else spec = std::make_unique<EngineGenerator>(*model, ctx, a.gen.draft_tokens);
  const bool tty = !a.plain && isatty(STDOUT_FILENO);
  const char* dim = tty ? "\x1b[2m" : "";
  const char* reset = tty ? "\x1b[0m" : "";

  nlohmann::ordered_json history = nlohmann::ordered_json::array();
  if (!a.system.empty()) history.push_back({{"role", "system"}, {"content", a.system}});
  std::fprintf(stderr, "trellm chat: %s on %s. Commands: /reset, /exit. Ctrl-D quits.\n", dir.c_str(), backend->name().c_str());
  std::string line;
  for (;;) {
    std::fputs(tty ? "\x1b[1m> \x1b[0m" : "> ", stdout);
    std::fflush(stdout);
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      history = nlohmann::ordered_json::array();
      if (!a.system.empty()) history.push_back({{"role", "system"}, {"content", a.system}});
      std::fputs("(conversation cleared)\n", stdout);
      continue;
    }
    if (line.empty()) continue;
    history.push_back({{"role", "user"}, {"content", line}});
    const std::string prompt_text = tpl.render(history, nullptr, true, {{"enable_thinking", !a.no_thinking}});
    std::vector<int32_t> prompt = tok.encode(prompt_text);
    if (int64_t(prompt.size()) + 1 >= ctx) {
      std::fprintf(stderr, "trellm: the conversation (%zu tokens) no longer fits the context of %d; /reset to start over\n",
                   prompt.size(), ctx);
      history.erase(history.end() - 1);
      continue;
    }
    // The generation prompt ends with <think> when thinking is on: the reply starts inside the reasoning.
    const bool thinking_open = prompt_text.size() >= 7 && prompt_text.compare(prompt_text.size() - 7, 7, "<think>") == 0;
    GlmOutputParser parser(thinking_open);
    // GLM's <think>, <tool_call>, <arg_key>, ... are special tokens the parser needs: keep special tokens in the
    // text, and leave out only the stop tokens that end the reply.
    StreamDecoder dec(tok, /*skip_special_tokens=*/false);
    auto is_stop = [&](int32_t t) {
      const auto& c = model->config().eos_token_id;
      return std::find(c.begin(), c.end(), int64_t(t)) != c.end() ||
             std::find(opt.extra_stop_ids.begin(), opt.extra_stop_ids.end(), int64_t(t)) != opt.extra_stop_ids.end();
    };
    std::string content, reasoning;
    bool in_reasoning = false;
    auto show = [&](const std::vector<GlmEvent>& evs) {
      for (const GlmEvent& e : evs) {
        if (e.type == GlmEvent::Reasoning) {
          reasoning += e.text;
          if (a.hide_thinking) continue;
          if (!in_reasoning) std::fputs(dim, stdout), in_reasoning = true;
          std::fputs(e.text.c_str(), stdout);
        } else {
          if (in_reasoning) std::fputs(reset, stdout), in_reasoning = false;
          if (e.type == GlmEvent::Content) {
            content += e.text;
            std::fputs(e.text.c_str(), stdout);
          } else {
            std::printf("[tool call] %s %s\n", e.name.c_str(), e.arguments.dump().c_str());
          }
        }
      }
      std::fflush(stdout);
    };
    GenerateStats st;
    auto on_token = [&](int32_t t) {
      if (!is_stop(t)) show(parser.feed(dec.push(t)));
      return true;
    };
    if (gen) gen->generate(prompt, opt, on_token, &st);
    else spec->generate(prompt, opt, on_token, &st);
    show(parser.feed(dec.finish()));
    show(parser.finish());
    if (in_reasoning) std::fputs(reset, stdout);
    std::fprintf(stdout, "\n");
    std::fprintf(stderr, "%s[%d tokens, %.1f tok/s%s%s]%s\n", dim, st.generated, st.decode_tok_s(), spec ? "; " : "",
                 spec ? spec->acceptance().c_str() : "", reset);
    nlohmann::ordered_json reply = {{"role", "assistant"}, {"content", content}};
    if (!reasoning.empty()) reply["reasoning_content"] = reasoning;
    history.push_back(reply);
  }
  return 0;
}

}  // namespace

void add_chat(CLI::App& app) {
  static ChatArgs a;
  auto* cmd = app.add_subcommand("chat", "Interactive chat through the model's chat template");
  a.gen.add_to(cmd);
  cmd->add_option("--system", a.system, "System prompt");
  cmd->add_flag("--hide-thinking", a.hide_thinking, "Do not show the reasoning (<think>...</think>)");
  cmd->add_flag("--no-thinking", a.no_thinking, "enable_thinking=false: the model answers without reasoning");
  cmd->add_flag("--plain", a.plain, "No terminal colours");
  cmd->callback([] { std::exit(run_chat(a)); });
}

}  // namespace trellm::cli
