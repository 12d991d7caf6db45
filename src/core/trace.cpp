#include "core/trace.h"

#include <atomic>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"

namespace trellm::trace {

namespace {

struct Event {
  std::string name, row;
  Clock::time_point t0, t1;
};

std::atomic<bool> recording = false;
std::mutex mu;
std::vector<Event> events;
Clock::time_point origin;
std::atomic<int> next_thread = 1;
thread_local std::string thread_row;  // empty: "thread N", numbered on first use

const std::string& this_row() {
  if (thread_row.empty()) thread_row = str_cat("thread ", next_thread++);
  return thread_row;
}

}  // namespace

void start() {
  std::lock_guard lock(mu);
  events.clear();
  origin = Clock::now();
  recording = true;
}

bool on() { return recording.load(std::memory_order_relaxed); }

void name_thread(std::string name) { thread_row = std::move(name); }

void add(std::string name, Clock::time_point t0, Clock::time_point t1) {
  std::string row = this_row();
  std::lock_guard lock(mu);
  if (recording) events.push_back({std::move(name), std::move(row), t0, t1});
}

void write(const std::string& path) {
  std::lock_guard lock(mu);
  recording = false;
  auto us = [](Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); };
  nlohmann::json ev = nlohmann::json::array();
  std::map<std::string, int> tid;  // rows numbered in order of first appearance
  for (const Event& e : events) {
    auto [it, fresh] = tid.emplace(e.row, int(tid.size()) + 1);
    if (fresh)
      ev.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", 1}, {"tid", it->second}, {"args", {{"name", e.row}}}});
    ev.push_back({{"name", e.name}, {"ph", "X"}, {"pid", 1}, {"tid", it->second}, {"ts", us(e.t0 - origin)},
                  {"dur", us(e.t1 - e.t0)}});
  }
  std::ofstream f(path);
  if (!f) fail("trace: cannot write ", path);
  f << nlohmann::json{{"traceEvents", ev}, {"displayTimeUnit", "ms"}}.dump() << "\n";
  if (!f) fail("trace: writing ", path, " failed");
  events.clear();
}

}  // namespace trellm::trace
