// The persistent decode kernel's task graph and schedule (backend/step_plan.h): the tiles cover GLM-4.7-Flash's
// matrices exactly (sizes from ../shared/GLM47FLASH.md, not from the plan), every tile waits only for tiles
// numbered before it, the per-SM lists partition the tiles in increasing order, the step completes for any tile
// durations, and a list that breaks the order is caught as a deadlock naming the counter.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <random>
#include <thread>

#include "backend/step_plan.h"
#include "core/error.h"

using namespace trellm;
using step::Task;

namespace {

struct Totals {
  int64_t weights = 0, bytes = 0, tiles = 0;
};
std::map<std::pair<Task, int>, Totals> per_task_layer(const step::StepPlan& p) {
  std::map<std::pair<Task, int>, Totals> t;
  for (const step::Tile& x : p.tiles) {
    Totals& v = t[{x.task, x.layer}];
    v.weights += x.weights, v.bytes += x.bytes, v.tiles++;
  }
  return t;
}

void check_order(const step::StepPlan& p) {
  const size_t n = p.tiles.size();
  std::vector<int> last_arrival(size_t(p.counters()), -1), arrivals(size_t(p.counters()), 0);
  for (size_t i = 0; i < n; i++) {
    last_arrival[size_t(p.tiles[i].counter)] = int(i);
    arrivals[size_t(p.tiles[i].counter)]++;
  }
  for (int c = 0; c < p.counters(); c++) ASSERT_EQ(arrivals[size_t(c)], p.counter_info[size_t(c)].arrivals) << "counter " << c;
  for (size_t i = 0; i < n; i++) {
    for (int d : p.tiles[i].deps) ASSERT_LT(last_arrival[size_t(d)], int(i)) << "tile " << i << " waits for a later tile";
  }
  std::vector<int> seen(n, 0);
  for (const auto& list : p.per_sm) {
    for (size_t k = 0; k < list.size(); k++) {
      seen[size_t(list[k])]++;
      if (k) {
        ASSERT_LT(list[k - 1], list[k]) << "an SM's list is out of order";
      }
    }
  }
  for (size_t i = 0; i < n; i++) ASSERT_EQ(seen[i], 1) << "tile " << i;
}

}  // namespace

TEST(StepPlan, TilesCoverEveryMatrixOfGlm47Flash) {
  for (int rows : {1, 2, 4, 8}) {
    step::StepShape s = step::StepShape::glm47_flash();
    s.rows = rows;
    s.context = 1000 + rows;  // not a multiple of the split size
    const step::StepPlan p = step::build_step_plan(s);
    check_order(p);
    const auto t = per_task_layer(p);
    const int64_t jobs = rows * 5;  // top-4 routed + 1 shared expert per row
    for (int l = 0; l < 47; l++) {
      // q_a 768 + kv_a 576 columns, each padded to a multiple of 128: 768 + 640
      EXPECT_EQ(t.at({Task::AttnIn, l}).weights, int64_t(768 + 640) * 2048) << l;
      EXPECT_EQ(t.at({Task::QB, l}).weights, int64_t(20 * 256) * 768) << l;
      EXPECT_EQ(t.at({Task::QAbsorb, l}).weights, int64_t(20) * 192 * 512) << l;  // W_uk per head
      EXPECT_EQ(t.at({Task::MlaCombine, l}).weights, int64_t(20) * 512 * 256) << l;  // W_uv per head
      EXPECT_EQ(t.at({Task::MlaSplit, l}).bytes, int64_t(rows) * s.context * 576 * 2) << l;  // bf16 latents + rope keys
      EXPECT_EQ(t.at({Task::OProj, l}).weights, int64_t(2048) * 5120) << l;
      if (l == 0) {
        EXPECT_EQ(t.at({Task::DenseGateUp, l}).weights, int64_t(2) * 10240 * 2048);
        EXPECT_EQ(t.at({Task::DenseDown, l}).weights, int64_t(2048) * 10240);
        EXPECT_EQ(t.count({Task::GateUp, l}), 0u);
      } else {
        EXPECT_EQ(t.at({Task::GateUp, l}).weights, jobs * 2 * 1536 * 2048) << l;
        EXPECT_EQ(t.at({Task::Down, l}).weights, jobs * 2048 * 1536) << l;
        EXPECT_EQ(t.count({Task::DenseGateUp, l}), 0u);
      }
    }
    EXPECT_EQ(t.at({Task::Head, 47}).weights, int64_t(154880) * 2048);
    EXPECT_EQ(t.at({Task::Sample, 47}).tiles, 1);
  }
}

