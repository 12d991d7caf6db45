// The persistent decode kernel's task runner on the GPU (backend/cuda/step_runner.h), tiles without math: the
// full-size GLM-4.7-Flash plan for 1 and 8 rows and a small plan of many tiles per worker run several steps back to
// back with nothing reset in between, from step 0 and across the counters' 32-bit wrap. Every tile checks that
// each tile it depends on wrote this step's stamp (so a missing dependency, a stale read or a lost arrival fails),
// and afterwards every counter holds exactly (steps run) x its arrivals. A list out of order is reported as a
// timeout naming the worker, the tile and the counter, and the launch still ends. Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>

#include <cstring>
#include <memory>

#include "backend/backend.h"
#include "backend/cuda/step_runner.h"
#include "backend/cuda/trellis_test_util.h"
#include "backend/step_plan.h"

using namespace trellm;

namespace {

int device_sms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

void run_steps(const step::StepPlan& p, uint32_t first, uint32_t steps) {
  cuda::StepRunner r(p, cuda::StepRunner::Mode::Check);
  r.start_at(first);
  for (uint32_t n = 0; n < steps; n++) r.launch(first + n, nullptr, n == steps - 1);
  const cuda::RunnerStatus st = r.status();
  EXPECT_EQ(st.describe(p), "");
  const std::vector<uint32_t> c = r.counters();
  for (size_t i = 0; i < c.size(); i++)
    ASSERT_EQ(c[i], (first + steps) * uint32_t(p.counter_info[i].arrivals)) << "counter " << i;
  // The clocked step: every tile ran, became ready no earlier than its worker reached it, arrived after.
  const auto clk = r.tile_clocks();
  for (size_t i = 0; i < clk.size(); i++) {
    ASSERT_GT(clk[i].t_free, 0u) << "tile " << i << " has no clock";
    ASSERT_LE(clk[i].t_free, clk[i].t_ready) << "tile " << i;
    ASSERT_LE(clk[i].t_ready, clk[i].t_done) << "tile " << i;
  }
  // And no tile became ready before its producers were done (their clock is read before their release, the
  // consumer's after its acquire, on the chip's one global timer).
  std::vector<uint64_t> done(p.counter_info.size(), 0);
  for (size_t q = 0; q < p.tiles.size(); q++) done[size_t(p.tiles[q].counter)] = std::max(done[size_t(p.tiles[q].counter)], clk[q].t_done);
  for (size_t i = 0; i < p.tiles.size(); i++)
    for (int d : p.tiles[i].deps) ASSERT_GE(clk[i].t_ready, done[size_t(d)]) << "tile " << i << " ready before counter " << d;
}

}  // namespace

TEST(CudaStepRunner, FullSizePlansRunStepsBackToBack) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (int rows : {1, 8}) {
    SCOPED_TRACE(rows);
    step::StepShape s = step::StepShape::glm47_flash();
    s.rows = rows, s.context = rows == 1 ? 1024 : 32768;
    step::CostModel m;
    m.sms = device_sms();
    run_steps(step::build_step_plan(s, m), 0, 4);
  }
}

TEST(CudaStepRunner, AcrossTheCounterWrap) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  step::StepShape s = step::StepShape::glm47_flash();
  s.layers = 4, s.rows = 2, s.context = 3000;
  step::CostModel m;
  m.sms = device_sms();
  // Step 2^31 - 2 first: counters of even arrivals pass 2^32 within the run, those of 1 cross 2^31.
  run_steps(step::build_step_plan(s, m), 0x7FFFFFFEu, 4);
}

TEST(CudaStepRunner, ManyTilesPerWorker) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  step::StepShape s = step::StepShape::glm47_flash();
  s.layers = 3, s.rows = 3, s.context = 700, s.vocab = 5000;
  step::CostModel m;
  m.sms = 5;
  run_steps(step::build_step_plan(s, m), 0, 6);
}

