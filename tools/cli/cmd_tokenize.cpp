// trellm tokenize: token ids and pieces of a text, with the model's tokenizer.
#include <cstdio>
#include <iostream>
#include <iterator>

#include "common.h"
#include "core/error.h"

namespace trellm::cli {

namespace {
struct TokArgs {
  std::string model, text;
  bool ids_only = false, special = false;
};

int run_tokenize(const TokArgs& a) {
  const std::string dir = resolve_model(a.model);
  Tokenizer tok = load_tokenizer(dir);
  std::string text = a.text;
  if (text.empty()) text.assign(std::istreambuf_iterator<char>(std::cin), {});
  std::vector<int32_t> ids = tok.encode(text, a.special);
  if (a.ids_only) {
    for (size_t i = 0; i < ids.size(); i++) std::printf(i ? " %d" : "%d", ids[i]);
    std::printf("\n");
    return 0;
  }
  for (int32_t id : ids) {
    std::string bytes;
    tok.token_bytes(id, bytes);
    std::string shown;
    for (unsigned char c : bytes) {  // show control bytes and invalid pieces escaped
      if (c == '\n') shown += "\\n";
      else if (c == '\t') shown += "\\t";
      else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\x%02x", c); shown += b; }
      else shown += char(c);
    }
    std::printf("%8d  %s%s\n", id, shown.c_str(), tok.is_special(id) ? "  (special)" : "");
  }
  std::fprintf(stderr, "trellm: %zu tokens\n", ids.size());
  return 0;
}
}  // namespace

void add_tokenize(CLI::App& app) {
  static TokArgs a;
  auto* cmd = app.add_subcommand("tokenize", "Print the token ids and pieces of a text (from --text or stdin)");
  cmd->add_option("-m,--model", a.model, "Model directory with tokenizer.json (default: the built-in model)");
  cmd->add_option("--text", a.text, "Text to tokenize (default: read stdin)");
  cmd->add_flag("--ids-only", a.ids_only, "Print only the ids, space-separated on one line");
  cmd->add_flag("--add-special-tokens", a.special, "Add the post-processor's special tokens (like HF encode)");
  cmd->callback([] { std::exit(run_tokenize(a)); });
}

}  // namespace trellm::cli
