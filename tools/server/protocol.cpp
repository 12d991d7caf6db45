#include "protocol.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"

namespace trellm::server {

json error_body(int /*status: the HTTP status carries it; OpenAI's "code" is a string or null*/, const std::string& message,
                const std::string& type, const std::string& param) {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  return json{{"error", e}};
}

namespace {
const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    default: return "a number";
  }
}
[[noreturn]] void bad(const std::string& param, const std::string& msg) { bad_field(param, msg); }
}  // namespace

void bad_field(const std::string& param, const std::string& message) { throw ApiError(400, message, param); }

std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* digits = "abcdefghijklmnopqrstuvwxyz0123456789";
  std::string s = prefix;
  for (int i = 0; i < 24; i++) s += digits[rng() % 36];
  return s;
}

bool opt_bool(const json& body, const char* key, bool def) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return def;
  if (!it->is_boolean()) bad(key, std::string("'") + key + "' must be a boolean, got " + type_name(*it));
  return it->get<bool>();
}

double opt_number(const json& body, const char* key, double def, double lo, double hi) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return def;
  if (!it->is_number()) bad(key, std::string("'") + key + "' must be a number, got " + type_name(*it));
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi))
    bad(key, std::string("'") + key + "' must be between " + json(lo).dump() + " and " + json(hi).dump() + ", got " + it->dump());
  return v;
}

int64_t opt_int(const json& body, const char* key, int64_t def, int64_t lo, int64_t hi) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return def;
  // A whole float (2.0) counts as an integer. (Casting first to test that was undefined behaviour past int64's
  // range, e.g. 2e53: found by fuzz_server_request.)
  if (!it->is_number_integer() &&
      !(it->is_number_float() && std::isfinite(it->get<double>()) && std::trunc(it->get<double>()) == it->get<double>()))
    bad(key, std::string("'") + key + "' must be an integer, got " + it->dump());
  const double d = it->get<double>();
  if (!(d >= double(lo) && d <= double(hi)) || std::fabs(d) >= 9223372036854775808.0)
    bad(key, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi) + ", got " + it->dump());
  return int64_t(d);
}

std::vector<std::string> opt_stop(const json& body, const char* key) {
  auto it = body.find(key);
  std::vector<std::string> out;
  if (it == body.end() || it->is_null()) return out;
  if (it->is_string()) out.push_back(it->get<std::string>());
  else if (it->is_array()) {
    for (const auto& s : *it) {
      if (!s.is_string()) bad(key, std::string("'") + key + "' must be a string or an array of strings");
      out.push_back(s.get<std::string>());
    }
  } else {
    bad(key, std::string("'") + key + "' must be a string or an array of strings, got " + type_name(*it));
  }
  if (out.size() > 16) bad(key, std::string("'") + key + "' holds " + std::to_string(out.size()) + " strings; at most 16");
  for (const auto& s : out)
    if (s.empty()) bad(key, std::string("'") + key + "' holds an empty string");
  return out;
}

std::string opt_str(const json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return {};
  const std::string w = where.empty() ? key : where + "." + key;
  if (!it->is_string()) bad(w, "'" + w + "' must be a string, got " + type_name(*it));
  return it->get<std::string>();
}

void reject_unknown(const json& body, std::initializer_list<const char*> known, const char* what) {
  for (auto it = body.begin(); it != body.end(); ++it) {
    if (std::find_if(known.begin(), known.end(), [&](const char* k) { return it.key() == k; }) == known.end())
      bad(it.key(), "'" + it.key() + "' is not supported by trellm's " + what + " endpoint");
  }
}

