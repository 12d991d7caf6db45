// POST /v1/chat/completions and /v1/completions: non-streaming bodies and SSE streams ("data: {...}" chunks, then
// "data: [DONE]"), as OpenAI's API and vLLM's server send them.
#include <httplib.h>

#include <ctime>

#include "server.h"
#include "sse.h"

namespace trellm::server {

namespace {

using Kind = GenRequest::Kind;

void merge(ChoiceDelta& into, ChoiceDelta&& d) {
  into.content += d.content;
  into.reasoning += d.reasoning;
  into.new_tokens += d.new_tokens;
  for (auto& t : d.tool_calls) into.tool_calls.push_back(std::move(t));
  for (auto& l : d.logprobs) into.logprobs.push_back(std::move(l));
}

json chat_logprobs(const std::vector<TokenLogprobOut>& lps) {
  json content = json::array();
  for (const auto& l : lps) {
    json top = json::array();
    for (size_t i = 0; i < l.top.size(); i++)
      top.push_back({{"token", l.top[i].first}, {"logprob", l.top[i].second}, {"bytes", l.top_bytes[i]}});
    content.push_back({{"token", l.token}, {"logprob", l.logprob}, {"bytes", l.bytes}, {"top_logprobs", top}});
  }
  return json{{"content", content}};
}

json completion_logprobs(const std::vector<TokenLogprobOut>& lps, size_t offset0) {
  json tokens = json::array(), lp = json::array(), top = json::array(), off = json::array();
  size_t at = offset0;
  for (const auto& l : lps) {
    tokens.push_back(l.token);
    lp.push_back(l.logprob);
    json t = json::object();
    for (const auto& [tok, v] : l.top) t[tok] = v;
    top.push_back(t);
    off.push_back(at);
    at += l.token.size();
  }
  return json{{"tokens", tokens}, {"token_logprobs", lp}, {"top_logprobs", top}, {"text_offset", off}};
}

json tool_calls_json(const std::vector<ToolCallOut>& calls, int first_index, bool with_index) {
  json a = json::array();
  for (size_t k = 0; k < calls.size(); k++) {
    json c = {{"id", calls[k].id}, {"type", "function"}, {"function", {{"name", calls[k].name}, {"arguments", calls[k].arguments}}}};
    if (with_index) c["index"] = first_index + int(k);
    a.push_back(c);
  }
  return a;
}

json usage(Generation& g) {
  return json{{"prompt_tokens", g.prompt_tokens()},
              {"completion_tokens", g.completion_tokens()},
              {"total_tokens", g.prompt_tokens() + g.completion_tokens()},
              {"prompt_tokens_details", {{"cached_tokens", g.cached_tokens()}}}};
}

// A choice that the engine failed: the request fails as a whole (500), unless the client already has a stream.
void throw_if_failed(Generation& g) {
  for (auto& c : g.choices())
    if (c->finish_reason() == "error") throw ApiError(500, c->error(), "", "server_error");
}

// One request's SSE stream. httplib calls next() on a worker thread until it returns false or calls done().
struct Stream {
  Server& s;
  std::unique_ptr<Generation> g;
  std::string id, model;
  int64_t created;
  InFlight guard;
  std::vector<bool> started, finished;
  std::vector<int> tool_index;
  std::vector<size_t> text_offset;
  bool logged = false;
  std::chrono::steady_clock::time_point last_write = std::chrono::steady_clock::now();

  Stream(Server& srv, std::unique_ptr<Generation> gen, std::string id_, std::string model_)
      : s(srv), g(std::move(gen)), id(std::move(id_)), model(std::move(model_)), created(std::time(nullptr)), guard(srv),
        started(size_t(g->request().n), false), finished(size_t(g->request().n), false), tool_index(size_t(g->request().n), 0),
        text_offset(size_t(g->request().n), 0) {}

  bool chat() const { return g->request().kind == Kind::Chat; }

  json chunk(json choice) const {
    json c = {{"id", id}, {"object", chat() ? "chat.completion.chunk" : "text_completion"}, {"created", created}, {"model", model},
              {"choices", json::array({choice})}};
    if (g->request().include_usage) c["usage"] = nullptr;
    return c;
  }
  static bool write(httplib::DataSink& sink, const json& j) {
    const std::string line = "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
    return sink.write(line.data(), line.size());
  }

