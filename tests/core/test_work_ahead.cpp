#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>

#include "core/error.h"
#include "core/work_ahead.h"

using namespace trellm;

TEST(WorkAhead, GivesEveryResultInOrder) {
  for (uint64_t budget : {uint64_t(0), uint64_t(1), uint64_t(1000)}) {
    WorkAhead<int> w(50, budget, [](size_t) { return uint64_t(10); }, [](size_t i) { return int(i * i); });
    for (size_t i = 0; i < 50; i++) ASSERT_EQ(w.take(i), int(i * i)) << "budget " << budget;
  }
}

// Waits (up to 10 s) for the producer to have made n results.
void wait_for(const std::atomic<int>& made, int n) {
  for (int i = 0; i < 10000 && made.load() < n; i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

TEST(WorkAhead, StaysWithinItsBudget) {
  std::atomic<int> made{0};
  WorkAhead<int> w(20, 30, [](size_t) { return uint64_t(10); }, [&](size_t i) {
    made++;
    return int(i);
  });
  wait_for(made, 3);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // time to overrun, if it would
  EXPECT_EQ(made.load(), 3);  // 3 x 10 bytes waiting, none taken
  EXPECT_EQ(w.take(0), 0);
  wait_for(made, 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(made.load(), 4);
}

TEST(WorkAhead, OneResultMayExceedTheBudget) {
  WorkAhead<int> w(3, 5, [](size_t) { return uint64_t(100); }, [](size_t i) { return int(i) + 1; });
  EXPECT_EQ(w.take(0), 1);
  EXPECT_EQ(w.take(1), 2);
  EXPECT_EQ(w.take(2), 3);
}

TEST(WorkAhead, AnErrorReachesTheTakeOfItsIndex) {
  for (uint64_t budget : {uint64_t(0), uint64_t(100)}) {
    WorkAhead<int> w(5, budget, [](size_t) { return uint64_t(1); }, [](size_t i) {
      if (i == 2) fail("item ", i, " is bad");
      return int(i);
    });
    EXPECT_EQ(w.take(0), 0);
    EXPECT_EQ(w.take(1), 1);
    try {
      w.take(2);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("item 2 is bad"), std::string::npos);
    }
  }
}

TEST(WorkAhead, StopsWhenDestroyedEarly) {
  std::atomic<int> made{0};
  {
    WorkAhead<int> w(1000, 1000, [](size_t) { return uint64_t(1); }, [&](size_t i) {
      made++;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      return int(i);
    });
    EXPECT_EQ(w.take(0), 0);
  }
  EXPECT_LT(made.load(), 1000);
}
