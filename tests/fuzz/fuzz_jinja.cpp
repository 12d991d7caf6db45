// libFuzzer target: the Jinja chat-template parser and renderer, template and variables both fuzzed.
// Input: TEMPLATE \0 JSON, where JSON is {"messages": ..., "tools": ..., "add_generation_prompt": bool,
// "extra": {...}} (the shape of tests/data/templates/expected.json's cases); without a NUL, or when the JSON does
// not parse, the template renders a fixed one-message chat. Parse and render errors are trellm::Errors.
#include <nlohmann/json.hpp>

#include "fuzz_util.h"
#include "runtime/chat_template.h"

using namespace trellm;
using ojson = nlohmann::ordered_json;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::Split in = fuzz::split_at_nul(data, size);
  std::optional<ChatTemplate> tpl;
  if (!fuzz::accepts([&] { tpl.emplace(std::string(in.first), "fuzz.jinja"); })) return 0;

  ojson messages = ojson::array({{{"role", "user"}, {"content", "Hello!"}}});
  ojson tools = nullptr, extra = ojson::object();
  bool agp = true;
  if (in.has_rest) {
    ojson j = ojson::parse(in.rest, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded()) {
      if (j.is_object()) {
        if (j.contains("messages")) messages = j["messages"];
        if (j.contains("tools")) tools = j["tools"];
        if (j.contains("add_generation_prompt") && j["add_generation_prompt"].is_boolean()) agp = j["add_generation_prompt"].get<bool>();
        if (j.contains("extra")) extra = j["extra"];
        if (j.contains("bos_token") && j["bos_token"].is_string()) tpl->bos_token = j["bos_token"].get<std::string>();
      } else {
        messages = j;
      }
    }
  }
  fuzz::accepts([&] { (void)tpl->render(messages, tools, agp, extra); });
  return 0;
}
