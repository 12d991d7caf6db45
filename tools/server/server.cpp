#include "server.h"

#include <httplib.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "core/error.h"
#include "format/json_file.h"

namespace trellm::server {

InFlight::InFlight(Server& srv) : s(srv) { s.in_flight_++; }
InFlight::~InFlight() { s.in_flight_--; }

json parse_body(const httplib::Request& req) {
  // Deep nesting first: the JSON library and the chat template recurse over values (a 200 KB "[[[[..." body
  // overflowed the stack).
  try {
    check_json_depth(req.body, "the request body");
  } catch (const Error& e) {
    throw ApiError(400, e.what());
  }
  json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) throw ApiError(400, "the request body is not valid JSON");
  return body;
}

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) { send_json(res, e.status, error_body(e.status, e.what(), e.type, e.param)); }

namespace {
json anthropic_error(const ApiError& e) {
  const char* t = e.status == 401 ? "authentication_error" : e.status == 404 ? "not_found_error" : e.status == 413 ? "request_too_large"
                  : e.status >= 500 ? "api_error" : e.status == 503 ? "overloaded_error" : "invalid_request_error";
  return json{{"type", "error"}, {"error", {{"type", t}, {"message", e.what()}}}};
}
}  // namespace

void Server::check_auth(const httplib::Request& req) const {
  if (opt_.api_key.empty()) return;
  const std::string auth = req.get_header_value("Authorization"), key = req.get_header_value("x-api-key");
  if (auth == "Bearer " + opt_.api_key || key == opt_.api_key) return;
  throw ApiError(401, auth.empty() && key.empty() ? "missing API key (Authorization: Bearer KEY, or x-api-key)" : "invalid API key", "",
                 "authentication_error");
}

// The check runs in the handler, once httplib has read the body: a refusal before it would leave the body on a
// keep-alive connection, to be read as the next request.
void guarded(Server& s, const httplib::Request& req, httplib::Response& res, bool anthropic, const std::function<void()>& fn) {
  auto fail_with = [&](const ApiError& e) {
    s.metrics().rejected();
    if (anthropic) send_json(res, e.status, anthropic_error(e));
    else send_error(res, e);
  };
  try {
    s.check_auth(req);
    if (!s.admitting()) throw ApiError(503, "the server is shutting down", "", "service_unavailable");
    fn();
  } catch (const ApiError& e) {
    fail_with(e);
  } catch (const Error& e) {  // a request the engine refuses (too long for the cache, bad token ids): the client's fault
    fail_with(ApiError(400, e.what()));
  } catch (const std::exception& e) {
    fail_with(ApiError(500, std::string("internal error: ") + e.what(), "", "server_error"));
  }
}

Server::Server(Engine& engine, const ModelContext& model, const ServerOptions& options)
    : engine_(engine), mc_(model), opt_(options), http_(std::make_unique<httplib::Server>()) {
  const int threads = opt_.threads > 0 ? opt_.threads : 2 * engine.options().max_seqs + 16;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  http_->set_payload_max_length(opt_.max_body_bytes);
  http_->set_keep_alive_max_count(1000);
  http_->set_read_timeout(300, 0);
  http_->set_write_timeout(300, 0);
  routes();
}

Server::~Server() = default;

void Server::observe(Generation& g) {
  for (auto& c : g.choices())
    for (double d : c->take_intervals()) metrics_.inter_token(d);
}

void Server::finished(Generation& g, const std::string& id, const char* endpoint) {
  observe(g);
  auto reason = [](Choice& c) { return finish_label(c.finish_reason()); };
  for (auto& c : g.choices()) {
    if (c->ttft() >= 0) metrics_.first_token(c->ttft());
    metrics_.finished(reason(*c), g.seconds());
  }
  std::string reasons;
  for (auto& c : g.choices()) {
    if (!reasons.empty()) reasons += ',';
    reasons += reason(*c);
  }
  std::fprintf(stderr, "trellm serve: %s %s prompt %lld (cached %lld) completion %lld finish %s %.3f s\n", id.c_str(), endpoint,
               (long long)g.prompt_tokens(), (long long)g.cached_tokens(), (long long)g.completion_tokens(), reasons.c_str(),
               g.seconds());
}