namespace {

// Fields OpenAI clients may send that change nothing at their neutral value: accepted only at that value.
void neutral_only(const json& body) {
  for (const char* k : {"frequency_penalty", "presence_penalty"})
    if (body.contains(k) && !body[k].is_null() && !(body[k].is_number() && body[k].get<double>() == 0.0))
      bad(k, std::string("'") + k + "' is not supported (only 0)");
  if (body.contains("user") && !body["user"].is_string() && !body["user"].is_null()) bad("user", "'user' must be a string");
}

void check_model(const json& body, const ModelContext& m, GenRequest& r) {
  auto it = body.find("model");
  if (it == body.end() || it->is_null()) {
    r.model = m.served_name;
    return;
  }
  if (!it->is_string()) bad("model", "'model' must be a string");
  r.model = it->get<std::string>();
  if (r.model != m.served_name)
    throw ApiError(404, "The model '" + r.model + "' does not exist; this server serves '" + m.served_name + "'", "model",
                   "not_found_error");
}

void sampling(const json& body, const ModelContext& m, GenRequest& r) {
  SamplingParams& s = r.params.sampling;
  s = m.defaults.sampling;
  s.temperature = float(opt_number(body, "temperature", s.temperature, 0.0, 2.0));
  s.top_p = float(opt_number(body, "top_p", s.top_p, 0.0, 1.0));
  if (body.contains("top_p") && s.top_p <= 0.0f) bad("top_p", "'top_p' must be > 0");
  const int64_t k = opt_int(body, "top_k", s.top_k, -1, 1 << 30);
  s.top_k = k < 0 ? 0 : int(k);  // -1: off (vLLM's convention)
  s.min_p = float(opt_number(body, "min_p", s.min_p, 0.0, 1.0));
  // A client's seed, whatever its value (0 included), gives the same draws every time; none: 0, from the clock.
  s.seed = 0;
  if (body.contains("seed") && !body["seed"].is_null())
    s.seed = uint64_t(opt_int(body, "seed", 0, INT64_MIN / 2, INT64_MAX / 2)) * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  r.params.ignore_eos = opt_bool(body, "ignore_eos", false);
  // ignore_eos ignores generation_config's extra EOS ids too (as vLLM does): the output runs to max_tokens.
  if (!r.params.ignore_eos) r.params.stop_ids = m.defaults.stop_ids;
  r.stop = opt_stop(body, "stop");
  r.n = int(opt_int(body, "n", 1, 1, m.max_n));
  r.stream = opt_bool(body, "stream", false);
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) bad("stream_options", "'stream_options' must be an object");
    if (!r.stream) bad("stream_options", "'stream_options' is only allowed with stream: true");
    for (auto f = it->begin(); f != it->end(); ++f)
      if (f.key() != "include_usage") bad("stream_options." + f.key(), "'stream_options." + f.key() + "' is not supported");
    r.include_usage = opt_bool(*it, "include_usage", false);
  }
}

std::string text_of(const json& content, const std::string& where) {
  if (content.is_null()) return {};
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) bad(where, "'" + where + "' must be a string or an array of text parts");
  std::string s;
  for (size_t i = 0; i < content.size(); i++) {
    const json& p = content[i];
    const std::string w = where + "[" + std::to_string(i) + "]";
    if (!p.is_object() || !p.contains("type") || !p["type"].is_string()) bad(w, "'" + w + "' must be an object with a 'type'");
    if (p["type"] != "text") bad(w + ".type", "content part type '" + p["type"].get<std::string>() + "' is not supported (only text)");
    if (!p.contains("text") || !p["text"].is_string()) bad(w + ".text", "'" + w + ".text' must be a string");
    s += p["text"].get<std::string>();
  }
  return s;
}

}  // namespace

json template_messages(const json& messages) {
  if (!messages.is_array() || messages.empty()) bad("messages", "'messages' must be a non-empty array");
  json out = json::array();
  for (size_t i = 0; i < messages.size(); i++) {
    const json& msg = messages[i];
    const std::string w = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) bad(w, "'" + w + "' must be an object");
    if (!msg.contains("role") || !msg["role"].is_string()) bad(w + ".role", "'" + w + ".role' must be a string");
    std::string role = msg["role"].get<std::string>();
    if (role == "developer") role = "system";
    if (role != "system" && role != "user" && role != "assistant" && role != "tool")
      bad(w + ".role", "'" + w + ".role' must be system, user, assistant or tool; got '" + role + "'");
    for (auto f = msg.begin(); f != msg.end(); ++f)
      if (f.key() != "role" && f.key() != "content" && f.key() != "name" && f.key() != "tool_calls" && f.key() != "tool_call_id" &&
          f.key() != "reasoning_content")
        bad(w + "." + f.key(), "'" + w + "." + f.key() + "' is not supported");
    json m = {{"role", role}};
    if (!msg.contains("content") && !(role == "assistant" && msg.contains("tool_calls")))
      bad(w + ".content", "'" + w + ".content' is missing");
    m["content"] = text_of(msg.value("content", json()), w + ".content");
    if (msg.contains("reasoning_content") && msg["reasoning_content"].is_string()) m["reasoning_content"] = msg["reasoning_content"];
    if (msg.contains("tool_call_id")) m["tool_call_id"] = msg["tool_call_id"];
    if (msg.contains("tool_calls") && !msg["tool_calls"].is_null()) {
      if (role != "assistant" || !msg["tool_calls"].is_array()) bad(w + ".tool_calls", "'" + w + ".tool_calls' must be an array on an assistant message");
      json calls = json::array();
      for (size_t k = 0; k < msg["tool_calls"].size(); k++) {
        const json& tc = msg["tool_calls"][k];
        const std::string wk = w + ".tool_calls[" + std::to_string(k) + "]";
        if (!tc.is_object() || !tc.contains("function") || !tc["function"].is_object() || !tc["function"].contains("name"))
          bad(wk, "'" + wk + "' must be {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}");
        json f = {{"name", tc["function"]["name"]}, {"arguments", json::object()}};
        const json args = tc["function"].value("arguments", json("{}"));
        if (args.is_string()) {  // the template iterates the arguments: JSON text becomes the object it encodes
          json parsed = json::parse(args.get<std::string>(), nullptr, false);
          if (parsed.is_discarded() || !parsed.is_object())
            bad(wk + ".function.arguments", "'" + wk + ".function.arguments' must be a JSON object (as a string)");
          f["arguments"] = parsed;
        } else if (args.is_object()) {
          f["arguments"] = args;
        } else {
          bad(wk + ".function.arguments", "'" + wk + ".function.arguments' must be a JSON object");
        }
        calls.push_back({{"type", "function"}, {"id", opt_str(tc, "id", wk)}, {"function", f}});
      }
      m["tool_calls"] = calls;
    }
    out.push_back(m);
  }
  return out;
}