TEST(CudaStepRunner, AListOutOfOrderTimesOutNamingTheCounter) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  step::StepShape s = step::StepShape::glm47_flash();
  s.layers = 2;
  step::CostModel m;
  m.sms = device_sms();
  step::StepPlan p = step::build_step_plan(s, m);
  // The sampling tile moved in front of a worker's first head tile: that worker waits for its own head tile. (In
  // front of its whole list, the worker would also hold back layer 0, and another worker could give up first.)
  const int sample = int(p.tiles.size()) - 1;
  for (auto& list : p.per_sm) list.erase(std::remove(list.begin(), list.end(), sample), list.end());
  int w = -1;
  for (size_t k = 0; k < p.per_sm.size() && w < 0; k++)
    for (int i : p.per_sm[k])
      if (p.tiles[size_t(i)].task == step::Task::Head) w = int(k);
  ASSERT_GE(w, 0);
  auto& list = p.per_sm[size_t(w)];
  list.insert(std::find_if(list.begin(), list.end(), [&](int i) { return p.tiles[size_t(i)].task == step::Task::Head; }), sample);
  cuda::StepRunner r(p, cuda::StepRunner::Mode::Check, /*timeout_ms=*/50.0);
  r.launch(0, nullptr);
  const cuda::RunnerStatus st = r.status();
  EXPECT_EQ(st.timeout_worker, w);
  EXPECT_EQ(st.timeout_tile, sample);
  const std::string why = st.describe(p);
  EXPECT_NE(why.find("(sample layer 2"), std::string::npos) << why;
  EXPECT_NE(why.find("waiting for head layer 2"), std::string::npos) << why;
}

// The first task body: every tile a GEMV tile of one trellis linear, run by the persistent runner, against the
// multi-kernel GEMV (trellis_matmul) with the same split-k tail (the ticket tail: TRELLM_GEMV_CLUSTER=0; the
// cluster tail sums a row's splits in another order at m < 5) on the same inputs. Same arithmetic in the same
// order, so the same bits; y poisoned first. Three steps back to back (the split-k tickets must be
// left at zero), m = 1, 3 and 8, GLM's q_a || kv_a shape and an odd one (padded on both sides).
TEST(CudaStepRunner, GemvTilesMatchTheMultiKernelGemvBitForBit) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int in, out;
  };
  for (const Shape sh : {Shape{2048, 1344}, Shape{1000, 300}})
    for (int m : {1, 3, 8}) {
      SCOPED_TRACE(::testing::Message() << sh.in << "x" << sh.out << " m " << m);
      Rng rng(uint64_t(sh.in) * 31 + uint64_t(m));
      trellm::testing::RandomTrellis w(rng, sh.in, sh.out, 3, 1, true);
      std::vector<float> x(size_t(m) * sh.in);
      for (float& v : x) v = rng.normal();
      float* dx = trellm::testing::dev_upload(x);
      const size_t ys = size_t(m) * sh.out;
      float *yref = nullptr, *yrun = nullptr;
      ASSERT_EQ(cudaMalloc(&yref, ys * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&yrun, ys * 4), cudaSuccess);
      const size_t wsb = cuda::trellis_workspace_bytes(8, w.dev.in_padded, w.dev.out_padded);
      void* ws = nullptr;
      ASSERT_EQ(cudaMalloc(&ws, wsb), cudaSuccess);
      cuda::trellis_workspace_init(ws, wsb, nullptr);
      setenv("TRELLM_GEMV_CLUSTER", "0", 1);
      cuda::trellis_matmul(w.dev, dx, yref, m, ws, nullptr);
      unsetenv("TRELLM_GEMV_CLUSTER");
      const step::StepPlan p = cuda::StepRunner::gemv_plan(m, {{w.dev.in_padded, w.dev.out_padded}}, false, device_sms());
      cuda::StepRunner r(p, cuda::StepRunner::Mode::Empty);
      const std::vector<float> want = trellm::testing::dev_download(yref, ys);
      for (uint32_t step = 0; step < 3; step++) {
        ASSERT_EQ(cudaMemset(yrun, 0xff, ys * 4), cudaSuccess);  // NaN
        r.launch_gemvs(step, {{&w.dev, dx, yrun, ws}}, m, nullptr);
        EXPECT_EQ(r.status().describe(p), "");
        const std::vector<float> got = trellm::testing::dev_download(yrun, ys);
        size_t diff = 0;
        for (size_t i = 0; i < ys; i++) diff += std::memcmp(&got[i], &want[i], 4) != 0;
        EXPECT_EQ(diff, 0u) << "of " << ys << " outputs, step " << step << "; first: " << got[0] << " vs " << want[0];
      }
      const std::vector<uint32_t> c = r.counters();
      for (size_t g = 0; g < c.size(); g++) ASSERT_EQ(c[g], 3u * uint32_t(p.counter_info[g].arrivals)) << "group " << g;
      cudaFree(dx), cudaFree(yref), cudaFree(yrun), cudaFree(ws);
    }
}

