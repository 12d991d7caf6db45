// trellm serve: the OpenAI-compatible (and Anthropic Messages) server on the batched engine (tools/server/).
// trellm batch:  the OpenAI Batch file format through the same engine, without HTTP.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <thread>

#include "common.h"
#include "generation_args.h"
#include "core/error.h"
#include "format/generation_config.h"
#include "model/glm4_moe_lite.h"
#include "runtime/chat_template.h"
#include "runtime/engine.h"
#include "server/server.h"

namespace trellm::cli {

namespace {

struct ServeArgs {
  std::string model, synthetic, device = "auto", served_name, host = "127.0.0.1", api_key;
  int port = 8080, max_seqs = 64, ctx = 0, max_step_tokens = 2048, bits = 3, head_bits = 6;
  std::string speculative;
  int draft_tokens = 2, spec_max_seqs = EngineOptions{}.spec_max_seqs;
  double kv_memory = 0, shutdown_grace = 30;
  bool no_prefix_caching = false;
  // batch
  std::string input, output;
};

// The model, its tokenizer and template, and the engine: what serve and batch share.
struct Loaded {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::optional<Tokenizer> tok;
  std::optional<ChatTemplate> tpl;
  std::unique_ptr<Engine> engine;
  server::ModelContext mc;
};

Loaded load(const ServeArgs& a) {
  Loaded L;
  L.backend = make_backend(a.device);
  std::string dir;
  if (!a.synthetic.empty()) {
    if (!a.model.empty()) fail("give --model or --synthetic, not both");
    if (a.synthetic != "glm-4.7-flash" && a.synthetic != "tiny") fail("--synthetic ", a.synthetic, ": glm-4.7-flash or tiny");
    SyntheticSpec spec;
    spec.bits = a.bits;
    spec.head_bits = a.head_bits;
    L.model = Model::synthetic(a.synthetic == "tiny" ? Config::glm47_flash_tiny() : Config::glm47_flash(), *L.backend, spec);
    // Random weights speak no language: a GLM-4.7-shaped tokenizer (its special ids) so prompts can be text; most
    // generated ids have no text, so clients count tokens by the stream's chunks and usage.
    L.tok.emplace(Tokenizer::from_file(std::string(TRELLM_SOURCE_DIR) + "/tests/data/tokenizers/glm4-synthetic/tokenizer.json"));
    L.tpl.emplace(ChatTemplate::from_model_dir(default_model_dir()));
  } else {
    dir = resolve_model(a.model);
    L.model = Model::load(dir, *L.backend);
    L.tok.emplace(load_tokenizer(dir));
    try {
      L.tpl.emplace(ChatTemplate::from_model_dir(dir));
    } catch (const Error& e) {
      std::fprintf(stderr, "trellm serve: no chat template (%s): chat endpoints answer 400\n", e.what());
    }
  }
  const Config& c = L.model->config();
  EngineOptions o;
  o.max_seqs = a.max_seqs;
  o.max_step_tokens = a.max_step_tokens;
  if (a.ctx < 0 || a.ctx > c.max_position_embeddings) fail("--ctx ", a.ctx, " must be within 1..max_position_embeddings = ", c.max_position_embeddings);
  o.context = a.ctx > 0 ? a.ctx : std::min<int64_t>(c.max_position_embeddings, 32768);
  o.kv_memory_gb = a.kv_memory;
  o.prefix_caching = !a.no_prefix_caching;
  if (!a.speculative.empty()) o.draft_tokens = a.draft_tokens, o.spec_max_seqs = a.spec_max_seqs;
  L.engine = std::make_unique<Engine>(*L.model, o);
  L.mc.tok = &*L.tok;
  L.mc.tpl = L.tpl ? &*L.tpl : nullptr;
  L.mc.served_name = !a.served_name.empty() ? a.served_name
                     : !a.synthetic.empty() ? a.synthetic + "-synthetic"
                                            : std::filesystem::path(dir).filename().string();
  L.mc.context = L.engine->context();
  L.mc.vocab = c.vocab_size;
  L.mc.max_n = std::max(1, std::min(16, a.max_seqs));
  // Sampling defaults and extra stop ids from generation_config.json, as `run` and `chat` use them.
  GenerationConfig gc = dir.empty() ? GenerationConfig{} : GenerationConfig::from_dir(dir);
  L.mc.defaults.sampling = sampling_defaults(gc);
  for (int64_t id : gc.eos_token_id) L.mc.defaults.stop_ids.push_back(int32_t(id));
  for (int64_t id : c.eos_token_id) L.mc.eos_ids.push_back(int32_t(id));
  std::fprintf(stderr, "trellm serve: model %s (%s) on %s; %s\n", L.mc.served_name.c_str(), dir.empty() ? "synthetic" : dir.c_str(),
               L.backend->name().c_str(), L.engine->describe().c_str());
  return L;
}

int run_serve(const ServeArgs& a) {
  // SIGINT/SIGTERM go to one thread that shuts the server down; every other thread (created below) has them blocked.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client gone mid-write is an error return, not a signal
  Loaded L = load(a);
  server::ServerOptions so;
  so.host = a.host;
  so.port = a.port;
  so.api_key = a.api_key;
  so.shutdown_grace_s = a.shutdown_grace;
  server::Server srv(*L.engine, L.mc, so);
  L.engine->start();
  std::thread watcher([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    std::fprintf(stderr, "trellm serve: %s received\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    srv.shutdown();
  });
  int rc = 0;
  try {
    rc = srv.run();
  } catch (...) {
    pthread_kill(watcher.native_handle(), SIGTERM);
    watcher.join();
    throw;
  }
  watcher.join();
  L.engine->stop();
  std::fprintf(stderr, "trellm serve: stopped\n");
  return rc;
}

// One line of an OpenAI Batch input: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
// "body": {...}} -> {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
int run_batch(const ServeArgs& a) {
  if (a.input.empty() || a.output.empty()) fail("trellm batch needs --input FILE and --output FILE");
  std::ifstream in(a.input);
  if (!in) fail(a.input, ": cannot open");
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) lines.push_back(l);
  std::ofstream out(a.output, std::ios::trunc);
  if (!out) fail(a.output, ": cannot open for writing");
  Loaded L = load(a);
  L.engine->start();
  struct Job {
    std::string custom_id, url;
    std::unique_ptr<server::Generation> g;
    server::json error;
    int status = 200;
  };
  std::vector<Job> jobs(lines.size());
  for (size_t i = 0; i < lines.size(); i++) {  // everything submitted first: the engine batches them
    Job& j = jobs[i];
    try {
      const server::json line = server::json::parse(lines[i], nullptr, false);
      if (line.is_discarded() || !line.is_object()) throw server::ApiError(400, "line " + std::to_string(i + 1) + " is not a JSON object");
      j.custom_id = line.value("custom_id", "");
      if (j.custom_id.empty()) throw server::ApiError(400, "line " + std::to_string(i + 1) + ": 'custom_id' is missing");
      if (line.value("method", "POST") != "POST") throw server::ApiError(400, "'method' must be POST");
      j.url = line.value("url", "");
      if (!line.contains("body")) throw server::ApiError(400, "'body' is missing");
      server::GenRequest gr;
      if (j.url == "/v1/chat/completions") gr = server::parse_chat(line["body"], L.mc);
      else if (j.url == "/v1/completions") gr = server::parse_completion(line["body"], L.mc);
      else throw server::ApiError(400, "'url' must be /v1/chat/completions or /v1/completions, got '" + j.url + "'");
      if (gr.stream) throw server::ApiError(400, "'stream' is not allowed in a batch", "stream");
      j.g = std::make_unique<server::Generation>(*L.engine, *L.tok, std::move(gr));
    } catch (const server::ApiError& e) {
      j.status = e.status;
      j.error = server::error_body(e.status, e.what(), e.type, e.param)["error"];
    } catch (const Error& e) {
      j.status = 400;
      j.error = server::error_body(400, e.what(), "invalid_request_error", "")["error"];
    }
  }
  size_t done = 0, failed = 0;
  for (size_t i = 0; i < jobs.size(); i++) {
    Job& j = jobs[i];
    server::json result = {{"id", server::random_id("batch_req_")}, {"custom_id", j.custom_id}, {"response", nullptr}, {"error", nullptr}};
    if (j.g) {
      const auto outs = server::run_to_end(nullptr, *j.g);
      const std::string id = server::random_id(j.url == "/v1/completions" ? "cmpl-" : "chatcmpl-");
      server::json body = j.url == "/v1/completions" ? server::completion_response(*j.g, outs, id, j.g->request().model)
                                                     : server::chat_response(*j.g, outs, id, j.g->request().model);
      result["response"] = {{"status_code", 200}, {"request_id", id}, {"body", body}};
    } else {
      failed++;
      result["response"] = {{"status_code", j.status}, {"request_id", ""}, {"body", {{"error", j.error}}}};
      result["error"] = {{"code", std::to_string(j.status)}, {"message", j.error.value("message", "")}};
    }
    out << result.dump(-1, ' ', false, server::json::error_handler_t::replace) << "\n";
    done++;
    const int width = 40, filled = int(width * done / std::max<size_t>(1, jobs.size()));
    std::fprintf(stderr, "\rtrellm batch: [%s%s] %zu/%zu", std::string(size_t(filled), '#').c_str(),
                 std::string(size_t(width - filled), '.').c_str(), done, jobs.size());
  }
  L.engine->stop();
  std::fprintf(stderr, "\ntrellm batch: %zu requests, %zu failed; results in %s\n", jobs.size(), failed, a.output.c_str());
  return 0;
}

void add_common(CLI::App* cmd, ServeArgs& a) {
  cmd->add_option("-m,--model", a.model, "Model directory (default: the built-in model)");
  cmd->add_option("--synthetic", a.synthetic, "Random weights in a model's shapes instead: glm-4.7-flash or tiny (benchmarks)");
  cmd->add_option("--bits", a.bits, "Synthetic: trellis bits of the linear layers (0 = dense bf16)")->capture_default_str();
  cmd->add_option("--head-bits", a.head_bits, "Synthetic: trellis bits of lm_head")->capture_default_str();
  cmd->add_option("--device", a.device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  cmd->add_option("--max-seqs", a.max_seqs, "Sequences running at once")->capture_default_str();
  cmd->add_option("--max-step-tokens", a.max_step_tokens, "Rows per engine step (prefill chunk)")->capture_default_str();
  cmd->add_option("--ctx", a.ctx, "Context per request, prompt + output (default: min(32768, max_position_embeddings))");
  cmd->add_option("--kv-memory", a.kv_memory, "KV-cache size in GB (default: 90% of free GPU memory; CPU: up to 2 GB)");
  cmd->add_flag("--no-prefix-caching", a.no_prefix_caching, "Do not reuse cached prompt blocks");
  cmd->add_option("--served-model-name", a.served_name, "The model name clients use (default: the model directory's name)");
  cmd->add_option("--speculative", a.speculative,
                  "Speculative decoding: 'mtp' drafts with the model's MTP layer, per sequence inside the batch (the "
                  "output is the model's own)")
      ->check(CLI::IsMember({"mtp"}));
  cmd->add_option("--draft-tokens", a.draft_tokens, "Draft tokens per step with --speculative")
      ->check(CLI::Range(1, kMaxDraftTokens))
      ->capture_default_str();
  cmd->add_option("--spec-max-seqs", a.spec_max_seqs,
                  "Speculate only while at most this many requests run or wait (beyond, a batch is wide enough)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
}

}  // namespace

void add_serve(CLI::App& app) {
  static ServeArgs a;
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible (and Anthropic Messages) HTTP server on the batched engine");
  add_common(cmd, a);
  cmd->add_option("--host", a.host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", a.port, "Port (0: any free port)")->capture_default_str();
  cmd->add_option("--api-key", a.api_key, "Require this key (Authorization: Bearer KEY, or x-api-key)");
  cmd->add_option("--shutdown-grace", a.shutdown_grace, "Seconds in-flight requests get after SIGINT/SIGTERM")->capture_default_str();
  cmd->callback([] { std::exit(run_serve(a)); });
}

void add_batch(CLI::App& app) {
  static ServeArgs a;
  auto* cmd = app.add_subcommand("batch", "Run an OpenAI Batch file (JSON lines of chat / completion requests) through the engine");
  add_common(cmd, a);
  cmd->add_option("-i,--input", a.input, "Input: one {custom_id, method, url, body} per line")->required();
  cmd->add_option("-o,--output", a.output, "Output: one {id, custom_id, response, error} per line")->required();
  cmd->callback([] { std::exit(run_batch(a)); });
}

}  // namespace trellm::cli
