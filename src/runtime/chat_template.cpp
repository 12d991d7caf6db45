#include "runtime/chat_template.h"

#include <filesystem>

#include "core/error.h"
#include "format/json_file.h"
#include "format/tokenizer_json.h"
#include "runtime/jinja/ast.h"
#include "runtime/jinja/interp.h"

namespace trellm {

ChatTemplate::ChatTemplate(const std::string& source, const std::string& name)
    : tpl_(jinja::parse_template(source, name)) {}

namespace {
std::optional<std::string> token_string(const nlohmann::ordered_json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}
}  // namespace

ChatTemplate ChatTemplate::from_model_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::string cfg_path = (fs::path(dir) / "tokenizer_config.json").string();
  nlohmann::ordered_json cfg = nlohmann::ordered_json::object();
  if (fs::exists(cfg_path)) {
    std::string text = format::read_text_file(cfg_path);
    check_json_depth(text, cfg_path);  // ordered_json copies nested values recursively while parsing
    try {
      cfg = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      fail(cfg_path, ":", format::line_col(text, e.byte ? e.byte - 1 : 0), ": malformed JSON");
    } catch (const nlohmann::json::exception& e) {  // out_of_range.406: a number too large for a double
      fail(cfg_path, ": malformed JSON: ", e.what());
    }
  }
  std::string jinja_path = (fs::path(dir) / "chat_template.jinja").string();
  std::string source, name;
  if (fs::exists(jinja_path)) {
    source = format::read_text_file(jinja_path);
    name = jinja_path;
  } else {
    auto it = cfg.find("chat_template");
    if (it == cfg.end() || it->is_null()) fail(dir, ": no chat_template.jinja and no chat_template in tokenizer_config.json");
    if (it->is_string()) {
      source = it->get<std::string>();
    } else if (it->is_array()) {
      for (const auto& e : *it)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template")) source = e["template"].get<std::string>();
      if (source.empty()) fail(cfg_path, ": chat_template: no entry named \"default\"");
    } else {
      fail(cfg_path, ": chat_template: expected a string or a list of {name, template}");
    }
    name = cfg_path + " (chat_template)";
  }
  ChatTemplate t(source, name);
  t.bos_token = token_string(cfg, "bos_token");
  t.eos_token = token_string(cfg, "eos_token");
  return t;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                 bool add_generation_prompt, const nlohmann::ordered_json& extra) const {
  jinja::Scope globals;
  jinja::install_globals(globals);
  if (bos_token) globals.set("bos_token", jinja::Value(*bos_token));
  if (eos_token) globals.set("eos_token", jinja::Value(*eos_token));
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) globals.set(it.key(), jinja::Value::from_json(it.value()));
  globals.set("messages", jinja::Value::from_json(messages));
  if (!tools.is_null()) globals.set("tools", jinja::Value::from_json(tools));
  globals.set("add_generation_prompt", jinja::Value(add_generation_prompt));
  jinja::Interp in(*tpl_, globals);
  return in.render();
}

}  // namespace trellm