std::vector<int32_t> chat_prompt_tokens(const json& messages, const json& tools, const json& kwargs, const ModelContext& m,
                                        std::string* text_out) {
  if (!m.tpl) throw ApiError(400, "the served model has no chat template: use /v1/completions");
  std::string text;
  try {
    text = m.tpl->render(template_messages(messages), tools, true, kwargs);
  } catch (const ApiError&) {
    throw;
  } catch (const Error& e) {
    throw ApiError(400, std::string("the chat template could not render these messages: ") + e.what(), "messages");
  }
  if (text_out) *text_out = text;
  return m.tok->encode(text);
}

void finish_params(GenRequest& r, const ModelContext& m, const json* mt, const char* mt_name) {
  const int64_t P = int64_t(r.prompt.size());
  if (P == 0) bad("prompt", "the prompt is empty");
  if (P >= m.context)
    bad(r.kind == GenRequest::Kind::Completion ? "prompt" : "messages",
        "This model's maximum context length is " + std::to_string(m.context) + " tokens. However, your prompt has " +
            std::to_string(P) + " tokens, which leaves no room for the output.");
  if (mt && !mt->is_null()) {
    json one = {{mt_name, *mt}};
    r.params.max_tokens = opt_int(one, mt_name, 1, 1, int64_t(1) << 40);
    if (P + r.params.max_tokens > m.context)
      bad(mt_name, "This model's maximum context length is " + std::to_string(m.context) + " tokens. However, you requested " +
                       std::to_string(P + r.params.max_tokens) + " tokens (" + std::to_string(P) + " in the prompt, " +
                       std::to_string(r.params.max_tokens) + " for the completion). Please reduce the prompt or " + mt_name + ".");
  } else {
    r.params.max_tokens = m.context - P;
  }
  r.params.logprobs = r.logprobs ? r.top_logprobs : -1;
  // Tokens that end the output are not part of its text; with ignore_eos nothing ends it, and every token is text.
  if (!r.params.ignore_eos) r.hidden_ids = m.eos_ids;
  r.hidden_ids.insert(r.hidden_ids.end(), r.params.stop_ids.begin(), r.params.stop_ids.end());
}

