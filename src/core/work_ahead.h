// A producer that works ahead of its consumer: make(0), make(1), ... run in order on a thread of their own while the
// consumer takes the results, also in order. At most `budget` bytes of results (bytes(i) each) wait untaken; one always
// may, whatever its size. With budget 0 there is no thread: take(i) runs make(i) itself. An exception thrown by
// make(i) is rethrown by take(i) (the thread stops there); the destructor stops the thread after its current make.
// The quantizer rotates later groups of Linears (weights only) while the main thread adds Hessians to earlier ones.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "core/error.h"

namespace trellm {

template <typename T>
class WorkAhead {
 public:
  WorkAhead(size_t n, uint64_t budget, std::function<uint64_t(size_t)> bytes, std::function<T(size_t)> make)
      : n_(n), budget_(budget), bytes_(std::move(bytes)), make_(std::move(make)) {
    if (budget_ > 0 && n_ > 0) thread_ = std::thread([this] { run(); });
  }
  ~WorkAhead() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  WorkAhead(const WorkAhead&) = delete;
  WorkAhead& operator=(const WorkAhead&) = delete;

  T take(size_t i) {
    TRELLM_ASSERT(i == next_ && i < n_, "WorkAhead::take(", i, "): expected ", next_, " of ", n_);
    next_++;
    if (!thread_.joinable()) return make_(i);
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return ready_.count(i) > 0 || failed_at_ == i; });
    if (failed_at_ == i) std::rethrow_exception(error_);
    T v = std::move(ready_.at(i));
    ready_.erase(i);
    held_ -= bytes_(i);
    lk.unlock();
    cv_.notify_all();
    return v;
  }

 private:
  void run() {
    for (size_t i = 0; i < n_; i++) {
      const uint64_t b = bytes_(i);
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || held_ == 0 || held_ + b <= budget_; });
        if (stop_) return;
      }
      std::optional<T> v;
      try {
        v.emplace(make_(i));
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        error_ = std::current_exception();
        failed_at_ = i;
        cv_.notify_all();
        return;
      }
      {
        std::lock_guard<std::mutex> lk(mu_);
        ready_.emplace(i, std::move(*v));
        held_ += b;
      }
      cv_.notify_all();
    }
  }

  const size_t n_;
  const uint64_t budget_;
  const std::function<uint64_t(size_t)> bytes_;
  const std::function<T(size_t)> make_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<size_t, T> ready_;
  uint64_t held_ = 0;  // bytes of results made and not yet taken
  std::exception_ptr error_;
  size_t failed_at_ = SIZE_MAX;
  size_t next_ = 0;  // the consumer's next index (its thread only)
  bool stop_ = false;
  std::thread thread_;  // last: started once everything above is built
};

}  // namespace trellm