  bool next(httplib::DataSink& sink) {
    std::vector<ChoiceDelta> deltas = g->poll(std::chrono::milliseconds(50));
    s.observe(*g);
    bool ok = true, wrote = false;
    for (size_t i = 0; i < deltas.size() && ok; i++) {
      ChoiceDelta& d = deltas[i];
      Choice& c = *g->choices()[i];
      if (chat() && !started[i]) {
        ok = write(sink, chunk({{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}}));
        started[i] = wrote = true;
      }
      if (ok && (!d.empty() || (!chat() && d.new_tokens > 0))) {  // completions: a chunk per token batch, even if it
        // holds no text yet (half a character, unknown ids of a synthetic model): clients count and time tokens by them
        json choice = {{"index", i}};
        if (chat()) {
          json delta = json::object();
          if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
          if (!d.content.empty()) delta["content"] = d.content;
          if (!d.tool_calls.empty()) delta["tool_calls"] = tool_calls_json(d.tool_calls, tool_index[i], true);
          tool_index[i] += int(d.tool_calls.size());
          choice["delta"] = delta;
          choice["logprobs"] = g->request().logprobs ? chat_logprobs(d.logprobs) : json(nullptr);
        } else {
          choice["text"] = d.content;
          choice["logprobs"] = g->request().logprobs ? completion_logprobs(d.logprobs, text_offset[i]) : json(nullptr);
          text_offset[i] += d.content.size();
        }
        choice["finish_reason"] = nullptr;
        ok = write(sink, chunk(choice));
        wrote = true;
      }
      if (ok && c.done() && !finished[i]) {
        json choice = {{"index", i}, {"finish_reason", c.finish_reason()}, {"logprobs", nullptr}};
        if (chat()) choice["delta"] = json::object();
        else choice["text"] = "";
        ok = write(sink, chunk(choice));
        finished[i] = wrote = true;
      }
    }
    if (ok && !wrote && std::chrono::steady_clock::now() - last_write > std::chrono::milliseconds(500)) {
      ok = sink.write(": keep-alive\n\n", 14);  // notices a client that went away while nothing was sent
      wrote = true;
    }
    if (wrote) last_write = std::chrono::steady_clock::now();
    if (!ok) {  // the client disconnected: its sequences are cancelled and their blocks freed at the next step
      g->cancel();
      return false;
    }
    if (g->done()) {
      if (g->request().include_usage) {
        json u = {{"id", id}, {"object", chat() ? "chat.completion.chunk" : "text_completion"}, {"created", created}, {"model", model},
                  {"choices", json::array()}, {"usage", usage(*g)}};
        write(sink, u);
      }
      const char* done = "data: [DONE]\n\n";
      sink.write(done, std::strlen(done));
      log();
      sink.done();
    }
    return true;
  }
  void log() {
    if (logged) return;
    logged = true;
    s.finished(*g, id, chat() ? "chat" : "completion");
  }
};

void handle(Server& s, const httplib::Request& req, httplib::Response& res, Kind kind) {
  guarded(s, req, res, false, [&] {
    const json body = parse_body(req);
    GenRequest gr = kind == Kind::Chat ? parse_chat(body, s.model()) : parse_completion(body, s.model());
    const std::string id = random_id(kind == Kind::Chat ? "chatcmpl-" : "cmpl-");
    const std::string model = gr.model;
    const bool stream = gr.stream;
    auto g = std::make_unique<Generation>(s.engine(), *s.model().tok, std::move(gr));
    if (!stream) {
      InFlight guard(s);
      const auto out = run_to_end(&s, *g);
      s.finished(*g, id, kind == Kind::Chat ? "chat" : "completion");
      throw_if_failed(*g);
      send_json(res, 200, kind == Kind::Chat ? chat_response(*g, out, id, model) : completion_response(*g, out, id, model));
      return;
    }
    send_stream(res, std::make_shared<Stream>(s, std::move(g), id, model));
  });
}

}  // namespace

std::vector<ChoiceDelta> run_to_end(Server* s, Generation& g) {
  std::vector<ChoiceDelta> out;
  while (!g.done()) {
    std::vector<ChoiceDelta> d = g.poll(std::chrono::milliseconds(100));
    if (out.size() < d.size()) out.resize(d.size());
    for (size_t i = 0; i < d.size(); i++) merge(out[i], std::move(d[i]));
    if (s) s->observe(g);
  }
  return out;
}

json chat_response(Generation& g, const std::vector<ChoiceDelta>& out, const std::string& id, const std::string& model) {
  json choices = json::array();
  for (size_t i = 0; i < out.size(); i++) {
    const ChoiceDelta& d = out[i];
    json msg = {{"role", "assistant"}, {"content", d.content.empty() && !d.tool_calls.empty() ? json(nullptr) : json(d.content)}};
    if (!d.reasoning.empty()) msg["reasoning_content"] = d.reasoning;
    if (!d.tool_calls.empty()) msg["tool_calls"] = tool_calls_json(d.tool_calls, 0, false);
    choices.push_back({{"index", i},
                       {"message", msg},
                       {"logprobs", g.request().logprobs ? chat_logprobs(d.logprobs) : json(nullptr)},
                       {"finish_reason", g.choices()[i]->finish_reason()}});
  }
  return json{{"id", id}, {"object", "chat.completion"}, {"created", std::time(nullptr)}, {"model", model},
              {"choices", choices}, {"usage", usage(g)}};
}

json completion_response(Generation& g, const std::vector<ChoiceDelta>& out, const std::string& id, const std::string& model) {
  json choices = json::array();
  for (size_t i = 0; i < out.size(); i++)
    choices.push_back({{"index", i},
                       {"text", out[i].content},
                       {"logprobs", g.request().logprobs ? completion_logprobs(out[i].logprobs, 0) : json(nullptr)},
                       {"finish_reason", g.choices()[i]->finish_reason()}});
  return json{{"id", id}, {"object", "text_completion"}, {"created", std::time(nullptr)}, {"model", model},
              {"choices", choices}, {"usage", usage(g)}};
}

void add_openai_routes(Server& s, httplib::Server& http) {
  http.Post("/v1/chat/completions", [&s](const httplib::Request& req, httplib::Response& res) { handle(s, req, res, Kind::Chat); });
  http.Post("/v1/completions", [&s](const httplib::Request& req, httplib::Response& res) { handle(s, req, res, Kind::Completion); });
}

}  // namespace trellm::server
