#include "choice.h"

#include <algorithm>

#include "runtime/sampler.h"

namespace trellm::server {

Choice::Choice(const GenRequest& req, const Tokenizer& tok, std::shared_ptr<Request> r, int index)
    // Chat keeps special tokens in the text: GLM's <think>, </think>, <tool_call>, <arg_key>, ... are special
    // tokens, and the output parser needs them; the stop tokens (hidden_ids) are left out of the text either way.
    : gen_(req), tok_(tok), req_(std::move(r)), index_(index), dec_(tok, /*skip_special_tokens=*/!req.glm_parse), stops_(req.stop) {
  start_ = last_token_ = std::chrono::steady_clock::now();
  if (req.glm_parse) {
    parser_.emplace(req.thinking_open);
    if (!req.forced_prefix.empty()) parser_->feed(req.forced_prefix);  // the prompt already opened the tool call
  }
}

void Choice::text_in(const std::string& text, ChoiceDelta& d, bool last) {
  std::string t = stops_.feed(text);
  if (last || stops_.stopped()) t += stops_.finish();
  if (!parser_) {
    d.content += t;
    return;
  }
  std::vector<GlmEvent> evs = parser_->feed(t);
  if (last || stops_.stopped()) {
    auto tail = parser_->finish();
    evs.insert(evs.end(), tail.begin(), tail.end());
  }
  for (GlmEvent& e : evs) {
    if (e.type == GlmEvent::Reasoning) d.reasoning += e.text;
    else if (e.type == GlmEvent::Content) d.content += e.text;
    else if (gen_.tools) d.tool_calls.push_back({random_id("call_"), e.name, e.arguments.dump()}), saw_tool_call_ = true;
    else d.content += "<tool_call>" + e.name + e.arguments.dump() + "</tool_call>";  // tools not offered: plain text
  }
}

ChoiceDelta Choice::poll(std::chrono::milliseconds timeout) {
  ChoiceDelta d;
  if (done_) return d;
  std::vector<GenToken> toks;
  engine_finish_ = req_->wait(toks, timeout);
  const auto now = std::chrono::steady_clock::now();
  for (const GenToken& g : toks) {
    if (stops_.stopped()) break;  // tokens past a stop string are not part of the output
    tokens_++;
    d.new_tokens++;
    if (ttft_ < 0) ttft_ = std::chrono::duration<double>(now - start_).count();
    else intervals_.push_back(std::chrono::duration<double>(now - last_token_).count() / double(toks.size()));
    last_token_ = now;
    const bool hidden = std::find(gen_.hidden_ids.begin(), gen_.hidden_ids.end(), g.id) != gen_.hidden_ids.end();
    if (gen_.logprobs && !hidden) {  // a stop token is no part of the text, nor of its logprobs
      TokenLogprobOut lp;
      std::string b;
      tok_.token_bytes(g.id, b);
      lp.token = tok_.decode(std::span<const int32_t>(&g.id, 1));
      lp.bytes.assign(b.begin(), b.end());
      lp.logprob = g.logprob;
      for (const auto& t : g.top) {
        std::string tb;
        tok_.token_bytes(t.token, tb);
        lp.top.emplace_back(tok_.decode(std::span<const int32_t>(&t.token, 1)), t.logprob);
        lp.top_bytes.emplace_back(tb.begin(), tb.end());
      }
      d.logprobs.push_back(std::move(lp));
    }
    if (!hidden) text_in(dec_.push(g.id), d, false);
    if (stops_.stopped()) {
      stopped_by_string_ = true;
      req_->cancel();  // the engine frees the sequence at its next step
    }
  }
  if (stopped_by_string_ || engine_finish_ != FinishReason::None) {
    if (!stopped_by_string_) text_in(dec_.finish(), d, true);
    done_ = true;
  }
  return d;
}

std::string Choice::finish_reason() const {
  if (stopped_by_string_) return "stop";
  switch (engine_finish_) {
    // A parsed tool call makes it "tool_calls" however the output ended (vLLM's rule): a call cut short by
    // max_tokens is not parsed, so there is none to report then.
    case FinishReason::Stop: return saw_tool_call_ ? "tool_calls" : "stop";
    case FinishReason::Length: return saw_tool_call_ ? "tool_calls" : "length";
    case FinishReason::Cancelled: return "abort";  // as vLLM: the request was cancelled (shutdown)
    case FinishReason::Error: return "error";
    case FinishReason::None: return "";
  }
  return "";
}

std::vector<double> Choice::take_intervals() {
  std::vector<double> v;
  v.swap(intervals_);
  return v;
}

Generation::Generation(Engine& engine, const Tokenizer& tok, GenRequest req)
    : engine_(engine), tok_(tok), req_(std::move(req)), start_(std::chrono::steady_clock::now()) {
  seed_ = resolve_seed(req_.params.sampling.seed);
  submit(0);
}

void Generation::submit(int i) {
  GenParams p = req_.params;
  p.sampling.seed = seed_ + uint64_t(i) * 0xD1B54A32D192ED03ull;  // distinct draws per choice, reproducible per seed
  if (p.sampling.seed == 0) p.sampling.seed = 1;
  choices_.push_back(std::make_unique<Choice>(req_, tok_, engine_.submit(req_.prompt, p), i));
}

std::vector<ChoiceDelta> Generation::poll(std::chrono::milliseconds timeout) {
  if (int(choices_.size()) < req_.n && (choices_[0]->ttft() >= 0 || choices_[0]->done()))
    while (int(choices_.size()) < req_.n) submit(int(choices_.size()));
  std::vector<ChoiceDelta> out(choices_.size());
  // Wait on the first unfinished choice, then collect the others without waiting.
  bool waited = false;
  for (size_t i = 0; i < choices_.size(); i++) {
    if (choices_[i]->done()) continue;
    out[i] = choices_[i]->poll(waited ? std::chrono::milliseconds(0) : timeout);
    waited = true;
  }
  return out;
}

bool Generation::done() const {
  if (int(choices_.size()) < req_.n) return false;
  for (const auto& c : choices_)
    if (!c->done()) return false;
  return true;
}

void Generation::cancel() {
  for (auto& c : choices_) c->request().cancel();
  req_.n = int(choices_.size());  // no more choices are submitted
}

int64_t Generation::completion_tokens() const {
  int64_t t = 0;
  for (const auto& c : choices_) t += c->completion_tokens();
  return t;
}

int64_t Generation::cached_tokens() const { return choices_.empty() ? 0 : choices_[0]->cached_tokens(); }

double Generation::seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

}  // namespace trellm::server
