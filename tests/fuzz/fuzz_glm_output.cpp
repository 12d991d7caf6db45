// libFuzzer target: the GLM output parser (reasoning / content / tool calls) fed the generated text in arbitrary
// chunks. Input: byte 0 = thinking_open (bit 0) and the seed of the chunk sizes (the rest of the byte and byte 1);
// the remaining bytes are the text. Oracle: however the text is cut, the merged events equal those of one feed()
// of the whole text (the parser promises it never emits text that could still start a tag).
#include <nlohmann/json.hpp>

#include "fuzz_util.h"
#include "runtime/glm_output.h"

using namespace trellm;

namespace {
// Appends `evs` to `all`, merging adjacent text deltas of one kind (the parser's own merging is per feed() call).
void collect(std::vector<GlmEvent>& all, std::vector<GlmEvent>&& evs) {
  for (auto& e : evs) {
    if (e.type != GlmEvent::ToolCall && e.text.empty()) {
      std::fprintf(stderr, "fuzz_glm_output: an empty text event\n");
      std::abort();
    }
    if (!all.empty() && e.type != GlmEvent::ToolCall && all.back().type == e.type) all.back().text += e.text;
    else all.push_back(std::move(e));
  }
}

bool same(const std::vector<GlmEvent>& a, const std::vector<GlmEvent>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++)
    if (a[i].type != b[i].type || a[i].text != b[i].text || a[i].name != b[i].name || a[i].arguments != b[i].arguments)
      return false;
  return true;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const bool thinking_open = data[0] & 1;
  uint32_t rng = (uint32_t(data[0]) << 8 | data[1]) * 2654435761u + 1;
  std::string_view text(reinterpret_cast<const char*>(data + 2), size - 2);

  std::vector<GlmEvent> whole, chunked;
  {
    GlmOutputParser p(thinking_open);
    collect(whole, p.feed(text));
    collect(whole, p.finish());
  }
  {
    GlmOutputParser p(thinking_open);
    size_t at = 0;
    while (at < text.size()) {
      rng = rng * 1103515245u + 12345u;
      size_t n = (rng >> 16) % 17;  // 0..16 bytes: empty chunks too
      n = std::min(n, text.size() - at);
      collect(chunked, p.feed(text.substr(at, n)));
      at += n;
    }
    collect(chunked, p.finish());
  }
  if (!same(whole, chunked)) {
    std::fprintf(stderr, "fuzz_glm_output: chunked parse differs from the whole-text parse (%zu vs %zu events)\n",
                 chunked.size(), whole.size());
    std::abort();
  }
  (void)parse_glm_output(text, thinking_open);
  // A tool-call body on its own (what the server's forced tool_choice path parses).
  std::string name;
  nlohmann::ordered_json args;
  (void)parse_glm_tool_call(text, name, args);
  if (!args.is_null()) (void)args.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  return 0;
}
