// bench_step_runner: the persistent decode kernel's schedule with empty tiles (backend/cuda/step_runner.h, Empty
// mode) on the full-size GLM-4.7-Flash plan: the step's floor before any task body moves in (counter latency and
// the runner's own overhead along the plan's critical path), for 1/2/4/8 rows at 1K and 32K of context.
// Per shape: the median step over 50 launches (event-timed, launched back to back), then one clocked launch:
//   wait     t_ready - (latest producer's t_done), over the tiles that had a producer: the dependent latency
//            (release -> acquire -> the worker goes), median and p90;
//   body     t_done - t_ready (the empty body and the runner's barriers);
//   model    the lists that ran, replayed by the plan's simulator with zero work, dependent_us = the measured
//            median wait and tile_us = the median body: what the cost model predicts for this floor, against the
//            measurement (and with the model's default 1.5 / 0.3 us).
// Then the first task body: one trellis GEMV (K = 3, m = 1) at GLM-4.7-Flash's shapes as runner tiles
// (StepRunner::launch_gemvs) against trellis_matmul, and against the same plan with empty tiles (the runner's own
// cost); 20 calls back to back, median of 5, per call. Both launch forms pay a launch per call here: the runner
// without PDL (cooperative), trellis_matmul with it.
// Then a chain of three dependent GEMVs in one runner launch (q_a 2048 -> 768, q_b 768 -> 5120 on the normed q_a,
// o_proj 5120 -> 2048; per-tile waits) against the three kernels launched back to back with PDL, and 16 such
// chains in one launch (48 GEMVs) with 1, 2 or 4 workers a SM and the weights asked into L2 ahead or not.
// Usage: bench_step_runner [--json FILE] [--commit HASH]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/step_runner.h"
#include "backend/cuda/trellis_test_util.h"
#include "backend/step_plan.h"

using namespace trellm;

