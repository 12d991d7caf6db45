#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/thread_pool.h"

using namespace trellm;

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
  ThreadPool pool(4);
  for (int64_t n : {1, 3, 17, 1000, 100003}) {
    std::vector<std::atomic<int>> hits(n);
    pool.parallel_for(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; i++) hits[i]++;
    });
    for (int64_t i = 0; i < n; i++) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPool, NestedCallsRunSerially) {
  ThreadPool pool(3);
  std::atomic<int64_t> total{0};
  pool.parallel_for(8, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++)
      pool.parallel_for(10, 1, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
  });
  EXPECT_EQ(total.load(), 80);
}

TEST(ThreadPool, AnExceptionInAnyThreadReachesTheCaller) {
  // Every chunk throws, so worker threads throw too (an escaped exception there would terminate the process);
  // the pool stays usable afterwards.
  ThreadPool pool(4);
  for (int round = 0; round < 20; round++) {
    EXPECT_THROW(pool.parallel_for(64, 1, [&](int64_t b, int64_t) {
      if (b >= 0) throw std::runtime_error("chunk failed");
    }), std::runtime_error);
    std::atomic<int64_t> total{0};
    pool.parallel_for(1000, 1, [&](int64_t b, int64_t e) { total += e - b; });
    EXPECT_EQ(total.load(), 1000);
  }
}

TEST(ThreadPool, ScopeRoutesParallelForToItsPool) {
  // The threads a parallel_for runs on, the caller left out.
  auto threads_of = [](auto&& run) {
    std::set<std::thread::id> seen;
    std::mutex mu;
    run([&](int64_t, int64_t) {
      {
        std::lock_guard<std::mutex> lk(mu);
        seen.insert(std::this_thread::get_id());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // keep every worker's chunk in flight at once
    });
    seen.erase(std::this_thread::get_id());
    return seen;
  };
  const auto global = threads_of([](auto fn) { parallel_for(64, 1, fn); });
  ThreadPool own(3);
  std::set<std::thread::id> scoped;
  {
    const ThreadPoolScope scope(own);
    EXPECT_EQ(&ThreadPool::current(), &own);
    scoped = threads_of([](auto fn) { parallel_for(64, 1, fn); });
  }
  EXPECT_EQ(&ThreadPool::current(), &ThreadPool::global());
  EXPECT_FALSE(scoped.empty());  // own's workers took chunks
  EXPECT_LE(scoped.size(), 2u);  // and only they
  for (const auto& id : scoped) EXPECT_EQ(global.count(id), 0u) << "a global worker ran a scoped chunk";
}
