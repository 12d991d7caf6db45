// POST /v1/messages: Anthropic's Messages API (system, text / tool_use / tool_result / thinking blocks, tools,
// tool_choice, stop_sequences, thinking), streamed as its event sequence (message_start, content_block_start /
// _delta / _stop, message_delta, message_stop) or not. The request becomes the same chat the OpenAI endpoint
// renders, so both share the template, the engine and the GLM output parser.
#include <httplib.h>

#include "server.h"
#include "sse.h"

namespace trellm::server {

namespace {

std::string blocks_text(const json& content, const std::string& where) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) bad_field(where, "'" + where + "' must be a string or an array of blocks");
  std::string s;
  for (const json& b : content) {
    if (!b.is_object() || opt_str(b, "type", where) != "text" || !b.contains("text") || !b["text"].is_string())
      bad_field(where, "'" + where + "' may only hold text blocks here");
    s += b["text"].get<std::string>();
  }
  return s;
}

// Anthropic messages -> the OpenAI-form chat that template_messages() accepts.
json to_chat(const json& body) {
  json out = json::array();
  if (auto it = body.find("system"); it != body.end() && !it->is_null()) out.push_back({{"role", "system"}, {"content", blocks_text(*it, "system")}});
  if (!body.contains("messages") || !body["messages"].is_array() || body["messages"].empty())
    bad_field("messages", "'messages' must be a non-empty array");
  const json& msgs = body["messages"];
  for (size_t i = 0; i < msgs.size(); i++) {
    const json& m = msgs[i];
    const std::string w = "messages[" + std::to_string(i) + "]";
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) bad_field(w + ".role", "'" + w + ".role' must be user or assistant");
    const std::string role = m["role"];
    if (role != "user" && role != "assistant") bad_field(w + ".role", "'" + w + ".role' must be user or assistant; got '" + role + "'");
    if (!m.contains("content")) bad_field(w + ".content", "'" + w + ".content' is missing");
    const json& c = m["content"];
    if (c.is_string()) {
      out.push_back({{"role", role}, {"content", c}});
      continue;
    }
    if (!c.is_array()) bad_field(w + ".content", "'" + w + ".content' must be a string or an array of blocks");
    std::string text, thinking;
    json calls = json::array();
    for (size_t k = 0; k < c.size(); k++) {
      const json& b = c[k];
      const std::string wb = w + ".content[" + std::to_string(k) + "]";
      const std::string type = b.is_object() ? opt_str(b, "type", wb) : "";
      if (type == "text" && b.contains("text") && b["text"].is_string()) {
        text += b["text"].get<std::string>();
      } else if (type == "thinking" && role == "assistant") {
        thinking += opt_str(b, "thinking", wb);
      } else if (type == "redacted_thinking" && role == "assistant") {
      } else if (type == "tool_use" && role == "assistant") {
        if (!b.contains("name") || !b["name"].is_string()) bad_field(wb + ".name", "'" + wb + ".name' must be a string");
        calls.push_back({{"id", opt_str(b, "id", wb)}, {"type", "function"},
                         {"function", {{"name", b["name"]}, {"arguments", b.value("input", json::object())}}}});
      } else if (type == "tool_result" && role == "user") {
        if (!text.empty()) out.push_back({{"role", "user"}, {"content", text}}), text.clear();
        const json rc = b.value("content", json(""));
        out.push_back({{"role", "tool"}, {"tool_call_id", opt_str(b, "tool_use_id", wb)}, {"content", blocks_text(rc, wb + ".content")}});
      } else {
        bad_field(wb + ".type", "block type '" + type + "' is not supported in a " + role + " message");
      }
    }
    if (role == "assistant") {
      json a = {{"role", "assistant"}, {"content", text}};
      if (!thinking.empty()) a["reasoning_content"] = thinking;
      if (!calls.empty()) a["tool_calls"] = calls;
      out.push_back(a);
    } else if (!text.empty()) {
      out.push_back({{"role", "user"}, {"content", text}});
    }
  }
  return out;
}

}  // namespace