namespace {

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(q * double(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  std::string json, commit = "unknown";
  for (int i = 1; i < argc; i++) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--commit") && i + 1 < argc) commit = argv[++i];
    else {
      std::fprintf(stderr, "usage: bench_step_runner [--json FILE] [--commit HASH]\n");
      return 2;
    }
  }
  int dev = 0, sms = 0;
  cudaDeviceProp prop{};
  TRELLM_CUDA_CHECK(cudaGetDevice(&dev));
  TRELLM_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  sms = prop.multiProcessorCount;
  char date[16];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  std::ofstream js;
  if (!json.empty()) js.open(json, std::ios::app);
  std::printf("bench_step_runner: %s, %d SMs, %s, commit %s\n\n", prop.name, sms, date, commit.c_str());
  std::printf("| rows | context | tiles | step us | wait med us | wait p90 us | body med us | model us (wait, body) | model us (1.5, 0.3) |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  cudaStream_t s;
  TRELLM_CUDA_CHECK(cudaStreamCreate(&s));
  cudaEvent_t e0, e1;
  TRELLM_CUDA_CHECK(cudaEventCreate(&e0));
  TRELLM_CUDA_CHECK(cudaEventCreate(&e1));
  // A call's time: 20 calls back to back, the median of 5 such runs.
  auto per_call = [&](auto&& call) {
    for (int i = 0; i < 20; i++) call();
    std::vector<double> us;
    for (int rep = 0; rep < 5; rep++) {
      TRELLM_CUDA_CHECK(cudaEventRecord(e0, s));
      for (int i = 0; i < 20; i++) call();
      TRELLM_CUDA_CHECK(cudaEventRecord(e1, s));
      TRELLM_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      TRELLM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      us.push_back(1e3 * ms / 20);
    }
    return pct(us, 0.5);
  };
  for (int ctx : {1024, 32768})
    for (int rows : {1, 2, 4, 8}) {
      step::StepShape shape = step::StepShape::glm47_flash();
      shape.rows = rows, shape.context = ctx;
      step::CostModel m;
      m.sms = sms;
      const step::StepPlan p = step::build_step_plan(shape, m);
      cuda::StepRunner r(p, cuda::StepRunner::Mode::Empty);
      uint32_t step = 0;
      for (int i = 0; i < 5; i++) r.launch(step++, s);
      std::vector<double> us;
      for (int rep = 0; rep < 5; rep++) {
        TRELLM_CUDA_CHECK(cudaEventRecord(e0, s));
        for (int i = 0; i < 10; i++) r.launch(step++, s);
        TRELLM_CUDA_CHECK(cudaEventRecord(e1, s));
        TRELLM_CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        TRELLM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        us.push_back(1e3 * ms / 10);
      }
      r.launch(step++, s, /*clocks=*/true);
      const cuda::RunnerStatus st = r.status();
      if (!st.describe(p).empty()) {
        std::fprintf(stderr, "rows %d context %d: %s\n", rows, ctx, st.describe(p).c_str());
        return 1;
      }
      const auto clk = r.tile_clocks();
      std::vector<uint64_t> done(p.counter_info.size(), 0);
      for (size_t q = 0; q < p.tiles.size(); q++) done[size_t(p.tiles[q].counter)] = std::max(done[size_t(p.tiles[q].counter)], clk[q].t_done);
      std::vector<double> wait, body;
      for (size_t i = 0; i < p.tiles.size(); i++) {
        body.push_back(double(clk[i].t_done - clk[i].t_ready) * 1e-3);
        uint64_t last = 0;
        for (int d : p.tiles[i].deps) last = std::max(last, done[size_t(d)]);
        if (last > clk[i].t_free) wait.push_back(double(clk[i].t_ready - last) * 1e-3);  // it waited for a producer
      }
      const double step_us = pct(us, 0.5), wmed = pct(wait, 0.5), w90 = pct(wait, 0.9), bmed = pct(body, 0.5);
      // The lists that ran, replayed by the simulator with zero work and the given latencies.
      auto model_of = [&](double dep_us, double tile_us) {
        step::CostModel z = m;
        z.dependent_us = dep_us, z.tile_us = tile_us;
        return step::schedule_floor(p, z);
      };
      const double model = model_of(wmed, bmed), model_default = model_of(1.5, 0.3);
      std::printf("| %d | %d | %zu | %.1f | %.2f | %.2f | %.2f | %.1f | %.1f |\n", rows, ctx, p.tiles.size(), step_us, wmed, w90, bmed,
                  model, model_default);
      if (js.is_open()) {
        auto line = [&](const char* metric, double v) {
          js << "{\"date\":\"" << date << "\",\"gpu\":\"" << prop.name << "\",\"commit\":\"" << commit
             << "\",\"bench\":\"step_runner_empty\",\"metric\":\"" << metric << "\",\"shape\":\"rows=" << rows << " context=" << ctx
             << "\",\"value\":" << v << ",\"unit\":\"us\"}\n";
        };
        line("step_us", step_us), line("wait_median_us", wmed), line("wait_p90_us", w90), line("body_median_us", bmed);
        line("model_step_us", model);
      }
    }
  std::printf("\n| GEMV (m = 1, 3 bits) | groups x splits | trellis_matmul us | runner us | runner, empty tiles us |\n");
  std::printf("|---|---:|---:|---:|---:|\n");
  struct Shape {
    const char* name;
    int in, out;
  };
  Rng rng(7);
  for (const Shape sh : {Shape{"q_a || kv_a 2048 -> 1344", 2048, 1344}, Shape{"q_b 768 -> 5120", 768, 5120},
                         Shape{"o_proj 5120 -> 2048", 5120, 2048}, Shape{"expert gate 2048 -> 1536", 2048, 1536}}) {
    testing::RandomTrellis w(rng, sh.in, sh.out, 3, 1, false);
    std::vector<float> x(size_t(sh.in));
    for (float& v : x) v = rng.normal();
    float* dx = testing::dev_upload(x);
    float* dy = nullptr;
    TRELLM_CUDA_CHECK(cudaMalloc(&dy, size_t(sh.out) * 4));
    const size_t wsb = cuda::trellis_workspace_bytes(8, w.dev.in_padded, w.dev.out_padded);
    void* ws = nullptr;
    TRELLM_CUDA_CHECK(cudaMalloc(&ws, wsb));
    cuda::trellis_workspace_init(ws, wsb, s);
    const step::StepPlan p = cuda::StepRunner::gemv_plan(1, {{w.dev.in_padded, w.dev.out_padded}}, false, sms);
    cuda::StepRunner run(p, cuda::StepRunner::Mode::Empty), empty(p, cuda::StepRunner::Mode::Empty);
    uint32_t n_run = 0, n_empty = 0;
    const double mk = per_call([&] { cuda::trellis_matmul(w.dev, dx, dy, 1, ws, s); });
    const double rn = per_call([&] { run.launch_gemvs(n_run++, {{&w.dev, dx, dy, ws}}, 1, s); });
    const double em = per_call([&] { empty.launch(n_empty++, s); });
    if (!run.status().describe(p).empty() || !empty.status().describe(p).empty()) {
      std::fprintf(stderr, "%s: %s\n", sh.name, run.status().describe(p).c_str());
      return 1;
    }
    std::printf("| %s | %d | %.2f | %.2f | %.2f |\n", sh.name, int(p.tiles.size()), mk, rn, em);
    if (js.is_open())
      for (auto [metric, v] : {std::pair<const char*, double>{"trellis_matmul_us", mk}, {"runner_gemv_us", rn}, {"runner_empty_us", em}})
        js << "{\"date\":\"" << date << "\",\"gpu\":\"" << prop.name << "\",\"commit\":\"" << commit
           << "\",\"bench\":\"step_runner_gemv\",\"metric\":\"" << metric << "\",\"shape\":\"" << sh.name
           << " m=1 K=3\",\"value\":" << v << ",\"unit\":\"us\"}\n";
    cudaFree(dx), cudaFree(dy), cudaFree(ws);
  }
  {
    const int dims[4] = {2048, 768, 5120, 2048};
    std::vector<std::unique_ptr<testing::RandomTrellis>> w;
    for (int i = 0; i < 3; i++) w.push_back(std::make_unique<testing::RandomTrellis>(rng, dims[i], dims[i + 1], 3, 1, false));
    std::vector<float> x(static_cast<size_t>(dims[0])), nw(static_cast<size_t>(dims[1]), 1.0f);
    for (float& v : x) v = rng.normal();
    float* dx = testing::dev_upload(x);
    float* dnw = testing::dev_upload(nw);
    float* y[3];
    void* ws[3];
    std::vector<cuda::StepRunner::GemvShape> shapes;
    for (int i = 0; i < 3; i++) {
      TRELLM_CUDA_CHECK(cudaMalloc(&y[i], size_t(dims[i + 1]) * 4));
      const size_t wsb = cuda::trellis_workspace_bytes(8, w[size_t(i)]->dev.in_padded, w[size_t(i)]->dev.out_padded);
      TRELLM_CUDA_CHECK(cudaMalloc(&ws[i], wsb));
      cuda::trellis_workspace_init(ws[i], wsb, s);
      shapes.push_back({w[size_t(i)]->dev.in_padded, w[size_t(i)]->dev.out_padded, i == 1});
    }
    const step::StepPlan p = cuda::StepRunner::gemv_plan(1, shapes, true, sms);
    cuda::StepRunner run(p, cuda::StepRunner::Mode::Empty), empty(p, cuda::StepRunner::Mode::Empty);
    const std::vector<cuda::StepRunner::GemvStage> stages = {
        {&w[0]->dev, dx, y[0], ws[0]}, {&w[1]->dev, y[0], y[1], ws[1], dnw, 1e-5f}, {&w[2]->dev, y[1], y[2], ws[2]}};
    uint32_t n_run = 0, n_empty = 0;
    const double mk = per_call([&] {
      cuda::trellis_matmul(w[0]->dev, dx, y[0], 1, ws[0], s);
      cuda::trellis_matmul_normed(w[1]->dev, y[0], dnw, 1e-5f, y[1], 1, ws[1], s);
      cuda::trellis_matmul(w[2]->dev, y[1], y[2], 1, ws[2], s);
    });
    const double rn = per_call([&] { run.launch_gemvs(n_run++, stages, 1, s); });
    const double em = per_call([&] { empty.launch(n_empty++, s); });
    if (!run.status().describe(p).empty() || !empty.status().describe(p).empty()) {
      std::fprintf(stderr, "chain: %s\n", run.status().describe(p).c_str());
      return 1;
    }
    std::printf("\n| chain (m = 1, 3 bits) | tiles | 3 kernels (PDL) us | runner us | runner, empty tiles us |\n|---|---:|---:|---:|---:|\n");
    std::printf("| q_a -> q_b (normed) -> o_proj | %d | %.2f | %.2f | %.2f |\n", int(p.tiles.size()), mk, rn, em);
    if (js.is_open())
      for (auto [metric, v] : {std::pair<const char*, double>{"three_kernels_us", mk}, {"runner_chain_us", rn}, {"runner_empty_us", em}})
        js << "{\"date\":\"" << date << "\",\"gpu\":\"" << prop.name << "\",\"commit\":\"" << commit
           << "\",\"bench\":\"step_runner_chain\",\"metric\":\"" << metric
           << "\",\"shape\":\"q_a 2048->768, q_b 768->5120 normed, o_proj 5120->2048; m=1 K=3\",\"value\":" << v << ",\"unit\":\"us\"}\n";
    cudaFree(dx), cudaFree(dnw);
    for (int i = 0; i < 3; i++) cudaFree(y[i]), cudaFree(ws[i]);
  }
  {
    // 16 such chains back to back (o_proj's 2048 outputs are the next q_a's input), distinct weights (96 MB,
    // about twice the L2): one runner launch of 48 dependent GEMVs against 48 kernels with PDL, so that the
    // launch is paid once and what remains is the tiles' own chain. Workers 1 to 4 a SM, with 0 to 8 k tiles of
    // each tile decoded before its wait (the kernels: TRELLM_GEMV_AHEAD, read once a process).
    constexpr int kLayers = 16;
    const int dims[3] = {768, 5120, 2048};  // outputs of q_a, q_b, o_proj; inputs 2048, 768, 5120
    std::vector<std::unique_ptr<testing::RandomTrellis>> w;
    std::vector<float*> y;
    std::vector<void*> ws;
    std::vector<cuda::StepRunner::GemvShape> shapes;
    std::vector<float> x(2048), nw(768, 1.0f);
    for (float& v : x) v = rng.normal();
    float* dx = testing::dev_upload(x);
    float* dnw = testing::dev_upload(nw);
    std::vector<cuda::StepRunner::GemvStage> stages;
    for (int l = 0; l < kLayers; l++)
      for (int i = 0; i < 3; i++) {
        const int in = i == 0 ? 2048 : dims[i - 1];
        w.push_back(std::make_unique<testing::RandomTrellis>(rng, in, dims[i], 3, 1, false));
        const cuda::DeviceTrellis& d = w.back()->dev;
        float* out = nullptr;
        TRELLM_CUDA_CHECK(cudaMalloc(&out, size_t(dims[i]) * 4));
        const size_t wsb = cuda::trellis_workspace_bytes(8, d.in_padded, d.out_padded);
        void* wk = nullptr;
        TRELLM_CUDA_CHECK(cudaMalloc(&wk, wsb));
        cuda::trellis_workspace_init(wk, wsb, s);
        stages.push_back({&d, y.empty() ? dx : y.back(), out, wk, i == 1 ? dnw : nullptr, 1e-5f});
        y.push_back(out), ws.push_back(wk);
        shapes.push_back({d.in_padded, d.out_padded, i == 1});
      }
    const double mk = per_call([&] {
      for (const auto& g : stages)
        if (g.norm_w) cuda::trellis_matmul_normed(*g.w, g.x, g.norm_w, g.eps, g.y, 1, g.workspace, s);
        else cuda::trellis_matmul(*g.w, g.x, g.y, 1, g.workspace, s);
    });
    const char* env_ahead = std::getenv("TRELLM_GEMV_AHEAD");
    const std::string kernel_ahead = env_ahead && *env_ahead ? env_ahead : "default";  // trellis_linear.cu decides
    std::printf("\n| %d layers of q_a -> q_b -> o_proj (m = 1, 3 bits) | workers a SM | k tiles decoded ahead | us | us a layer | / kernels |\n",
                kLayers);
    std::printf("|---|---:|---:|---:|---:|---:|\n| 48 kernels (PDL) | | %s | %.1f | %.2f | 1.00 |\n", kernel_ahead.c_str(), mk, mk / kLayers);
    auto jline = [&](const std::string& shape, double v) {
      if (js.is_open())
        js << "{\"date\":\"" << date << "\",\"gpu\":\"" << prop.name << "\",\"commit\":\"" << commit
           << "\",\"bench\":\"step_runner_layers\",\"metric\":\"us\",\"shape\":\"" << shape << "\",\"value\":" << v
           << ",\"unit\":\"us\"}\n";
    };
    jline("16 layers q_a,q_b,o_proj m=1 K=3; 48 kernels PDL, decode ahead=" + kernel_ahead, mk);
    for (auto [per_sm, ahead] : {std::pair{1, 0}, std::pair{2, 0}, std::pair{4, 0}, std::pair{4, 4}, std::pair{3, 8}, std::pair{2, 8}}) {
      const step::StepPlan p = cuda::StepRunner::gemv_plan(1, shapes, true, per_sm * sms);
      cuda::StepRunner run(p, cuda::StepRunner::Mode::Empty);
      run.set_decode_ahead(ahead);
      uint32_t n = 0;
      const double rn = per_call([&] { run.launch_gemvs(n++, stages, 1, s); });
      const std::string err = run.status().describe(p);
      if (!err.empty()) {
        std::fprintf(stderr, "layers, %d a SM, %d decoded ahead: %s\n", per_sm, ahead, err.c_str());
        return 1;
      }
      std::printf("| runner, one launch | %d | %d | %.1f | %.2f | %.2f |\n", per_sm, ahead, rn, rn / kLayers, rn / mk);
      jline("16 layers q_a,q_b,o_proj m=1 K=3; runner workers/SM=" + std::to_string(per_sm) + " decode ahead=" + std::to_string(ahead), rn);
    }
    cudaFree(dx), cudaFree(dnw);
    for (float* p : y) cudaFree(p);
    for (void* p : ws) cudaFree(p);
  }
  return 0;
}