// The GEMV task's plan (host only, no GPU needed): every (column group, k-split) of the matmul's own plan once,
// a counter per group expecting all its splits, each worker's list increasing.
TEST(CudaStepRunner, GemvPlanHoldsEveryTileOnce) {
  for (int m : {1, 8})
    for (auto [inp, outp] : {std::pair{2048, 1408}, std::pair{768, 5120}, std::pair{5120, 2048}}) {
      const step::StepPlan p = cuda::StepRunner::gemv_plan(m, {{inp, outp}}, false, 7);
      const int groups = outp / 128;
      ASSERT_EQ(p.counters(), groups);
      const int splits = p.counter_info[0].arrivals;
      ASSERT_GE(splits, 1);
      ASSERT_EQ(int(p.tiles.size()), groups * splits);
      std::vector<int> seen(size_t(groups * splits), 0);
      for (const step::Tile& t : p.tiles) {
        ASSERT_EQ(t.counter, t.group);
        ASSERT_TRUE(t.deps.empty());
        ASSERT_LT(t.split, splits);
        seen[size_t(t.split * groups + t.group)]++;
      }
      for (int v : seen) ASSERT_EQ(v, 1);
      size_t listed = 0;
      for (const auto& list : p.per_sm) {
        listed += list.size();
        ASSERT_TRUE(std::is_sorted(list.begin(), list.end()));
      }
      ASSERT_EQ(listed, p.tiles.size());
    }
}

// A chain of three GEMVs in one persistent launch, each reading the one before, as the attention's q path and an
// o_proj: x -> q_a (2048 -> 768) -> q_b on the RMS-normalised q_a (768 -> 5120; its tiles wait for every q_a
// group) -> a third (5120 -> 2048; each k-split waits only for the q_b groups its k range covers). Against
// trellis_matmul, trellis_matmul_normed, trellis_matmul launched one after the other: the same bits, every
// stage's output poisoned first, three steps; m = 1, 3, 8; and an odd chain (padding on every side).
TEST(CudaStepRunner, AChainOfGemvsMatchesTheMultiKernelGemvsBitForBit) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (const std::vector<int>& dims : {std::vector<int>{2048, 768, 5120, 2048}, std::vector<int>{1000, 300, 777, 250}})
    for (int m : {1, 3, 8}) {
      SCOPED_TRACE(::testing::Message() << dims[0] << "->" << dims[1] << "->" << dims[2] << "->" << dims[3] << " m " << m);
      Rng rng(uint64_t(dims[1]) * 17 + uint64_t(m));
      std::vector<std::unique_ptr<trellm::testing::RandomTrellis>> w;  // it owns device memory: not moved
      for (int s = 0; s < 3; s++) w.push_back(std::make_unique<trellm::testing::RandomTrellis>(rng, dims[size_t(s)], dims[size_t(s) + 1], 3, 1, true));
      std::vector<float> x(size_t(m) * size_t(dims[0])), nw(static_cast<size_t>(dims[1]));
      for (float& v : x) v = rng.normal();
      for (float& v : nw) v = 0.5f + rng.uniform();
      float* dx = trellm::testing::dev_upload(x);
      float* dnw = trellm::testing::dev_upload(nw);
      float *yref[3], *yrun[3];
      void *wsref[3], *wsrun[3];
      for (int s = 0; s < 3; s++) {
        const size_t ys = size_t(m) * size_t(dims[size_t(s) + 1]);
        ASSERT_EQ(cudaMalloc(&yref[s], ys * 4), cudaSuccess);
        ASSERT_EQ(cudaMalloc(&yrun[s], ys * 4), cudaSuccess);
        const size_t wsb = cuda::trellis_workspace_bytes(8, w[size_t(s)]->dev.in_padded, w[size_t(s)]->dev.out_padded);
        ASSERT_EQ(cudaMalloc(&wsref[s], wsb), cudaSuccess);
        ASSERT_EQ(cudaMalloc(&wsrun[s], wsb), cudaSuccess);
        cuda::trellis_workspace_init(wsref[s], wsb, nullptr);
        cuda::trellis_workspace_init(wsrun[s], wsb, nullptr);
      }
      const float eps = 1e-5f;
      setenv("TRELLM_GEMV_CLUSTER", "0", 1);  // the runner's tail: the ticket tail (as above)
      cuda::trellis_matmul(w[0]->dev, dx, yref[0], m, wsref[0], nullptr);
      cuda::trellis_matmul_normed(w[1]->dev, yref[0], dnw, eps, yref[1], m, wsref[1], nullptr);
      cuda::trellis_matmul(w[2]->dev, yref[1], yref[2], m, wsref[2], nullptr);
      unsetenv("TRELLM_GEMV_CLUSTER");
      std::vector<cuda::StepRunner::GemvShape> shapes;
      for (int s = 0; s < 3; s++) shapes.push_back({w[size_t(s)]->dev.in_padded, w[size_t(s)]->dev.out_padded, s == 1});
      const std::vector<cuda::StepRunner::GemvStage> stages = {
          {&w[0]->dev, dx, yrun[0], wsrun[0]}, {&w[1]->dev, yrun[0], yrun[1], wsrun[1], dnw, eps}, {&w[2]->dev, yrun[1], yrun[2], wsrun[2]}};
      // One worker a SM; four a SM (tiles of consecutive stages in flight on one SM); with the first 4, 8 or 3 k
      // tiles of every tile decoded before its wait (half, all or an odd part of its first chunk).
      for (auto [per_sm, ahead] : {std::pair{1, 0}, std::pair{4, 0}, std::pair{4, 4}, std::pair{2, 8}, std::pair{3, 3}}) {
        SCOPED_TRACE(::testing::Message() << per_sm << " workers a SM, " << ahead << " k tiles decoded ahead");
        const step::StepPlan p = cuda::StepRunner::gemv_plan(m, shapes, true, per_sm * device_sms());
        cuda::StepRunner r(p, cuda::StepRunner::Mode::Empty);
        r.set_decode_ahead(ahead);
        for (uint32_t step = 0; step < 3; step++) {
          for (int s = 0; s < 3; s++) ASSERT_EQ(cudaMemset(yrun[s], 0xff, size_t(m) * size_t(dims[size_t(s) + 1]) * 4), cudaSuccess);
          r.launch_gemvs(step, stages, m, nullptr);
          EXPECT_EQ(r.status().describe(p), "");
          for (int s = 0; s < 3; s++) {
            const size_t ys = size_t(m) * size_t(dims[size_t(s) + 1]);
            const std::vector<float> got = trellm::testing::dev_download(yrun[s], ys), want = trellm::testing::dev_download(yref[s], ys);
            size_t diff = 0;
            for (size_t i = 0; i < ys; i++) diff += std::memcmp(&got[i], &want[i], 4) != 0;
            EXPECT_EQ(diff, 0u) << "stage " << s << ": of " << ys << " outputs, step " << step << "; first: " << got[0] << " vs " << want[0];
          }
        }
      }
      cudaFree(dx), cudaFree(dnw);
      for (int s = 0; s < 3; s++) cudaFree(yref[s]), cudaFree(yrun[s]), cudaFree(wsref[s]), cudaFree(wsrun[s]);
    }
}