GenRequest parse_messages(const json& body, const ModelContext& m) {
  if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object");
  reject_unknown(body,
                 {"model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream",
                  "tools", "tool_choice", "thinking", "metadata"},
                 "messages");
  if (!body.contains("max_tokens")) bad_field("max_tokens", "'max_tokens' is required");
  // The OpenAI form of this request, validated by the same code.
  json chat = {{"messages", to_chat(body)}};
  for (const char* k : {"model", "temperature", "top_p", "top_k", "stream", "max_tokens"})
    if (body.contains(k)) chat[k] = body[k];
  if (body.contains("stop_sequences")) chat["stop"] = body["stop_sequences"];
  if (auto it = body.find("tools"); it != body.end() && !it->is_null()) {
    if (!it->is_array()) bad_field("tools", "'tools' must be an array");
    json tools = json::array();
    for (size_t i = 0; i < it->size(); i++) {
      const json& t = (*it)[i];
      if (!t.is_object() || !t.contains("name") || !t["name"].is_string()) bad_field("tools[" + std::to_string(i) + "]", "a tool needs a 'name'");
      tools.push_back({{"type", "function"},
                       {"function", {{"name", t["name"]}, {"description", opt_str(t, "description", "tools[" + std::to_string(i) + "]")},
                                     {"parameters", t.value("input_schema", json::object())}}}});
    }
    chat["tools"] = tools;
  }
  if (auto it = body.find("tool_choice"); it != body.end() && !it->is_null()) {
    const std::string type = it->is_object() ? opt_str(*it, "type", "tool_choice") : "";
    if (type == "auto") chat["tool_choice"] = "auto";
    else if (type == "any") chat["tool_choice"] = "required";
    else if (type == "none") chat["tool_choice"] = "none";
    else if (type == "tool" && it->contains("name")) chat["tool_choice"] = {{"type", "function"}, {"function", {{"name", (*it)["name"]}}}};
    else bad_field("tool_choice", "'tool_choice' must be {\"type\": auto | any | none | tool (with name)}");
  }
  // Anthropic's default is no extended thinking; {"type": "enabled"} turns GLM's reasoning on.
  bool think = false;
  if (auto it = body.find("thinking"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || !it->contains("type")) bad_field("thinking", "'thinking' must be {\"type\": \"enabled\" | \"disabled\"}");
    think = (*it)["type"] == "enabled";
  }
  chat["chat_template_kwargs"] = {{"enable_thinking", think}};
  GenRequest r = parse_chat(chat, m);
  r.kind = GenRequest::Kind::Messages;
  return r;
}

namespace {

const char* stop_reason(const Choice& c) {
  const std::string f = c.finish_reason();
  if (!c.stop_string().empty()) return "stop_sequence";
  if (f == "length") return "max_tokens";
  if (f == "tool_calls") return "tool_use";
  return "end_turn";
}

json usage_of(Generation& g) {
  return json{{"input_tokens", g.prompt_tokens()}, {"output_tokens", g.completion_tokens()},
              {"cache_read_input_tokens", g.cached_tokens()}, {"cache_creation_input_tokens", 0}};
}

json tool_use(const ToolCallOut& t) {
  json input = json::parse(t.arguments, nullptr, false);
  return json{{"type", "tool_use"}, {"id", "toolu_" + t.id.substr(5)}, {"name", t.name}, {"input", input.is_object() ? input : json::object()}};
}

struct MessageStream {
  Server& s;
  std::unique_ptr<Generation> g;
  std::string id, model;
  InFlight guard;
  bool began = false, logged = false;
  int index = -1;            // the open content block
  std::string open_type;     // "thinking" / "text"
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();

  MessageStream(Server& srv, std::unique_ptr<Generation> gen, std::string i, std::string m)
      : s(srv), g(std::move(gen)), id(std::move(i)), model(std::move(m)), guard(srv) {}

  static bool event(httplib::DataSink& sink, const char* name, const json& data) {
    const std::string e = std::string("event: ") + name + "\ndata: " + data.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
    return sink.write(e.data(), e.size());
  }
  bool close(httplib::DataSink& sink) {
    if (index < 0 || open_type.empty()) return true;
    open_type.clear();
    return event(sink, "content_block_stop", {{"type", "content_block_stop"}, {"index", index}});
  }
  bool text(httplib::DataSink& sink, const std::string& type, const std::string& t) {
    if (t.empty()) return true;
    bool ok = true;
    if (open_type != type) {
      ok = close(sink);
      index++;
      open_type = type;
      json block = type == "thinking" ? json{{"type", "thinking"}, {"thinking", ""}, {"signature", ""}} : json{{"type", "text"}, {"text", ""}};
      ok = ok && event(sink, "content_block_start", {{"type", "content_block_start"}, {"index", index}, {"content_block", block}});
    }
    json delta = type == "thinking" ? json{{"type", "thinking_delta"}, {"thinking", t}} : json{{"type", "text_delta"}, {"text", t}};
    return ok && event(sink, "content_block_delta", {{"type", "content_block_delta"}, {"index", index}, {"delta", delta}});
  }

