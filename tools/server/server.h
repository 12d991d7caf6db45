// `trellm serve`: the OpenAI-compatible (and Anthropic Messages) HTTP server on the batched engine.
// HTTP handler threads (cpp-httplib's pool) parse and validate a request, render and tokenize it, submit it to
// the engine and stream its tokens back; they never touch the model. The engine runs on its own thread.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "choice.h"
#include "metrics.h"
#include "protocol.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace trellm::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string api_key;                    // empty: no authentication
  size_t max_body_bytes = size_t(32) << 20;  // larger bodies: 413
  int threads = 0;                        // HTTP worker threads (0: 2 x max_seqs + 16; a stream holds one)
  double shutdown_grace_s = 30;           // SIGINT/SIGTERM: in-flight requests get this long to finish
};

class Server {
 public:
  Server(Engine& engine, const ModelContext& model, const ServerOptions& options);
  ~Server();
  // Binds (port 0: any free port) and serves until shutdown(); returns the process exit code.
  int run();
  int port() const { return bound_port_.load(); }
  // Stops admitting (503), lets in-flight requests finish for the grace period, cancels the rest, stops.
  void shutdown();

  // ---- for the route files (openai.cpp, anthropic.cpp) and `trellm batch` ----
  Engine& engine() { return engine_; }
  const ModelContext& model() const { return mc_; }
  Metrics& metrics() { return metrics_; }
  bool admitting() const { return !stopping_.load(); }
  // Records a finished generation: metrics and the one log line per request.
  void finished(Generation& g, const std::string& id, const char* endpoint);
  void observe(Generation& g);  // latencies of the tokens seen since the last call
  void check_auth(const httplib::Request& req) const;  // ApiError 401 unless the key matches (when one is set)

 private:
  void routes();
  Engine& engine_;
  ModelContext mc_;
  ServerOptions opt_;
  Metrics metrics_;
  std::unique_ptr<httplib::Server> http_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> bound_port_{0};
  std::atomic<int> in_flight_{0};
  std::atomic<bool> listen_done_{false};
  friend struct InFlight;
};

// RAII count of requests being answered (shutdown waits for them).
struct InFlight {
  explicit InFlight(Server& s);
  ~InFlight();
  Server& s;
};

// Route registration (each file registers its endpoints).
void add_openai_routes(Server& s, httplib::Server& http);
void add_anthropic_routes(Server& s, httplib::Server& http);

// Shared by the route files: a JSON body (400 for malformed JSON), errors as OpenAI bodies.
json parse_body(const httplib::Request& req);
void send_json(httplib::Response& res, int status, const json& body);
void send_error(httplib::Response& res, const ApiError& e);
// Runs `fn`, turning ApiError / trellm::Error / other exceptions into error responses (`anthropic` style or not).
// Checks the API key first.
void guarded(Server& s, const httplib::Request& req, httplib::Response& res, bool anthropic, const std::function<void()>& fn);

// Non-streaming bodies (also `trellm batch`).
// Runs a generation to its end on the calling thread, returning each choice's deltas merged into one. With a
// server: latencies into its metrics.
std::vector<ChoiceDelta> run_to_end(Server* s, Generation& g);
json chat_response(Generation& g, const std::vector<ChoiceDelta>& out, const std::string& id, const std::string& model);
json completion_response(Generation& g, const std::vector<ChoiceDelta>& out, const std::string& id, const std::string& model);

}  // namespace trellm::server