TEST(StepPlan, FinerDependenciesThanKernelBoundaries) {
  const step::StepPlan p = step::build_step_plan(step::StepShape::glm47_flash());
  for (const step::Tile& x : p.tiles) {
    if (x.layer != 3) continue;
    const auto& c = p.counter_info;
    if (x.task == Task::QAbsorb) {  // a head's two q_b column groups, not all 40
      ASSERT_EQ(x.deps.size(), 2u);
      EXPECT_EQ(c[size_t(x.deps[0])].task, Task::QB);
      EXPECT_EQ(c[size_t(x.deps[0])].group, 2 * x.group);
    }
    if (x.task == Task::Down) {  // the router (which expert), then only the gate/up groups its k range covers
      EXPECT_LE(x.deps.size(), 1u + 12u);
      EXPECT_EQ(c[size_t(x.deps[0])].task, Task::Router);
      for (size_t k = 1; k < x.deps.size(); k++) EXPECT_EQ(c[size_t(x.deps[k])].task, Task::GateUp);
    }
    if (x.task == Task::OProj) {  // the heads its k range covers
      EXPECT_LT(x.deps.size(), 20u);
      for (int d : x.deps) EXPECT_EQ(c[size_t(d)].task, Task::MlaCombine);
    }
  }
}

TEST(StepPlan, CompletesWhateverTheDurations) {
  for (int rows : {1, 3, 8})
    for (int context : {1, 777, 32768}) {
      step::StepShape s = step::StepShape::glm47_flash();
      s.rows = rows, s.context = context, s.layers = 5;
      step::CostModel m;
      m.sms = rows == 3 ? 7 : 132;  // a GPU with fewer SMs than a task has tiles, too
      const step::StepPlan p = step::build_step_plan(s, m);
      check_order(p);
      // The simulator replays the scheduler's own lists and durations: the same times.
      std::vector<step::TileTime> cost(p.tiles.size());
      for (size_t i = 0; i < cost.size(); i++) cost[i] = step::tile_time(p, m, int(i));
      std::string why;
      EXPECT_NEAR(step::simulate(p, cost, &why), p.step_us, 1e-6 * p.step_us) << why;
      EXPECT_LE(p.critical_path_us, p.step_us + 1e-9);
      double work = 0;
      for (const auto& c : cost) work += c.ahead + c.after;
      EXPECT_GE(p.step_us, work / m.sms - 1e-9);
      // Any durations (zeros, stragglers): it completes.
      std::mt19937 rng(uint32_t(rows * 100003 + context));
      auto draw = [&] { return rng() % 4 == 0 ? 0.0 : std::exponential_distribution<double>(1.0)(rng) * (rng() % 50 == 0 ? 100 : 1); };
      for (int trial = 0; trial < 5; trial++) {
        std::vector<step::TileTime> d(p.tiles.size());
        for (auto& v : d) v = {draw(), draw()};
        EXPECT_GT(step::simulate(p, d, &why), 0.0) << why;
      }
    }
}

TEST(StepPlan, AListOutOfOrderIsADeadlockNamingTheCounter) {
  step::StepShape s = step::StepShape::glm47_flash();
  s.layers = 2;
  step::StepPlan p = step::build_step_plan(s);
  // The sampling tile moved to the front of an SM that also runs a head tile: it waits for the head forever.
  const int sample = int(p.tiles.size()) - 1;
  for (auto& list : p.per_sm) list.erase(std::remove(list.begin(), list.end(), sample), list.end());
  int sm = -1;
  for (size_t k = 0; k < p.per_sm.size() && sm < 0; k++)
    for (int i : p.per_sm[k])
      if (p.tiles[size_t(i)].task == Task::Head) sm = int(k);
  ASSERT_GE(sm, 0);
  p.per_sm[size_t(sm)].insert(p.per_sm[size_t(sm)].begin(), sample);
  std::vector<step::TileTime> d(p.tiles.size(), step::TileTime{0.5, 0.5});
  std::string why;
  EXPECT_LT(step::simulate(p, d, &why), 0.0);
  EXPECT_NE(why.find("(sample layer 2"), std::string::npos) << why;
  EXPECT_NE(why.find("for head layer 2"), std::string::npos) << why;
}

TEST(StepPlan, ABufferIsRewrittenOnlyAfterTheLastLayersReadsOfIt) {
  for (int rows : {1, 8}) {
    step::StepShape s = step::StepShape::glm47_flash();
    s.rows = rows, s.layers = 6, s.context = 4096;
    step::StepPlan p = step::build_step_plan(s);
    EXPECT_EQ(step::check_buffer_reuse(p), "");
    // An attn_in tile of layer 3 that no longer waits for the residual could overwrite layer 2's q_a while q_b reads it.
    for (step::Tile& t : p.tiles)
      if (t.task == Task::AttnIn && t.layer == 3) {
        t.deps.clear();
        break;
      }
    const std::string why = step::check_buffer_reuse(p);
    EXPECT_NE(why.find("(attn_in layer 3) may overwrite attn_in's output of layer 2"), std::string::npos) << why;
  }
}

