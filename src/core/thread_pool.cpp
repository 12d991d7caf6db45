#include "core/thread_pool.h"

#include <algorithm>
#include <exception>
#include <memory>
#include <utility>

namespace trellm {

namespace {
int g_requested_threads = 0;
thread_local bool t_inside_pool = false;
thread_local ThreadPool* t_scope_pool = nullptr;  // ThreadPoolScope
}  // namespace

ThreadPoolScope::ThreadPoolScope(ThreadPool& pool) : prev_(t_scope_pool) { t_scope_pool = &pool; }

ThreadPoolScope::~ThreadPoolScope() { t_scope_pool = prev_; }

ThreadPool& ThreadPool::current() { return t_scope_pool ? *t_scope_pool : global(); }

ThreadPool::ThreadPool(int threads) {
  threads = std::max(1, threads);
  for (int i = 0; i < threads - 1; i++) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks() {
  t_inside_pool = true;
  for (;;) {
    int64_t begin;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (next_ >= n_) break;
      begin = next_;
      next_ += chunk_;
    }
    try {
      (*fn_)(begin, std::min(n_, begin + chunk_));
    } catch (...) {  // the first error is rethrown by parallel_for on its caller; the remaining chunks are skipped
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      next_ = n_;
    }
  }
  t_inside_pool = false;
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    run_chunks();
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) cv_done_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t max_chunks = int64_t(size()) * 4;  // a few chunks per thread evens out the tail
  int64_t chunk = std::max(grain, (n + max_chunks - 1) / max_chunks);
  if (workers_.empty() || t_inside_pool || n <= chunk) {
    fn(0, n);
    return;
  }
  std::unique_lock<std::mutex> lk(mu_);
  if (busy_) {  // another thread is using the pool: run serially rather than interleave jobs
    lk.unlock();
    fn(0, n);
    return;
  }
  busy_ = true;
  fn_ = &fn;
  n_ = n;
  chunk_ = chunk;
  next_ = 0;
  active_ = int(workers_.size());
  generation_++;
  lk.unlock();
  cv_work_.notify_all();
  run_chunks();
  lk.lock();
  cv_done_.wait(lk, [&] { return active_ == 0; });
  fn_ = nullptr;
  busy_ = false;
  if (std::exception_ptr e = std::exchange(error_, nullptr)) std::rethrow_exception(e);
}

ThreadPool& ThreadPool::global() {
  static std::unique_ptr<ThreadPool> pool = [] {
    int n = g_requested_threads > 0 ? g_requested_threads : int(std::thread::hardware_concurrency());
    return std::make_unique<ThreadPool>(n > 0 ? n : 1);
  }();
  return *pool;
}

void ThreadPool::set_global_threads(int threads) { g_requested_threads = threads; }

}  // namespace trellm
