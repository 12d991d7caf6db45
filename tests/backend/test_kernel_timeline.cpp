// The kernel clocks' analysis (backend/kernel_timeline.h): records of a known timeline, shuffled and with
// arbitrary launch ids, give back that timeline; records that do not match the graph are refused, naming why.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "backend/kernel_timeline.h"
#include "core/error.h"

using namespace trellm;

namespace {

// Two kernels a step, `a` (3 blocks) then `b` (2 blocks). Step s starts at 100 us + 50 us * s; in ns:
//   a: arrivals s0+0, +200, +900; releases s0+1000, +1100, +1000   -> release s0+1000, lead 1000
//   b: arrivals s0+1500, +1500;   releases s0+1500, +1600          -> release s0+1500, lead 0
std::vector<ClockRecord> three_steps(std::mt19937& rng) {
  std::vector<ClockRecord> r;
  uint64_t id = 7777;
  for (int s = 0; s < 3; s++) {
    const uint64_t s0 = 100000 + 50000 * uint64_t(s);
    const uint64_t a = id += 13 + rng() % 100, b = id += 13 + rng() % 100;
    r.push_back({a, s0 + 0, s0 + 1000, 1, 0});
    r.push_back({a, s0 + 200, s0 + 1100, 2, 1});
    r.push_back({a, s0 + 900, s0 + 1000, 3, 2});
    r.push_back({b, s0 + 1500, s0 + 1500, 1, 0});
    r.push_back({b, s0 + 1500, s0 + 1600, 4, 1});
  }
  std::shuffle(r.begin(), r.end(), rng);
  return r;
}

const std::vector<GraphKernel> kAB = {{"a", 3}, {"b", 2}};

}  // namespace

TEST(KernelTimeline, RecoversAKnownTimeline) {
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 5; trial++) {
    const auto rec = three_steps(rng);
    const auto steps = build_timeline(rec, kAB);
    ASSERT_EQ(steps.size(), 2u);  // the third step only closes the second
    for (const StepTimeline& st : steps) {
      EXPECT_DOUBLE_EQ(st.step_us, 50.0);
      ASSERT_EQ(st.kernels.size(), 2u);
      EXPECT_EQ(st.kernels[0].blocks, 3);
      EXPECT_EQ(st.kernels[1].blocks, 2);
      EXPECT_DOUBLE_EQ(st.kernels[0].release_us, 0.0);
      EXPECT_DOUBLE_EQ(st.kernels[1].release_us, 0.5);
      EXPECT_DOUBLE_EQ(st.kernels[0].lead_us, 1.0);
      EXPECT_DOUBLE_EQ(st.kernels[1].lead_us, 0.0);
      EXPECT_DOUBLE_EQ(st.kernels[0].path_us, 0.5);
      EXPECT_DOUBLE_EQ(st.kernels[1].path_us, 49.5);  // to the next step's first release
    }
  }
}

TEST(KernelTimeline, SummarizesRepeatedKernelsByName) {
  // "a" twice a step (two layers, say), "b" once: a0 a1 b.
  std::vector<ClockRecord> r;
  uint64_t id = 1;
  for (int s = 0; s < 4; s++) {
    const uint64_t s0 = 10000 * uint64_t(s);
    r.push_back({id++, s0, s0 + 2000, 0, 0});         // a0: release 2 us, lead 2 us, path 1 us
    r.push_back({id++, s0 + 3000, s0 + 3000, 0, 0});  // a1: release 3 us, lead 0, path 1 us
    r.push_back({id++, s0 + 3500, s0 + 4000, 0, 0});  // b:  release 4 us, lead 0.5 us, path 8 us (to 12 us)
  }
  const std::vector<GraphKernel> g = {{"a", 1}, {"a", 1}, {"b", 1}};
  const auto steps = build_timeline(r, g);
  ASSERT_EQ(steps.size(), 3u);
  const auto sum = summarize(steps, g);
  ASSERT_EQ(sum.size(), 2u);
  EXPECT_EQ(sum[0].name, "a");
  EXPECT_EQ(sum[0].launches, 2);
  EXPECT_DOUBLE_EQ(sum[0].path_us, 2.0);
  EXPECT_DOUBLE_EQ(sum[0].lead_us, 1.0);
  EXPECT_DOUBLE_EQ(sum[0].hidden, 0.5);
  EXPECT_EQ(sum[1].name, "b");
  EXPECT_EQ(sum[1].launches, 1);
  EXPECT_DOUBLE_EQ(sum[1].path_us, 8.0);
  EXPECT_DOUBLE_EQ(sum[1].lead_us, 0.5);
  EXPECT_DOUBLE_EQ(sum[1].hidden, 1.0);
}

TEST(KernelTimeline, RefusesRecordsThatDoNotMatchTheGraph) {
  std::mt19937 rng(7);
  auto rec = three_steps(rng);
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  // Three kernels a step: 6 launches are two steps of three, but launch 0 has 3 blocks against a grid of 1.
  EXPECT_NE(message([&] { build_timeline(rec, std::vector<GraphKernel>{{"a", 1}, {"b", 2}, {"c", 2}}); }).find("recorded 3 blocks"),
            std::string::npos);
  // Four kernels a step: 6 launches are not whole steps.
  EXPECT_NE(message([&] { build_timeline(rec, std::vector<GraphKernel>{{"a", 3}, {"b", 2}, {"c", 3}, {"d", 2}}); })
                .find("6 launches recorded, not whole steps of the graph's 4 kernels"),
            std::string::npos);
  // A launch with more blocks than its grid.
  EXPECT_NE(message([&] { build_timeline(rec, std::vector<GraphKernel>{{"a", 2}, {"b", 2}}); }).find("a has a grid of 2"),
            std::string::npos);
  // One step cannot close itself.
  std::vector<ClockRecord> one(rec.begin(), rec.end());
  one.erase(std::remove_if(one.begin(), one.end(), [](const ClockRecord& x) { return x.t_wait >= 150000; }), one.end());
  EXPECT_NE(message([&] { build_timeline(one, kAB); }).find("1 step recorded"), std::string::npos);
  // A clock that runs backwards.
  rec[0].t_go = rec[0].t_wait - 1;
  EXPECT_NE(message([&] { build_timeline(rec, kAB); }).find("returned from its wait before it reached it"), std::string::npos);
  EXPECT_NE(message([&] { build_timeline(rec, std::vector<GraphKernel>{}); }).find("no kernels"), std::string::npos);
}

TEST(KernelTimeline, ShortNames) {
  EXPECT_EQ(short_kernel_name("void trellm::cuda::tk::gemv_kernel<3>(trellm::cuda::tk::LinearArgs)"), "gemv_kernel<3>");
  EXPECT_EQ(short_kernel_name("void trellm::cuda::mla::(anonymous namespace)::attend_decode_kernel<3>(trellm::cuda::mla::AttendParams)"),
            "attend_decode_kernel<3>");
  EXPECT_EQ(short_kernel_name("void trellm::cuda::moe<trellm::cuda::Slot, 2>(int, float const*)"), "moe<Slot, 2>");
  EXPECT_EQ(short_kernel_name("rms_norm_kernel"), "rms_norm_kernel");
  EXPECT_EQ(short_kernel_name("_Z3fooi"), "_Z3fooi");  // not demangled: kept as it is
}