// The counter protocol on host threads, one per SM, as the kernel will run it: several steps back to back, nothing
// reset in between (the targets carry the step), the 32-bit counters started near their wrap. Each tile checks
// that what its producers wrote this step is visible once the counters it waits for say so.
TEST(StepPlan, CountersCarryTheStepAcrossRepeatsOnThreads) {
  step::StepShape s = step::StepShape::glm47_flash();
  s.layers = 3, s.rows = 2, s.context = 300, s.vocab = 4096;
  step::CostModel m;
  m.sms = 6;
  const step::StepPlan p = step::build_step_plan(s, m);
  const step::StepLists f = step::flatten(p);
  ASSERT_EQ(f.sm_begin.size(), 7u);
  ASSERT_EQ(size_t(f.sm_begin.back()), p.tiles.size());
  ASSERT_EQ(f.tile_desc.size(), 4 * p.tiles.size());
  for (size_t i = 0; i < p.tiles.size(); i++) {
    const step::Tile& t = p.tiles[i];
    ASSERT_EQ(f.tile_desc[4 * i], int32_t(t.task));
    ASSERT_EQ(f.tile_desc[4 * i + 1], t.layer);
    ASSERT_EQ(f.tile_desc[4 * i + 2], t.group);
    ASSERT_EQ(f.tile_desc[4 * i + 3], t.split);
    ASSERT_EQ(f.dep_begin[i + 1] - f.dep_begin[i], int32_t(t.deps.size()));
  }
  // Step 2^31 - 1 first: counters of even arrivals wrap past 2^32 within the run, those of 1 cross 2^31.
  const uint32_t first = 0x7FFFFFFFu, steps = 5;
  std::vector<std::atomic<uint32_t>> counters(f.arrivals.size());
  for (size_t c = 0; c < counters.size(); c++) counters[c].store(first * uint32_t(f.arrivals[c]));  // before step `first`
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::atomic<bool> stuck{false};
  std::vector<std::vector<int>> producers(f.arrivals.size());
  for (size_t i = 0; i < p.tiles.size(); i++) producers[size_t(f.tile_counter[i])].push_back(int(i));
  std::vector<std::vector<uint32_t>> out(steps, std::vector<uint32_t>(p.tiles.size(), 0));  // plain memory
  std::atomic<int> stale{0};
  auto run_sm = [&](int k) {
    for (uint32_t n = 0; n < steps; n++)
      for (int q = f.sm_begin[size_t(k)]; q < f.sm_begin[size_t(k) + 1]; q++) {
        const int i = f.sm_tiles[size_t(q)];
        for (int e = f.dep_begin[size_t(i)]; e < f.dep_begin[size_t(i) + 1]; e++) {
          const size_t c = size_t(f.deps[size_t(e)]);
          const uint32_t target = step::counter_target(first + n, uint32_t(f.arrivals[c]));
          while (!step::counter_reached(counters[c].load(std::memory_order_acquire), target)) {
            std::this_thread::yield();
            if (stuck || std::chrono::steady_clock::now() > deadline) return void(stuck = true);  // fail, not hang
          }
          for (int pr : producers[c])
            if (out[n][size_t(pr)] != uint32_t(pr) + 1) stale++;
        }
        out[n][size_t(i)] = uint32_t(i) + 1;
        counters[size_t(f.tile_counter[size_t(i)])].fetch_add(1, std::memory_order_release);
      }
  };
  std::vector<std::thread> sms;
  for (int k = 0; k < m.sms; k++) sms.emplace_back(run_sm, k);
  for (auto& t : sms) t.join();
  ASSERT_FALSE(stuck.load()) << "a counter never reached its target";
  EXPECT_EQ(stale.load(), 0);
  for (size_t c = 0; c < counters.size(); c++)
    ASSERT_EQ(counters[c].load(), step::counter_target(first + steps - 1, uint32_t(f.arrivals[c]))) << "counter " << c;
}

