// The server's pieces without HTTP: stop strings across chunk boundaries (never emitted, held back only while they
// could still start), request validation (every bad field named, unsupported fields refused), the Prometheus
// histogram's cumulative buckets.
#include <gtest/gtest.h>

#include <httplib.h>

#include "metrics.h"
#include "protocol.h"
#include "server.h"
#include "stop_strings.h"
#include "test_util.h"

using namespace trellm;
using namespace trellm::server;
using trellm::testing::read_file;

namespace {

// Feeds `text` in chunks of `k` bytes; returns what came out and whether it stopped.
std::pair<std::string, bool> run_stops(const std::vector<std::string>& stops, const std::string& text, size_t k) {
  StopStrings s(stops);
  std::string out;
  for (size_t i = 0; i < text.size() && !s.stopped(); i += k) out += s.feed(text.substr(i, k));
  out += s.finish();
  return {out, s.stopped()};
}

}  // namespace

TEST(StopStrings, MatchesAcrossEveryChunkingAndNeverEmitsTheStop) {
  const std::string text = "Mr. Darcy bowed. The END of it, and more text.";
  for (size_t k = 1; k <= text.size(); k++) {
    auto [out, stopped] = run_stops({"END", "never"}, text, k);
    EXPECT_TRUE(stopped) << "chunk " << k;
    EXPECT_EQ(out, "Mr. Darcy bowed. The ") << "chunk " << k;
  }
  // The earliest of several stops wins; a stop that never completes releases its held-back prefix at the end.
  EXPECT_EQ(run_stops({"bowed", "Darcy"}, text, 3).first, "Mr. ");
  auto [out, stopped] = run_stops({"text.!"}, text, 2);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(out, text);
  // Held back only while it could still be a stop: after "EN" the output lags by exactly those 2 bytes.
  StopStrings s({"END"});
  EXPECT_EQ(s.feed("abc EN"), "abc ");
  EXPECT_EQ(s.feed("x"), "ENx");
}

class Protocol : public ::testing::Test {
 protected:
  void SetUp() override {
    // A byte-level tokenizer is not needed for validation errors; the built-in model's is small.
    tok_.emplace(Tokenizer::from_file(std::string(TRELLM_MODELS_DIR) + "/tiny-glm-3bit/tokenizer.json"));
    tpl_.emplace(ChatTemplate::from_model_dir(std::string(TRELLM_MODELS_DIR) + "/tiny-glm-3bit"));
    m_.tok = &*tok_;
    m_.tpl = &*tpl_;
    m_.served_name = "tiny";
    m_.context = 256;
    m_.vocab = tok_->vocab_size();
  }
  // Expects an ApiError of `status` whose message and param name `what`.
  void expect_bad(const json& body, int status, const std::string& what, bool chat = true) {
    try {
      chat ? parse_chat(body, m_) : parse_completion(body, m_);
      ADD_FAILURE() << "accepted " << body.dump();
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, status) << body.dump() << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  }
  std::optional<Tokenizer> tok_;
  std::optional<ChatTemplate> tpl_;
  ModelContext m_;
};

TEST_F(Protocol, BadFieldsAreNamed) {
  const json msgs = json::array({{{"role", "user"}, {"content", "Hello"}}});
  expect_bad({{"messages", msgs}, {"logit_bias", json::object()}}, 400, "logit_bias");
  expect_bad({{"messages", msgs}, {"temperature", "hot"}}, 400, "temperature");
  expect_bad({{"messages", msgs}, {"temperature", 3}}, 400, "temperature");
  expect_bad({{"messages", msgs}, {"n", 0}}, 400, "'n'");
  expect_bad({{"messages", msgs}, {"max_tokens", 0}}, 400, "max_tokens");
  expect_bad({{"messages", msgs}, {"max_tokens", 1000}}, 400, "maximum context length is 256");
  expect_bad({{"messages", msgs}, {"model", "gpt-4"}}, 404, "gpt-4");
  expect_bad({{"messages", json::array()}}, 400, "messages");
  expect_bad({{"messages", json::array({{{"role", "wizard"}, {"content", "x"}}})}}, 400, "messages[0].role");
  expect_bad({{"messages", json::array({{{"role", "user"}, {"content", json::array({{{"type", "image_url"}}})}}})}}, 400, "image_url");
  expect_bad({{"messages", msgs}, {"stream_options", {{"include_usage", true}}}}, 400, "stream_options");
  expect_bad({{"messages", msgs}, {"tool_choice", "required"}}, 400, "tool_choice");
  expect_bad({{"messages", msgs}, {"top_logprobs", 3}}, 400, "top_logprobs");
  expect_bad({{"messages", msgs}, {"frequency_penalty", 0.5}}, 400, "frequency_penalty");
  expect_bad({{"prompt", json::array({1, -2})}}, 400, "prompt[1]", false);
  expect_bad({{"prompt", "hi"}, {"echo", true}}, 400, "echo", false);
  expect_bad({{"prompt", "hi"}, {"suffix", "x"}}, 400, "suffix", false);
  expect_bad({{"prompt", std::string(2000, 'a')}, {"max_tokens", 4}}, 400, "maximum context length", false);
}