GenRequest parse_chat(const json& body, const ModelContext& m) {
  if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object");
  reject_unknown(body,
                 {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                  "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n", "tools", "tool_choice",
                  "chat_template_kwargs", "ignore_eos", "user", "frequency_penalty", "presence_penalty", "parallel_tool_calls"},
                 "chat completions");
  neutral_only(body);
  GenRequest r;
  r.kind = GenRequest::Kind::Chat;
  check_model(body, m, r);
  if (!body.contains("messages")) bad("messages", "'messages' is required");
  sampling(body, m, r);
  r.logprobs = opt_bool(body, "logprobs", false);
  r.top_logprobs = int(opt_int(body, "top_logprobs", 0, 0, 20));
  if (body.contains("top_logprobs") && !body["top_logprobs"].is_null() && !r.logprobs)
    bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  opt_bool(body, "parallel_tool_calls", true);
  // Tools and tool_choice.
  json tools = nullptr;
  if (auto it = body.find("tools"); it != body.end() && !it->is_null()) {
    if (!it->is_array()) bad("tools", "'tools' must be an array");
    for (size_t i = 0; i < it->size(); i++) {
      const json& t = (*it)[i];
      const std::string w = "tools[" + std::to_string(i) + "]";
      if (!t.is_object() || opt_str(t, "type", w) != "function" || !t.contains("function") || !t["function"].is_object() ||
          !t["function"].contains("name") || !t["function"]["name"].is_string())
        bad(w, "'" + w + "' must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}");
    }
    if (!it->empty()) tools = *it;
  }
  std::string choice = "auto", forced_name;
  if (auto it = body.find("tool_choice"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      choice = it->get<std::string>();
      if (choice != "auto" && choice != "none" && choice != "required")
        bad("tool_choice", "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\"}}");
    } else if (it->is_object() && opt_str(*it, "type", "tool_choice") == "function" && it->contains("function") &&
               (*it)["function"].is_object() &&
               (*it)["function"].contains("name") && (*it)["function"]["name"].is_string()) {
      choice = "named";
      forced_name = (*it)["function"]["name"].get<std::string>();
    } else {
      bad("tool_choice", "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\"}}");
    }
    if (choice != "none" && choice != "auto" && tools.is_null()) bad("tool_choice", "'tool_choice' " + choice + " needs 'tools'");
    if (choice == "named" && std::none_of(tools.begin(), tools.end(), [&](const json& t) { return t["function"]["name"] == forced_name; }))
      bad("tool_choice", "'tool_choice' names '" + forced_name + "', which is not among the tools");
  }
  if (choice == "none") tools = nullptr;  // no tool is offered, none is parsed
  json kwargs = json::object();
  if (auto it = body.find("chat_template_kwargs"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) bad("chat_template_kwargs", "'chat_template_kwargs' must be an object");
    for (const char* k : {"enable_thinking", "clear_thinking"})
      if (it->contains(k) && !(*it)[k].is_boolean())
        bad(std::string("chat_template_kwargs.") + k, std::string("'chat_template_kwargs.") + k + "' must be a boolean");
    kwargs = *it;
  }
  std::string text;
  r.prompt = chat_prompt_tokens(body["messages"], tools, kwargs, m, &text);
  r.glm_parse = true;
  r.tools = !tools.is_null();
  r.thinking_open = text.size() >= 7 && text.compare(text.size() - 7, 7, "<think>") == 0;
  if (choice == "required" || choice == "named") {
    // The model must call a tool: the prompt goes on with the call's opening (after closing the reasoning),
    // and the output parser sees that opening first.
    std::string forced = (r.thinking_open ? "</think>" : "");
    r.forced_prefix = "<tool_call>" + forced_name;
    const auto extra = m.tok->encode(forced + r.forced_prefix);
    r.prompt.insert(r.prompt.end(), extra.begin(), extra.end());
    r.thinking_open = false;
  }
  // max_completion_tokens (OpenAI's current name) wins over the older max_tokens. (No body["key"] for an absent
  // key here: on a const json that is undefined behaviour, not a null.)
  const json* mt = nullptr;
  const char* mt_name = "max_completion_tokens";
  if (auto it = body.find("max_completion_tokens"); it != body.end() && !it->is_null()) {
    mt = &*it;
  } else if (auto it2 = body.find("max_tokens"); it2 != body.end()) {
    mt = &*it2;
    mt_name = "max_tokens";
  }
  finish_params(r, m, mt, mt_name);
  return r;
}

GenRequest parse_completion(const json& body, const ModelContext& m) {
  if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object");
  reject_unknown(body,
                 {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
                  "stream_options", "logprobs", "n", "ignore_eos", "user", "frequency_penalty", "presence_penalty", "echo",
                  "best_of"},
                 "completions");
  neutral_only(body);
  if (opt_bool(body, "echo", false)) bad("echo", "'echo' is not supported");
  GenRequest r;
  r.kind = GenRequest::Kind::Completion;
  check_model(body, m, r);
  sampling(body, m, r);
  if (body.contains("best_of") && opt_int(body, "best_of", r.n, 1, m.max_n) != r.n) bad("best_of", "'best_of' must equal n");
  if (body.contains("logprobs") && !body["logprobs"].is_null()) {
    r.logprobs = true;
    r.top_logprobs = int(opt_int(body, "logprobs", 0, 0, 20));
  }
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) bad("prompt", "'prompt' is required");
  const json* p = &*it;
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
  if (p->is_string()) {
    r.prompt = m.tok->encode(p->get<std::string>());
  } else if (p->is_array()) {
    for (size_t i = 0; i < p->size(); i++) {
      const json& t = (*p)[i];
      if (t.is_string()) bad("prompt", "a list of several prompts is not supported: send one request per prompt");
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= m.vocab)
        bad("prompt", "'prompt[" + std::to_string(i) + "]' must be a token id in 0.." + std::to_string(m.vocab - 1) + ", got " + t.dump());
      r.prompt.push_back(t.get<int32_t>());
    }
  } else {
    bad("prompt", "'prompt' must be a string or an array of token ids");
  }
  json dflt = 16;  // OpenAI's default for completions
  finish_params(r, m, body.contains("max_tokens") && !body["max_tokens"].is_null() ? &body["max_tokens"] : &dflt, "max_tokens");
  return r;
}

}  // namespace trellm::server