// With every tile free, the multi-kernel comparison costs exactly its boundaries: 10 tasks a layer (7 of
// attention, the router, gate/up and down or the dense pair) plus embed, head and sample, 473 kernels.
TEST(StepPlan, KernelBoundariesCostTheirGaps) {
  step::CostModel m;
  m.ps_per_weight = 0, m.bytes_per_ns = 1e300, m.dependent_us = 0, m.tile_us = 0;
  m.kernel_boundaries = true, m.boundary_us = 2.5;
  const step::StepPlan p = step::build_step_plan(step::StepShape::glm47_flash(), m);
  EXPECT_NEAR(p.step_us, 472 * 2.5, 1e-6);
  EXPECT_NEAR(p.critical_path_us, 472 * 2.5, 1e-6);
  m.kernel_boundaries = false;
  EXPECT_NEAR(step::build_step_plan(step::StepShape::glm47_flash(), m).step_us, 0.0, 1e-6);
}

TEST(StepPlan, BadShapesAreErrors) {
  step::StepShape s = step::StepShape::glm47_flash();
  s.rows = 9;
  try {
    step::build_step_plan(s);
    FAIL() << "rows 9 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rows 9: the persistent decode kernel takes 1..8"), std::string::npos) << e.what();
  }
  s.rows = 1, s.dense_layers = 48;
  EXPECT_THROW(step::build_step_plan(s), Error);
}

// The full-size schedule lies between its two lower bounds (the longest dependency chain, the work spread over
// every SM); its figures, printed for docs/megakernel.md, are the cost model's, not a measurement.
TEST(StepPlan, FullSizeScheduleBetweenItsLowerBounds) {
  {  // today's path as the model sees it: a kernel per task, 3.8 µs per boundary, 2 µs dependent latency, one wave
    step::CostModel m;
    m.kernel_boundaries = true, m.decode_ahead = false, m.boundary_us = 3.8, m.dependent_us = 2.0, m.waves = 1.0;
    const step::StepPlan p = step::build_step_plan(step::StepShape::glm47_flash(), m);
    EXPECT_LE(p.critical_path_us, p.step_us + 1e-9);
    std::printf("kernels, context 1024, rows 1: modelled step %.0f us (%.0f tok/s)\n", p.step_us, 1e6 / p.step_us);
  }
  for (bool ahead : {false, true})
    for (int context : {1024, 32768})
      for (int rows : {1, 2, 4, 8}) {
        step::StepShape s = step::StepShape::glm47_flash();
        s.rows = rows, s.context = context;
        step::CostModel m;
        m.decode_ahead = ahead;
        const step::StepPlan p = step::build_step_plan(s, m);
        double work = 0;
        for (size_t i = 0; i < p.tiles.size(); i++) work += step::tile_time(p, m, int(i)).ahead + step::tile_time(p, m, int(i)).after;
        EXPECT_LE(p.critical_path_us, p.step_us + 1e-9);
        EXPECT_GE(p.step_us, work / m.sms - 1e-9);
        std::printf("decode ahead %d, context %5d, rows %d: %6zu tiles, %5d counters; modelled step %5.0f us (%4.0f tok/s a "
                    "row), critical path %5.0f us, work / 132 SMs %5.0f us\n", int(ahead), context, rows, p.tiles.size(),
                    p.counters(), p.step_us, 1e6 / p.step_us, p.critical_path_us, work / m.sms);
        double sum = 0;
        std::string parts;
        for (size_t k = 0; k < p.critical_path_by_task.size(); k++) {
          sum += p.critical_path_by_task[k];
          if (p.critical_path_by_task[k] > 0)
            parts += str_cat(" ", step::task_name(Task(k)), " ", int(p.critical_path_by_task[k] + 0.5));
        }
        EXPECT_NEAR(sum, p.critical_path_us, 1e-6 * p.critical_path_us);  // the walk covers the whole path
        if (rows == 1) std::printf("  critical path by task (us):%s\n", parts.c_str());
      }
  // Calibrated by the task runner's empty-tile floor (H100, bench/results/step_runner.md): 1.09 us of dependent
  // latency and ~0.25 us of per-tile overhead reproduce the four measured floors within 3 %.
  for (int context : {1024, 32768})
    for (int rows : {1, 8}) {
      step::StepShape s = step::StepShape::glm47_flash();
      s.rows = rows, s.context = context;
      step::CostModel m;
      m.dependent_us = 1.09, m.tile_us = 0.25;
      const step::StepPlan p = step::build_step_plan(s, m);
      const double floor = step::schedule_floor(p, m);
      EXPECT_GT(floor, 0.0);
      EXPECT_LE(floor, p.step_us + 1e-9);
      std::printf("calibrated (1.09 / 0.25 us), context %5d, rows %d: empty-tile floor %5.0f us; modelled step %5.0f us (%4.0f tok/s a row)\n",
                  context, rows, floor, p.step_us, 1e6 / p.step_us);
    }
}