TEST_F(Protocol, GoodRequestsBecomeEngineSettings) {
  json body = {{"messages", json::array({{{"role", "system"}, {"content", "Be brief."}},
                                         {{"role", "user"}, {"content", json::array({{{"type", "text"}, {"text", "Hi"}}})}}})},
               {"temperature", 0.5}, {"top_k", 7}, {"seed", 0}, {"stop", "END"}, {"n", 2}, {"max_tokens", 9},
               {"logprobs", true}, {"top_logprobs", 3}, {"chat_template_kwargs", {{"enable_thinking", false}}}};
  GenRequest r = parse_chat(body, m_);
  EXPECT_FLOAT_EQ(r.params.sampling.temperature, 0.5f);
  EXPECT_EQ(r.params.sampling.top_k, 7);
  EXPECT_NE(r.params.sampling.seed, 0u) << "seed 0 from a client is a fixed seed, not 'from the clock'";
  EXPECT_EQ(r.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(r.n, 2);
  EXPECT_EQ(r.params.max_tokens, 9);
  EXPECT_EQ(r.params.logprobs, 3);
  EXPECT_FALSE(r.thinking_open) << "enable_thinking=false ends the prompt with </think>";
  EXPECT_EQ(r.prompt, tok_->encode(tpl_->render(template_messages(body["messages"]), nullptr, true, {{"enable_thinking", false}})));
  // No max_tokens: the room left in the context.
  GenRequest c = parse_completion({{"prompt", json::array({1, 2, 3})}, {"max_tokens", nullptr}}, m_);
  EXPECT_EQ(c.prompt, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(c.params.max_tokens, 16) << "OpenAI's default for completions";
  // A named tool choice: the prompt goes on with the call's opening, which the output parser sees first.
  json tools = json::array({{{"type", "function"}, {"function", {{"name", "weather"}, {"parameters", json::object()}}}}});
  GenRequest t = parse_chat({{"messages", body["messages"]}, {"tools", tools},
                             {"tool_choice", {{"type", "function"}, {"function", {{"name", "weather"}}}}}}, m_);
  EXPECT_EQ(t.forced_prefix, "<tool_call>weather");
  EXPECT_TRUE(t.tools);
}

// Found by tests/fuzz/fuzz_server_request: a chat body without max_tokens read body["max_tokens"] of a const json
// (an assert in debug builds, a read past the object's end in release ones).
TEST_F(Protocol, FuzzChatWithoutMaxTokens) {
  const json body = json::parse(read_file(std::string(TRELLM_TEST_DATA) + "/fuzz/fuzz_server_request/chat_without_max_tokens.json"));
  GenRequest r = parse_chat(body, m_);
  EXPECT_EQ(r.params.max_tokens, m_.context - int64_t(r.prompt.size())) << "no max_tokens: the room left in the context";
  json with_null = body;
  with_null["max_tokens"] = nullptr;
  EXPECT_EQ(parse_chat(with_null, m_).params.max_tokens, r.params.max_tokens);
  with_null["max_completion_tokens"] = 5;
  EXPECT_EQ(parse_chat(with_null, m_).params.max_tokens, 5);
}

// A 200 KB body of nested arrays overflowed the stack of the handler thread (printing or copying the value is
// recursive): the server now refuses bodies nested deeper than kMaxJsonDepth with a 400.
TEST(ProtocolBody, DeeplyNestedBodyIsA400) {
  httplib::Request req;
  req.body = R"({"messages": [{"role": "user", "content": "Hi"}], "top_k": )" + std::string(100000, '[') +
             std::string(100000, ']') + "}";
  try {
    parse_body(req);
    ADD_FAILURE() << "accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_NE(std::string(e.what()).find("nested deeper than 256"), std::string::npos) << e.what();
  }
  req.body = R"({"messages": [{"role": "user", "content": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]})";
  EXPECT_TRUE(parse_body(req).contains("messages")) << "brackets inside strings do not count";
}

// Found by fuzz_server_request: "logprobs": 2e53 was cast to int64 before its range was checked (UBSan:
// float-cast-overflow).
TEST_F(Protocol, FuzzHugeFloatForAnIntegerField) {
  json body = json::parse(read_file(std::string(TRELLM_TEST_DATA) + "/fuzz/fuzz_server_request/huge_float_integer.json"));
  body.erase("model");  // the fuzz target's model is "tiny-glm", this fixture's "tiny"
  expect_bad(body, 400, "logprobs", /*chat=*/false);
  expect_bad({{"prompt", "x"}, {"n", json::array()}}, 400, "'n' must be an integer", false);
  expect_bad({{"prompt", "x"}, {"max_tokens", 1e300}}, 400, "max_tokens", false);
  expect_bad({{"prompt", "x"}, {"max_tokens", 2.5}}, 400, "must be an integer", false);
  EXPECT_EQ(parse_completion({{"prompt", "x"}, {"max_tokens", 3.0}}, m_).params.max_tokens, 3) << "a whole float is an integer";
}

// Found by fuzz_server_request: json::value("type", "") throws type_error for a non-string, which the server
// answered as a 500 "internal error"; a field of the wrong type is the client's fault: a 400 naming it.
TEST_F(Protocol, FuzzFieldOfTheWrongTypeIsA400) {
  const json body = json::parse(read_file(std::string(TRELLM_TEST_DATA) + "/fuzz/fuzz_server_request/messages_type_not_a_string.json"));
  try {
    parse_messages(body, m_);
    ADD_FAILURE() << "accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_NE(std::string(e.what()).find("'system.type' must be a string"), std::string::npos) << e.what();
  }
  const json msgs = json::array({{{"role", "user"}, {"content", "Hi"}}});
  expect_bad({{"messages", msgs}, {"tools", json::array({{{"type", 5}, {"function", {{"name", "f"}}}}})}}, 400, "tools[0].type");
  expect_bad({{"messages", json::array({{{"role", "assistant"}, {"content", ""},
                                         {"tool_calls", json::array({{{"id", json::array()}, {"function", {{"name", "f"}}}}})}}})}},
             400, "tool_calls[0].id");
}

TEST(Metrics, HistogramBucketsAreCumulative) {
  Histogram h({0.1, 1.0});
  for (double v : {0.05, 0.5, 0.7, 5.0}) h.observe(v);
  std::string out;
  h.render(out, "x");
  EXPECT_NE(out.find("x_bucket{le=\"0.10000000000000001\"} 1"), std::string::npos) << out;
  EXPECT_NE(out.find("x_bucket{le=\"1\"} 3"), std::string::npos) << out;
  EXPECT_NE(out.find("x_bucket{le=\"+Inf\"} 4"), std::string::npos) << out;
  EXPECT_NE(out.find("x_count 4"), std::string::npos) << out;
}

// A stream whose client went away ends before the engine gave it a finish reason: it counts as "abort" (it was
// counted under "", which /metrics never shows). Found by scripts/soak.py (issue 17 part 4).
TEST(Metrics, DisconnectedRequestCountsAsAbort) {
  Metrics m;
  m.finished("", 0.5);
  m.finished("length", 0.5);
  const std::string out = m.render(Engine::Stats{}, "m");
  EXPECT_NE(out.find("trellm:request_success_total{model_name=\"m\",finished_reason=\"abort\"} 1"), std::string::npos) << out;
  EXPECT_NE(out.find("trellm:request_success_total{model_name=\"m\",finished_reason=\"length\"} 1"), std::string::npos) << out;
  EXPECT_EQ(finish_label(""), "abort");
  EXPECT_EQ(finish_label("stop"), "stop");
}

// The gauges a soak checks after the load: KV blocks held and HTTP requests being answered, exactly.
TEST(Metrics, BlocksUsedAndRequestsInFlight) {
  Metrics m;
  Engine::Stats st;
  st.kv_blocks = 40;
  st.kv_blocks_used = 3;
  const std::string out = m.render(st, "m", 2);
  EXPECT_NE(out.find("# TYPE trellm:kv_cache_blocks_used gauge\ntrellm:kv_cache_blocks_used{model_name=\"m\"} 3\n"),
            std::string::npos) << out;
  EXPECT_NE(out.find("# TYPE trellm:num_requests_in_flight gauge\ntrellm:num_requests_in_flight{model_name=\"m\"} 2\n"),
            std::string::npos) << out;
}
