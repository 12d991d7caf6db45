#include "metrics.h"

#include <cmath>
#include <cstdio>

namespace trellm::server {

namespace {
std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}
void family(std::string& out, const std::string& name, const char* type, const char* help) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}
void sample(std::string& out, const std::string& name, const std::string& labels, double v) {
  out += name + (labels.empty() ? "" : "{" + labels + "}") + " " + num(v) + "\n";
}
}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds) : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) i++;
  counts_[i]++;
  sum_ += v;
  count_++;
}

void Histogram::render(std::string& out, const std::string& name) const {
  uint64_t cum = 0;
  for (size_t i = 0; i <= bounds_.size(); i++) {
    cum += counts_[i];
    const std::string le = i < bounds_.size() ? num(bounds_[i]) : "+Inf";
    sample(out, name + "_bucket", "le=\"" + le + "\"", double(cum));
  }
  sample(out, name + "_sum", "", sum_);
  sample(out, name + "_count", "", double(count_));
}

// Buckets as vLLM's (seconds).
Metrics::Metrics()
    : ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}),
      itl_({0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}),
      e2e_({0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0}) {}

void Metrics::first_token(double s) {
  std::lock_guard lk(mu_);
  ttft_.observe(s);
}
void Metrics::inter_token(double s) {
  std::lock_guard lk(mu_);
  itl_.observe(s);
}
void Metrics::finished(const std::string& reason, double e2e) {
  std::lock_guard lk(mu_);
  finished_[finish_label(reason)]++;
  e2e_.observe(e2e);
}
void Metrics::rejected() {
  std::lock_guard lk(mu_);
  rejected_++;
}

std::string Metrics::render(const Engine::Stats& st, const std::string& model, int in_flight) const {
  std::string o;
  const std::string ml = "model_name=\"" + model + "\"";
  auto gauge = [&](const char* n, const char* help, double v) {
    family(o, std::string("trellm:") + n, "gauge", help);
    sample(o, std::string("trellm:") + n, ml, v);
  };
  auto counter = [&](const char* n, const char* help, double v) {
    family(o, std::string("trellm:") + n, "counter", help);
    sample(o, std::string("trellm:") + n + "_total", ml, v);
  };
  gauge("num_requests_running", "Requests in the running batch.", st.running);
  gauge("num_requests_waiting", "Requests waiting to run.", st.waiting);
  gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
        st.kv_blocks ? double(st.kv_blocks_used) / st.kv_blocks : 0.0);
  gauge("kv_cache_blocks", "KV-cache blocks of 64 tokens.", st.kv_blocks);
  gauge("kv_cache_blocks_used", "KV-cache blocks held by sequences (cached prefix blocks no one holds are free).",
        st.kv_blocks_used);
  gauge("num_requests_in_flight", "HTTP requests being answered (a stream until its connection is let go).", in_flight);
  counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", double(st.prefix_query_tokens));
  counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", double(st.prefix_hit_tokens));
  counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", double(st.prompt_tokens));
  counter("generation_tokens", "Tokens generated.", double(st.generation_tokens));
  counter("num_preemptions", "Sequences preempted (recomputed later) when the cache ran out.", double(st.preemptions));
  // vLLM's spec_decode_* names: acceptance rate = accepted / draft tokens
  counter("spec_decode_num_drafts", "Sequence-steps that verified MTP drafts (speculative decoding).", double(st.spec_steps));
  counter("spec_decode_num_draft_tokens", "Draft tokens verified.", double(st.spec_draft_tokens));
  counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", double(st.spec_accepted_tokens));
  std::lock_guard lk(mu_);
  family(o, "trellm:request_success", "counter", "Finished requests by finish reason.");
  for (const char* r : {"stop", "length", "tool_calls", "abort", "error"}) {
    auto it = finished_.find(r);
    sample(o, "trellm:request_success_total", ml + ",finished_reason=\"" + r + "\"", it == finished_.end() ? 0.0 : double(it->second));
  }
  family(o, "trellm:request_rejected", "counter", "Requests answered with an error before they ran.");
  sample(o, "trellm:request_rejected_total", ml, double(rejected_));
  family(o, "trellm:time_to_first_token_seconds", "histogram", "Time from a request's arrival to its first token.");
  ttft_.render(o, "trellm:time_to_first_token_seconds");
  family(o, "trellm:inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a request.");
  itl_.render(o, "trellm:inter_token_latency_seconds");
  family(o, "trellm:e2e_request_latency_seconds", "histogram", "Time from a request's arrival to its end.");
  e2e_.render(o, "trellm:e2e_request_latency_seconds");
  return o;
}

}  // namespace trellm::server
