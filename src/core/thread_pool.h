// A fixed pool of worker threads with a blocking parallel_for. One process-wide pool
// (threads = hardware concurrency unless set) serves every CPU op.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace trellm {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Calls fn(begin, end) over [0, n) split into chunks of at least `grain` items; the calling thread
  // takes part. Returns when every chunk is done. Nested calls run serially on the caller. An exception thrown by
  // fn on any thread is rethrown here, on the caller, once the chunks in flight are done (the rest are skipped).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  static ThreadPool& global();
  static void set_global_threads(int threads);  // call before first use of global()
  // The pool parallel_for uses on the calling thread: the innermost ThreadPoolScope's, else global().
  static ThreadPool& current();

 private:
  void worker_loop();
  void run_chunks();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;  // the first exception a chunk threw (parallel_for rethrows it)
  int64_t n_ = 0, chunk_ = 0;
  int64_t next_ = 0;          // next chunk start (guarded by mu_)
  int active_ = 0;            // workers still inside the current job
  uint64_t generation_ = 0;   // bumps per job so workers wake once per job
  bool stop_ = false;
  bool busy_ = false;
};

// While alive, parallel_for on the constructing thread runs on `pool`: a background stage (the quantizer's work ahead
// on later groups) gets workers of its own instead of running serially whenever another thread holds the global pool,
// and leaves the global pool to the critical path.
class ThreadPoolScope {
 public:
  explicit ThreadPoolScope(ThreadPool& pool);
  ~ThreadPoolScope();
  ThreadPoolScope(const ThreadPoolScope&) = delete;
  ThreadPoolScope& operator=(const ThreadPoolScope&) = delete;

 private:
  ThreadPool* prev_;
};

inline void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::current().parallel_for(n, grain, fn);
}

}  // namespace trellm