  bool next(httplib::DataSink& sink) {
    bool ok = true;
    if (!began) {
      json msg = {{"id", id}, {"type", "message"}, {"role", "assistant"}, {"model", model}, {"content", json::array()},
                  {"stop_reason", nullptr}, {"stop_sequence", nullptr}, {"usage", usage_of(*g)}};
      ok = event(sink, "message_start", {{"type", "message_start"}, {"message", msg}});
      began = true;
    }
    std::vector<ChoiceDelta> d = g->poll(std::chrono::milliseconds(50));
    s.observe(*g);
    bool wrote = false;
    if (!d.empty() && ok) {
      wrote = !d[0].empty();
      ok = text(sink, "thinking", d[0].reasoning) && text(sink, "text", d[0].content);
      for (const ToolCallOut& t : d[0].tool_calls) {
        ok = ok && close(sink);
        index++;
        json block = tool_use(t);
        const json input = block["input"];
        block["input"] = json::object();
        ok = ok && event(sink, "content_block_start", {{"type", "content_block_start"}, {"index", index}, {"content_block", block}}) &&
             event(sink, "content_block_delta",
                   {{"type", "content_block_delta"}, {"index", index}, {"delta", {{"type", "input_json_delta"}, {"partial_json", input.dump()}}}}) &&
             event(sink, "content_block_stop", {{"type", "content_block_stop"}, {"index", index}});
      }
    }
    if (ok && !wrote && std::chrono::steady_clock::now() - last > std::chrono::milliseconds(500)) {
      ok = event(sink, "ping", {{"type", "ping"}});
      wrote = true;
    }
    if (wrote) last = std::chrono::steady_clock::now();
    if (!ok) {
      g->cancel();
      return false;
    }
    if (g->done()) {
      Choice& c = *g->choices()[0];
      close(sink);
      const std::string stop = c.stop_string();
      event(sink, "message_delta",
            {{"type", "message_delta"}, {"delta", {{"stop_reason", stop_reason(c)}, {"stop_sequence", stop.empty() ? json(nullptr) : json(stop)}}},
             {"usage", {{"output_tokens", g->completion_tokens()}}}});
      event(sink, "message_stop", {{"type", "message_stop"}});
      log();
      sink.done();
    }
    return true;
  }
  void log() {
    if (logged) return;
    logged = true;
    s.finished(*g, id, "messages");
  }
};

}  // namespace

void add_anthropic_routes(Server& s, httplib::Server& http) {
  http.Post("/v1/messages", [&s](const httplib::Request& req, httplib::Response& res) {
    guarded(s, req, res, true, [&] {
      GenRequest gr = parse_messages(parse_body(req), s.model());
      const std::string id = random_id("msg_"), model = gr.model;
      const bool stream = gr.stream;
      auto g = std::make_unique<Generation>(s.engine(), *s.model().tok, std::move(gr));
      if (!stream) {
        InFlight guard(s);
        const auto out = run_to_end(&s, *g);
        s.finished(*g, id, "messages");
        Choice& c = *g->choices()[0];
        if (c.finish_reason() == "error") throw ApiError(500, c.error(), "", "api_error");
        json content = json::array();
        if (!out[0].reasoning.empty()) content.push_back({{"type", "thinking"}, {"thinking", out[0].reasoning}, {"signature", ""}});
        if (!out[0].content.empty()) content.push_back({{"type", "text"}, {"text", out[0].content}});
        for (const auto& t : out[0].tool_calls) content.push_back(tool_use(t));
        const std::string stop = c.stop_string();
        send_json(res, 200,
                  json{{"id", id}, {"type", "message"}, {"role", "assistant"}, {"model", model}, {"content", content},
                       {"stop_reason", stop_reason(c)}, {"stop_sequence", stop.empty() ? json(nullptr) : json(stop)},
                       {"usage", usage_of(*g)}});
        return;
      }
      send_stream(res, std::make_shared<MessageStream>(s, std::move(g), id, model));
    });
  });
}

}  // namespace trellm::server
