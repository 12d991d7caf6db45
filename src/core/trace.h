// A timeline of what each thread did, for seeing where a long job's time goes (`trellm quantize --trace FILE`):
// named spans recorded from any thread, written as Chrome trace-event JSON (load it in ui.perfetto.dev or
// chrome://tracing: one row per thread). Off unless started; a span then costs one relaxed load.
#pragma once
#include <chrono>
#include <string>

namespace trellm::trace {

// Begins recording (dropping what an earlier recording held). Spans from before are not kept.
void start();
// Stops recording and writes the spans as Chrome trace JSON to `path`; throws trellm::Error when it cannot.
void write(const std::string& path);
bool on();
// Names the calling thread's row ("main", "rotate ahead", ...; default "thread N"); before or during a recording.
// Threads that take the same name share a row (short-lived workers: "encode slot 1").
void name_thread(std::string name);

using Clock = std::chrono::steady_clock;
void add(std::string name, Clock::time_point t0, Clock::time_point t1);  // on the calling thread's row

// The span of its own lifetime on the calling thread's row.
class Span {
 public:
  explicit Span(std::string name) {
    if (on()) name_ = std::move(name), t0_ = Clock::now(), live_ = true;
  }
  ~Span() {
    if (live_) add(std::move(name_), t0_, Clock::now());
  }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  std::string name_;
  Clock::time_point t0_;
  bool live_ = false;
};

}  // namespace trellm::trace