void Server::routes() {
  httplib::Server& h = *http_;
  // Statuses httplib produces itself (413 for an oversize body, 404 for an unknown path, 400 for a bad request
  // line) get an OpenAI-style body too.
  h.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string msg = res.status == 413 ? "the request body is larger than the server's limit"
                      : res.status == 404 ? "no route " + req.method + " " + req.path
                                          : "bad request (HTTP " + std::to_string(res.status) + ")";
    send_json(res, res.status, error_body(res.status, msg, res.status == 404 ? "not_found_error" : "invalid_request_error", ""));
  });
  h.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    send_json(res, admitting() ? 200 : 503, json{{"status", admitting() ? "ok" : "shutting down"}});
  });
  h.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.render(engine_.stats(), mc_.served_name, in_flight_.load()), "text/plain; version=0.0.4; charset=utf-8");
  });
  h.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    guarded(*this, req, res, false, [&] {
    send_json(res, 200,
              json{{"object", "list"},
                   {"data", json::array({json{{"id", mc_.served_name}, {"object", "model"}, {"created", 0}, {"owned_by", "trellm"},
                                              {"max_model_len", mc_.context}}})}});
    });
  });
  h.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) {
    guarded(*this, req, res, false, [&] {
      const json body = parse_body(req);
      if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object");
      reject_unknown(body, {"model", "prompt", "messages", "tools", "chat_template_kwargs", "add_special_tokens"}, "tokenize");
      std::vector<int32_t> ids;
      if (body.contains("messages")) {
        ids = chat_prompt_tokens(body["messages"], body.value("tools", json()), body.value("chat_template_kwargs", json::object()), mc_);
      } else if (body.contains("prompt") && body["prompt"].is_string()) {
        ids = mc_.tok->encode(body["prompt"].get<std::string>(), opt_bool(body, "add_special_tokens", false));
      } else {
        throw ApiError(400, "give 'prompt' (a string) or 'messages'", "prompt");
      }
      send_json(res, 200, json{{"tokens", ids}, {"count", ids.size()}, {"max_model_len", mc_.context}});
    });
  });
  h.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) {
    guarded(*this, req, res, false, [&] {
      const json body = parse_body(req);
      if (!body.is_object() || !body.contains("tokens") || !body["tokens"].is_array())
        throw ApiError(400, "'tokens' must be an array of token ids", "tokens");
      reject_unknown(body, {"model", "tokens"}, "detokenize");
      std::vector<int32_t> ids;
      for (const json& t : body["tokens"]) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= mc_.vocab)
          throw ApiError(400, "'tokens' holds " + t.dump() + ", not a token id in 0.." + std::to_string(mc_.vocab - 1), "tokens");
        ids.push_back(t.get<int32_t>());
      }
      send_json(res, 200, json{{"prompt", mc_.tok->decode(ids)}});
    });
  });
  add_openai_routes(*this, h);
  add_anthropic_routes(*this, h);
}

namespace {
// cpp-httplib 0.11 listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, fixed in Debian's compiled library):
// 64 clients connecting at once overflow it and some see their connection reset. listen() again on the bound
// socket raises the backlog (Linux allows it); the socket is found by its port.
void raise_listen_backlog(int port) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return;
  while (dirent* e = readdir(d)) {
    const int fd = std::atoi(e->d_name);
    int listening = 0;
    socklen_t len = sizeof listening;
    sockaddr_storage a{};
    socklen_t alen = sizeof a;
    if (fd <= 2 || getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&a), &alen) != 0) continue;
    const int p = a.ss_family == AF_INET ? ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port)
                  : a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port) : -1;
    if (p == port) ::listen(fd, 1024);
  }
  closedir(d);
}
}  // namespace

int Server::run() {
  int port = opt_.port;
  if (port == 0) {
    port = http_->bind_to_any_port(opt_.host);
    if (port < 0) fail("cannot bind ", opt_.host, " on any port");
  } else if (!http_->bind_to_port(opt_.host, port)) {
    fail("cannot listen on ", opt_.host, ":", port, " (in use, or not an address of this machine)");
  }
  bound_port_ = port;
  raise_listen_backlog(port);
  std::fprintf(stderr, "trellm serve: listening on http://%s:%d\n", opt_.host.c_str(), port);
  std::fflush(stderr);
  http_->listen_after_bind();
  listen_done_ = true;
  return 0;
}

void Server::shutdown() {
  stopping_ = true;
  std::fprintf(stderr, "trellm serve: shutting down: no new requests; %d in flight get up to %.0f s\n", in_flight_.load(),
               opt_.shutdown_grace_s);
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(opt_.shutdown_grace_s);
  while (in_flight_.load() > 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  engine_.stop();  // cancels what is left: their streams end with finish_reason "abort"
  for (int i = 0; i < 250 && in_flight_.load() > 0; i++) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  // stop() before httplib's listen loop has started is lost: repeat it until listening has returned.
  while (bound_port_.load() != 0 && !listen_done_.load()) {
    http_->stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace trellm::server
