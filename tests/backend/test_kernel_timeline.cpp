// The kernel clocks' analysis (backend/kernel_timeline.h): records of a known timeline, shuffled and with
// arbitrary launch ids, give back that timeline; records that do not match the graph are refused, naming why.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
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

TEST(KernelTimeline, MarksGiveTheLastBlockToPassEachPoint) {
  // One kernel "g" of 3 blocks a step that marks its hops, then "n" (1 block) that marks none. Step s at 20 us · s;
  // g releases at s0 + 1000 (its blocks return at +1000, +1200, +1100). Per block (inputs, math, arrived, stored):
  //   block 0: 1500, 3000, 4000, -        block 1: 1800, 2500, 4600, 6000 (the last: it stores)
  //   block 2: 1700, 3300, 4200, -
  // -> last go 0.2 us, inputs 0.8, math 2.3, arrived 3.6, stored 5.0 from the release; n releases at s0 + 7000.
  // Per block, from its own previous point (wait return, then each mark): inputs 500 / 600 / 600 ns, math 1500 /
  // 700 / 1600, arrived 1000 / 2100 / 900, stored 1400 (block 1 only).
  std::vector<ClockRecord> r;
  uint64_t id = 50;
  std::mt19937 rng(3);
  for (int s = 0; s < 3; s++) {
    const uint64_t s0 = 20000 * uint64_t(s);
    const uint64_t g = id++, n = id++;
    r.push_back({g, s0 + 500, s0 + 1000, 0, 0, {s0 + 1500, s0 + 3000, s0 + 4000, 0}});
    r.push_back({g, s0 + 600, s0 + 1200, 1, 1, {s0 + 1800, s0 + 2500, s0 + 4600, s0 + 6000}});
    r.push_back({g, s0 + 700, s0 + 1100, 2, 2, {s0 + 1700, s0 + 3300, s0 + 4200, 0}});
    r.push_back({n, s0 + 2000, s0 + 7000, 3, 0});
  }
  std::shuffle(r.begin(), r.end(), rng);
  const std::vector<GraphKernel> gk = {{"g", 3}, {"n", 1}};
  const auto steps = build_timeline(r, gk);
  ASSERT_EQ(steps.size(), 2u);
  const double want[kClockMarks] = {0.8, 2.3, 3.6, 5.0};
  const double per_block[kClockMarks] = {1.7 / 3, 3.8 / 3, 4.0 / 3, 1.4};
  for (const StepTimeline& st : steps) {
    EXPECT_NEAR(st.kernels[0].last_go_us, 0.2, 1e-9);
    for (int m = 0; m < kClockMarks; m++) EXPECT_NEAR(st.kernels[0].mark_us[m], want[m], 1e-9) << kMarkNames[m];
    for (int m = 0; m < kClockMarks; m++) EXPECT_NEAR(st.kernels[0].block_us[m], per_block[m], 1e-9) << kMarkNames[m];
    for (int m = 0; m < kClockMarks; m++) EXPECT_EQ(st.kernels[1].mark_us[m], -1.0) << kMarkNames[m];
    for (int m = 0; m < kClockMarks; m++) EXPECT_EQ(st.kernels[1].block_us[m], -1.0) << kMarkNames[m];
    EXPECT_NEAR(st.kernels[0].path_us, 6.0, 1e-9);
  }
  const auto sum = summarize(steps, gk);
  ASSERT_EQ(sum.size(), 2u);
  EXPECT_NEAR(sum[0].last_go_us, 0.2, 1e-9);
  for (int m = 0; m < kClockMarks; m++) {
    EXPECT_NEAR(sum[0].mark_us[m], want[m], 1e-9) << kMarkNames[m];
    EXPECT_NEAR(sum[0].block_us[m], per_block[m], 1e-9) << kMarkNames[m];
    EXPECT_EQ(sum[1].mark_us[m], -1.0) << kMarkNames[m];
    EXPECT_EQ(sum[1].block_us[m], -1.0) << kMarkNames[m];
  }
  // The step cut along the marks: g's 6 us share as start 0.2, staging 0.6, compute 1.5, tail 2.7 (to the stored
  // mark), drain 1.0; n's 14 us unmarked; the parts add up to the 20 us step.
  const StepSplit sp = split_step(steps);
  EXPECT_NEAR(sp.start_us, 0.2, 1e-9);
  EXPECT_NEAR(sp.staging_us, 0.6, 1e-9);
  EXPECT_NEAR(sp.compute_us, 1.5, 1e-9);
  EXPECT_NEAR(sp.tail_us, 2.7, 1e-9);
  EXPECT_NEAR(sp.drain_us, 1.0, 1e-9);
  EXPECT_NEAR(sp.unmarked_us, 14.0, 1e-9);
  EXPECT_NEAR(sp.step_us, 20.0, 1e-9);
  // Marks out of order are a broken record: one before the block's wait returned, one before its previous mark.
  auto refused = [&](int mark, int64_t from_go, const char* why) {
    std::vector<ClockRecord> bad = r;
    for (ClockRecord& x : bad)
      if (x.t_mark[mark] != 0) {
        x.t_mark[mark] = uint64_t(int64_t(x.t_go) + from_go);
        break;
      }
    try {
      build_timeline(bad, gk);
      ADD_FAILURE() << "accepted: " << why;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  refused(0, -1, "passed its inputs mark before its wait returned");
  refused(1, 100, "passed its math mark before its previous mark");  // inputs come 500+ ns after the wait
}

// split_step on spans made by hand: a missing mark's time falls into the next part the kernel marks; a point past
// the kernel's share (a late last block, a mark before the previous point) is clamped, so no part is negative and
// the parts of every kernel add up to its share; the steps are averaged.
TEST(KernelTimeline, SplitsTheStepAlongTheMarks) {
  auto span = [](double path, double last_go, std::array<double, kClockMarks> marks) {
    KernelSpan k{};
    k.path_us = path, k.last_go_us = last_go;
    std::copy(marks.begin(), marks.end(), k.mark_us);
    return k;
  };
  StepTimeline s1, s2;
  // No inputs mark: start 1, compute 3 (from the last go), tail 2, drain 4.
  s1.kernels.push_back(span(10, 1, {-1, 4, 6, -1}));
  // Last go past the share: start 5 and nothing else (the stored mark at 2 is before it).
  s1.kernels.push_back(span(5, 7, {-1, -1, -1, 2}));
  s1.kernels.push_back(span(15, 0, {-1, -1, -1, -1}));  // unmarked
  s1.step_us = 30;
  // Every mark: start 0, staging 2, compute 2, tail 1 (arrived 5 after stored 4: the later counts), drain 5.
  s2.kernels.push_back(span(10, 0, {2, 4, 5, 4}));
  s2.kernels.push_back(span(20, 0, {-1, -1, -1, -1}));
  s2.step_us = 30;
  const StepSplit t = split_step({s1, s2});
  EXPECT_NEAR(t.start_us, (1 + 5 + 0) / 2.0, 1e-12);
  EXPECT_NEAR(t.staging_us, (0 + 2) / 2.0, 1e-12);
  EXPECT_NEAR(t.compute_us, (3 + 2) / 2.0, 1e-12);
  EXPECT_NEAR(t.tail_us, (2 + 1) / 2.0, 1e-12);
  EXPECT_NEAR(t.drain_us, (4 + 5) / 2.0, 1e-12);
  EXPECT_NEAR(t.unmarked_us, (15 + 20) / 2.0, 1e-12);
  EXPECT_NEAR(t.step_us, 30, 1e-12);
  EXPECT_NEAR(t.start_us + t.staging_us + t.compute_us + t.tail_us + t.drain_us + t.unmarked_us, t.step_us, 1e-12);
  const StepSplit none = split_step({});
  EXPECT_EQ(none.step_us, 0.0);
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
