// One choice of a generation request, from the engine's tokens to what a response carries: text detokenized
// incrementally (never half a UTF-8 character), stop strings matched across token boundaries and cut, and for
// chat the GLM output parser's reasoning / content / tool calls. Streaming and non-streaming responses, the
// Anthropic endpoint and `trellm batch` all read choices through this.
#pragma once
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol.h"
#include "runtime/glm_output.h"
#include "stop_strings.h"

namespace trellm::server {

struct ToolCallOut {
  std::string id, name;
  std::string arguments;  // JSON object text
};

struct TokenLogprobOut {
  std::string token;               // the token's text
  std::vector<uint8_t> bytes;      // its bytes
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;  // top-N (text, logprob)
  std::vector<std::vector<uint8_t>> top_bytes;
};

// What one poll produced.
struct ChoiceDelta {
  std::string content, reasoning;
  std::vector<ToolCallOut> tool_calls;
  std::vector<TokenLogprobOut> logprobs;
  int new_tokens = 0;
  bool empty() const { return content.empty() && reasoning.empty() && tool_calls.empty() && logprobs.empty(); }
};

class Choice {
 public:
  Choice(const GenRequest& req, const Tokenizer& tok, std::shared_ptr<Request> r, int index);
  // Waits up to `timeout` for tokens and returns what they complete; done() once the request ended and all
  // its text was returned.
  ChoiceDelta poll(std::chrono::milliseconds timeout);
  bool done() const { return done_; }
  // "stop", "length", "tool_calls"; "abort" (cancelled: shutdown) / "error" when the engine ended it so.
  std::string finish_reason() const;
  std::string error() const { return req_->error(); }
  int64_t completion_tokens() const { return tokens_; }
  int64_t cached_tokens() const { return req_->cached_tokens(); }
  int index() const { return index_; }
  Request& request() { return *req_; }
  // Seconds from creation to the first token (negative before it), for metrics.
  double ttft() const { return ttft_; }
  std::string stop_string() const { return stopped_by_string_ ? stops_.matched() : ""; }
  std::vector<double> take_intervals();  // gaps between tokens since the last call (seconds)

 private:
  void text_in(const std::string& text, ChoiceDelta& d, bool last);
  const GenRequest& gen_;
  const Tokenizer& tok_;
  std::shared_ptr<Request> req_;
  int index_;
  StreamDecoder dec_;
  StopStrings stops_;
  std::optional<GlmOutputParser> parser_;
  FinishReason engine_finish_ = FinishReason::None;
  bool done_ = false, stopped_by_string_ = false, saw_tool_call_ = false;
  int64_t tokens_ = 0;
  int tool_calls_ = 0;
  std::chrono::steady_clock::time_point start_, last_token_;
  double ttft_ = -1;
  std::vector<double> intervals_;
};

// All choices of one request. Choice 0 is submitted at once and the others once it has its first token, so
// they find the prompt's full blocks in the prefix cache instead of computing them n times.
class Generation {
 public:
  Generation(Engine& engine, const Tokenizer& tok, GenRequest req);  // throws trellm::Error when it can never run
  // Polls every choice (submitting the waiting ones when due); deltas[i] for choice i.
  std::vector<ChoiceDelta> poll(std::chrono::milliseconds timeout);
  bool done() const;
  void cancel();
  const GenRequest& request() const { return req_; }
  std::vector<std::unique_ptr<Choice>>& choices() { return choices_; }
  int64_t prompt_tokens() const { return int64_t(req_.prompt.size()); }
  int64_t completion_tokens() const;
  int64_t cached_tokens() const;
  double seconds() const;  // since arrival

 private:
  void submit(int i);
  Engine& engine_;
  const Tokenizer& tok_;
  GenRequest req_;
  std::vector<std::unique_ptr<Choice>> choices_;
  uint64_t seed_ = 0;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace trellm::server
