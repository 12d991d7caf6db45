// Test helper (not part of the product): renders chat templates for the pytest oracle comparison (jinja2).
//   template_tool TEMPLATE_FILE < cases.jsonl > replies.jsonl
//     case:  {"messages": [...], "tools": [...]|null, "add_generation_prompt": bool, "extra": {...},
//             "bos_token": "..."?, "eos_token": "..."?}
//     reply: {"text": "..."} or {"error": "..."}
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "format/tokenizer_json.h"
#include "runtime/chat_template.h"

using nlohmann::ordered_json;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: template_tool TEMPLATE_FILE < cases.jsonl\n";
    return 2;
  }
  std::unique_ptr<trellm::ChatTemplate> tpl;
  std::string parse_error;
  try {
    tpl = std::make_unique<trellm::ChatTemplate>(trellm::format::read_text_file(argv[1]), "template");
  } catch (const trellm::Error& e) {
    parse_error = e.what();
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    ordered_json reply;
    try {
      if (!tpl) throw trellm::Error(parse_error);
      ordered_json c = ordered_json::parse(line);
      trellm::ChatTemplate t = *tpl;
      if (c.contains("bos_token")) t.bos_token = c["bos_token"].get<std::string>();
      if (c.contains("eos_token")) t.eos_token = c["eos_token"].get<std::string>();
      reply["text"] = t.render(c["messages"], c.value("tools", ordered_json()), c.value("add_generation_prompt", false),
                               c.value("extra", ordered_json::object()));
    } catch (const std::exception& e) {
      reply["error"] = e.what();
    }
    std::cout << reply.dump() << '\n';
  }
  return 0;
}