// The chained plan (host only): a plain stage's k-split waits for exactly the previous stage's column groups
// that overlap its k range, a normed one for all of them, the first stage for none; the lists replay without a
// deadlock.
TEST(CudaStepRunner, ChainedGemvPlanWaitsForTheGroupsItReads) {
  for (int m : {1, 8}) {
    const std::vector<cuda::StepRunner::GemvShape> shapes = {{2048, 768, false}, {768, 5120, true}, {5120, 2048, false}};
    const step::StepPlan p = cuda::StepRunner::gemv_plan(m, shapes, true, 13);
    ASSERT_EQ(p.counters(), 6 + 40 + 16);
    for (const step::Tile& t : p.tiles) {
      if (t.layer == 0) {
        ASSERT_TRUE(t.deps.empty());
        continue;
      }
      const int prev0 = t.layer == 1 ? 0 : 6, prev_groups = t.layer == 1 ? 6 : 40;
      if (t.layer == 1) {
        ASSERT_EQ(int(t.deps.size()), prev_groups);
        continue;
      }
      const int splits = p.counter_info[size_t(t.counter)].arrivals, chunks = 5120 / 128;
      const int c0 = t.split * chunks / splits, c1 = (t.split + 1) * chunks / splits;
      std::vector<int> want;
      for (int c = c0; c < c1; c++) want.push_back(prev0 + c);  // chunk c = q_b column group c (both 128 wide)
      ASSERT_EQ(t.deps, want) << "split " << t.split;
    }
    EXPECT_GT(step::schedule_floor(p, step::CostModel{}), 0.0);
  }
}
