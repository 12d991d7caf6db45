// The server's Prometheus metrics (text exposition format 0.0.4), named like vLLM's with the prefix `trellm:`:
// gauges and counters read from the engine at scrape time, histograms of latencies observed by the server.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace trellm::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double v);
  // Appends the _bucket (cumulative, with +Inf), _sum and _count lines of metric `name`.
  void render(std::string& out, const std::string& name) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; the last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// A finish reason for the metrics and the log: an empty one (the engine had not ended the request when its
// client went away and the stream was cancelled) is "abort", as vLLM counts a disconnect.
inline std::string finish_label(const std::string& reason) { return reason.empty() ? "abort" : reason; }

class Metrics {
 public:
  Metrics();
  void first_token(double seconds);     // time to first token of a request (arrival -> first token)
  void inter_token(double seconds);     // time between two tokens of one request
  // One finished request ("stop", "length", ...; finish_label() of it).
  void finished(const std::string& reason, double e2e_seconds);
  void rejected();                      // a request answered with an error before it ran
  // `in_flight`: HTTP requests being answered (a stream until its handler has let go of it).
  std::string render(const Engine::Stats& engine, const std::string& model_name, int in_flight = 0) const;

 private:
  mutable std::mutex mu_;
  Histogram ttft_, itl_, e2e_;
  std::map<std::string, uint64_t> finished_;
  uint64_t rejected_ = 0;
};

}  // namespace trellm::server
