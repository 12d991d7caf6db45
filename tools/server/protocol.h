// Requests of the OpenAI-compatible API (chat completions, completions) checked and turned into what the engine
// runs: prompt tokens, per-request generation settings and how to read the output. Every field is validated and
// a bad one is an ApiError naming it; a field trellm does not support is a 400 naming it, never ignored.
#pragma once
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/chat_template.h"
#include "runtime/engine.h"
#include "runtime/tokenizer.h"

namespace trellm::server {

using json = nlohmann::ordered_json;

// An error answered with an OpenAI-style body {"error": {"message", "type", "param", "code"}}.
struct ApiError : std::runtime_error {
  int status;
  std::string type, param;
  ApiError(int status, const std::string& message, std::string param = {}, std::string type = "invalid_request_error")
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)) {}
};
json error_body(int status, const std::string& message, const std::string& type, const std::string& param);

// What the server knows of the model it serves.
struct ModelContext {
  const Tokenizer* tok = nullptr;
  const ChatTemplate* tpl = nullptr;  // null: no chat template (chat endpoints answer 400)
  std::string served_name;
  int64_t context = 0;      // positions per request (prompt + output)
  int64_t vocab = 0;
  GenParams defaults;       // sampling defaults (generation_config.json) and its extra stop ids
  std::vector<int32_t> eos_ids;  // config.json's eos_token_id
  int max_n = 16;
};

struct GenRequest {
  enum class Kind { Chat, Completion, Messages } kind = Kind::Completion;
  std::string model;
  std::vector<int32_t> prompt;
  GenParams params;                 // sampling, max_tokens, ignore_eos, stop ids, logprobs
  int n = 1;
  std::vector<std::string> stop;    // stop strings
  bool stream = false, include_usage = false;
  bool logprobs = false;            // chat: logprobs; completions: logprobs given
  int top_logprobs = 0;
  // Chat: the output goes through the GLM output parser (reasoning, tool calls).
  bool glm_parse = false;
  bool thinking_open = false;       // the prompt ends inside <think>: the output starts as reasoning
  std::string forced_prefix;        // generated-text prefix the prompt already holds (tool_choice required / named)
  bool tools = false;               // tool calls are parsed (tools given, tool_choice not "none")
  std::vector<int32_t> hidden_ids;  // stop tokens: they end the output but are not part of its text
};

// Body of POST /v1/chat/completions and /v1/completions.
GenRequest parse_chat(const json& body, const ModelContext& m);
GenRequest parse_completion(const json& body, const ModelContext& m);
// Body of POST /v1/messages (Anthropic's Messages API, anthropic.cpp): turned into the chat above, validated by it.
GenRequest parse_messages(const json& body, const ModelContext& m);
// Chat messages (OpenAI form) as the chat template wants them: text parts joined, tool-call arguments as objects.
json template_messages(const json& messages);
// Renders and tokenizes a chat for /tokenize; *thinking_open: whether the prompt ends inside <think>.
std::vector<int32_t> chat_prompt_tokens(const json& messages, const json& tools, const json& template_kwargs,
                                        const ModelContext& m, std::string* text = nullptr);
// Fills the generation settings shared by every endpoint (max_tokens given or the room left in the context).
void finish_params(GenRequest& r, const ModelContext& m, const json* max_tokens_field, const char* max_tokens_name);

// A 400 naming the request field `param`.
[[noreturn]] void bad_field(const std::string& param, const std::string& message);
// A random id for responses and tool calls: prefix + 24 base-36 characters.
std::string random_id(const char* prefix);

// Typed field access with errors naming the field.
bool opt_bool(const json& body, const char* key, bool def);
double opt_number(const json& body, const char* key, double def, double lo, double hi);
int64_t opt_int(const json& body, const char* key, int64_t def, int64_t lo, int64_t hi);
std::vector<std::string> opt_stop(const json& body, const char* key);
// obj[key] as a string, "" when absent or null; any other type is a 400 naming `where`.key (json::value(key, "")
// threw type_error there, answered as a 500: found by fuzz_server_request).
std::string opt_str(const json& obj, const char* key, const std::string& where);
// Rejects every key of `body` not in `known` (400 naming it).
void reject_unknown(const json& body, std::initializer_list<const char*> known, const char* what);

}  // namespace trellm::server
