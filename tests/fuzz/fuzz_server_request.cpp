// libFuzzer target: the server's request-body parser (tools/server/protocol: JSON -> GenRequest, every field), for
// /v1/chat/completions, /v1/completions and Anthropic's /v1/messages, against the built-in model's tokenizer and
// chat template. The body goes through the server's own parse_body (malformed or too deeply nested JSON is a 400
// before these run). A refusal is an
// ApiError (its 4xx status) or a trellm::Error; any other exception would reach the client as a 500, so it is a
// finding here, as is an accepted request that the engine could not run (empty prompt, ids outside the vocabulary,
// prompt + max_tokens past the context, n outside 1..max_n).
#include <httplib.h>

#include "fuzz_util.h"
#include "protocol.h"
#include "server.h"

using namespace trellm;
using namespace trellm::server;

namespace {
struct Model {
  Tokenizer tok = Tokenizer::from_file(std::string(TRELLM_SOURCE_DIR) + "/models/tiny-glm/tokenizer.json");
  ChatTemplate tpl = ChatTemplate::from_model_dir(std::string(TRELLM_SOURCE_DIR) + "/models/tiny-glm");
  ModelContext mc;
  Model() {
    mc.tok = &tok;
    mc.tpl = &tpl;
    mc.served_name = "tiny-glm";
    mc.context = 512;
    mc.vocab = tok.vocab_size();
    mc.eos_ids = {0};
    mc.defaults.stop_ids = {1};
  }
};
const Model& model() {
  static const Model m;
  return m;
}

[[noreturn]] void finding(const std::string& what, const json& body) {
  std::fprintf(stderr, "fuzz_server_request: %s\nbody: %s\n", what.c_str(),
               body.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
  std::abort();
}

void check(const GenRequest& r, const ModelContext& m, const json& body) {
  if (r.prompt.empty()) finding("accepted an empty prompt", body);
  for (int32_t id : r.prompt)
    if (id < 0 || id >= m.vocab) finding("prompt id " + std::to_string(id) + " outside the vocabulary", body);
  if (r.params.max_tokens < 1 || int64_t(r.prompt.size()) + r.params.max_tokens > m.context)
    finding("prompt " + std::to_string(r.prompt.size()) + " + max_tokens " + std::to_string(r.params.max_tokens) +
                " does not fit the context",
            body);
  if (r.n < 1 || r.n > m.max_n) finding("n = " + std::to_string(r.n), body);
  if (r.top_logprobs < 0 || r.top_logprobs > 20) finding("top_logprobs = " + std::to_string(r.top_logprobs), body);
}

template <typename Fn>
void run(Fn&& parse, const json& body) {
  const ModelContext& m = model().mc;
  try {
    check(parse(body, m), m, body);
  } catch (const ApiError& e) {
    if (e.status < 400 || e.status >= 500) finding("ApiError status " + std::to_string(e.status), body);
  } catch (const Error&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)model();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  httplib::Request req;
  req.body.assign(reinterpret_cast<const char*>(data), size);
  json body;
  try {
    body = parse_body(req);
  } catch (const ApiError& e) {
    if (e.status != 400) finding("parse_body answered " + std::to_string(e.status), json(req.body));
    return 0;
  }
  run(parse_chat, body);
  run(parse_completion, body);
  run(parse_messages, body);
  return 0;
}
