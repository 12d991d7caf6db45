// Chat templates: renders a model's Jinja chat template (chat_template.jinja, or tokenizer_config.json's
// "chat_template") the way transformers' apply_chat_template does (trim_blocks, lstrip_blocks, its tojson,
// raise_exception and strftime_now), so prompts are byte-identical to the reference.
#pragma once
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>

namespace trellm {

namespace jinja { struct Template; }

class ChatTemplate {
 public:
  // Parses `source`; `name` (e.g. the file) prefixes error messages as "name:line:col: ...".
  explicit ChatTemplate(const std::string& source, const std::string& name = "chat_template");
  // Reads DIR/chat_template.jinja if present, else "chat_template" of DIR/tokenizer_config.json (a string, or
  // the entry named "default" of a list of {name, template}); bos_token/eos_token from tokenizer_config.json.
  static ChatTemplate from_model_dir(const std::string& dir);

  // messages: array of {role, content, ...}; tools: array (or null: then `tools` is undefined, as in
  // transformers); extra: more variables such as {"enable_thinking": false}. Throws trellm::Error on template
  // errors (raise_exception included) with line:column.
  std::string render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                     bool add_generation_prompt,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  // Special tokens passed to the template like transformers' special_tokens_map (absent: undefined).
  std::optional<std::string> bos_token, eos_token;

 private:
  std::shared_ptr<jinja::Template> tpl_;
};

}  // namespace trellm
