// Kernel benchmarks for the trellis CUDA kernels (issue 5): fused matmul vs dequantize + cuBLAS bf16,
// dequantize throughput, one GLM-4.7-Flash MoE layer. Each figure: CUDA events around CUDA-graph replays
// (a graph holds several calls cycling through weight copies larger than L2), median of the replays, printed
// beside its roofline = bytes / copy bandwidth measured in the same run (D2D memcpy, read + write counted).
//
// Shapes are out × in (HF orientation: 2048×1536 = down_proj, 1536×2048 = gate/up, 154880×2048 = lm_head).
//   trellis_bench [--quick] [--json FILE] [--commit SHA]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/trellis_kernels.h"
#include "backend/cuda/trellis_test_util.h"

using namespace trellm;
using namespace trellm::testing;

namespace {

struct Ctx {
  cudaStream_t s;
  cublasHandle_t blas;
  std::string gpu, date, commit;
  FILE* json = nullptr;
  double copy_gbs = 0;  // measured D2D copy bandwidth, GB/s (read + write)
};

// Median time (µs) of one call: `calls` calls captured in one graph, `reps` timed replays.
double time_graph(Ctx& c, int calls, const std::function<void(int)>& body, int reps = 20) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  TT_CHECK(cudaStreamBeginCapture(c.s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < calls; i++) body(i);
  TT_CHECK(cudaStreamEndCapture(c.s, &g));
  TT_CHECK(cudaGraphInstantiate(&ge, g, 0));
  for (int i = 0; i < 3; i++) TT_CHECK(cudaGraphLaunch(ge, c.s));
  cudaEvent_t a, b;
  TT_CHECK(cudaEventCreate(&a));
  TT_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int r = 0; r < reps; r++) {
    TT_CHECK(cudaEventRecord(a, c.s));
    TT_CHECK(cudaGraphLaunch(ge, c.s));
    TT_CHECK(cudaEventRecord(b, c.s));
    TT_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    TT_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0 / calls);
  }
  std::sort(t.begin(), t.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return t[t.size() / 2];
}

void emit(Ctx& c, const char* bench, const char* metric, const std::string& shape, double value, const char* unit,
          const char* baseline, double baseline_value, double limit) {
  if (!c.json) return;
  std::fprintf(c.json,
               "{\"date\": \"%s\", \"gpu\": \"%s\", \"commit\": \"%s\", \"command\": \"trellis_bench\", \"bench\": \"%s\", "
               "\"metric\": \"%s\", \"shape\": \"%s\", \"value\": %.4g, \"unit\": \"%s\"",
               c.date.c_str(), c.gpu.c_str(), c.commit.c_str(), bench, metric, shape.c_str(), value, unit);
  if (baseline) std::fprintf(c.json, ", \"baseline\": \"%s\", \"baseline_value\": %.4g", baseline, baseline_value);
  std::fprintf(c.json, ", \"limit\": %.4g}\n", limit);
  std::fflush(c.json);
}

void measure_copy(Ctx& c) {
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  TT_CHECK(cudaMalloc(&a, bytes));
  TT_CHECK(cudaMalloc(&b, bytes));
  TT_CHECK(cudaMemset(a, 1, bytes));
  const double us = time_graph(c, 1, [&](int) { TT_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, c.s)); }, 10);
  c.copy_gbs = 2.0 * bytes / (us * 1e3);
  std::printf("D2D copy bandwidth (read + write): %.0f GB/s\n", c.copy_gbs);
  emit(c, "copy", "copy_bandwidth", "1 GiB d2d", c.copy_gbs, "GB/s", nullptr, 0, 0);
  cudaFree(a);
  cudaFree(b);
}

void bench_matmul(Ctx& c, bool quick) {
  struct S { int out, in; };
  const S shapes[] = {{2048, 1536}, {1536, 2048}, {5120, 2048}, {2048, 5120}, {154880, 2048}};
  std::printf("\n## fused trellis matmul vs dequantize + cuBLAS bf16 (out x in; µs per call; roofline = packed bytes / copy BW)\n");
  std::printf("%-14s %2s %4s %10s %10s %10s %8s %10s %8s\n", "shape", "K", "m", "fused_us", "roof_us", "%roof", "deq+blas", "blas_bf16", "speedup");
  Rng rng(7);
  for (const S& sh : shapes)
    for (int K : {2, 3, 4}) {
      if (quick && K != 3) continue;
      const double wbytes = double(sh.in) * sh.out * K / 8;
      const int copies = std::max(1, int(std::min(32.0, 200e6 / wbytes)));
      std::vector<std::unique_ptr<RandomTrellis>> ws;
      for (int i = 0; i < copies; i++) ws.push_back(std::make_unique<RandomTrellis>(rng, sh.in, sh.out, K, 1, false));
      const int calls = std::max(copies, 8);
      const int max_m = 128;
      const size_t wsb = cuda::trellis_workspace_bytes(max_m, ws[0]->dev.in_padded, ws[0]->dev.out_padded);
      void* wsp;
      TT_CHECK(cudaMalloc(&wsp, wsb));
      cuda::trellis_workspace_init(wsp, wsb, c.s);
      float *x, *y;
      TT_CHECK(cudaMalloc(&x, size_t(max_m) * sh.in * 4));
      TT_CHECK(cudaMalloc(&y, size_t(max_m) * sh.out * 4));
      std::vector<float> hx(size_t(max_m) * sh.in);
      for (auto& v : hx) v = rng.normal();
      TT_CHECK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
      // Baseline buffers: dequantized bf16 W [out, in], bf16 x, f32 y.
      uint16_t *wbf, *xbf;
      TT_CHECK(cudaMalloc(&wbf, size_t(sh.out) * sh.in * 2));
      TT_CHECK(cudaMalloc(&xbf, size_t(max_m) * sh.in * 2));
      TT_CHECK(cudaMemset(xbf, 0x3C, size_t(max_m) * sh.in * 2));
      for (int m : {1, 32, 128}) {
        const double fused = time_graph(c, calls, [&](int i) { cuda::trellis_matmul(ws[i % copies]->dev, x, y, m, wsp, c.s); });
        const float one = 1.0f, zero = 0.0f;
        auto gemm = [&]() {
          cublasGemmEx(c.blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.out, m, sh.in, &one, wbf, CUDA_R_16BF, sh.in, xbf, CUDA_R_16BF,
                       sh.in, &zero, y, CUDA_R_32F, sh.out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        };
        gemm();  // eager first call: cuBLAS picks its kernel outside the capture
        TT_CHECK(cudaStreamSynchronize(c.s));
        const double base = time_graph(c, calls, [&](int i) {
          cuda::trellis_dequantize_bf16(ws[i % copies]->dev, wbf, c.s);
          gemm();
        });
        const double blas = time_graph(c, calls, [&](int) { gemm(); });
        const double roof = wbytes / (c.copy_gbs * 1e3);
        const std::string shape = std::to_string(sh.out) + "x" + std::to_string(sh.in) + " K=" + std::to_string(K) +
                                  " m=" + std::to_string(m);
        std::printf("%6dx%-7d %2d %4d %10.2f %10.2f %9.0f%% %10.2f %10.2f %7.1fx\n", sh.out, sh.in, K, m, fused, roof,
                    100 * roof / fused, base, blas, base / fused);
        emit(c, "trellis_matmul", "latency_us", shape, fused, "us", "dequant+cublas_bf16", base, roof);
        emit(c, "trellis_matmul", "cublas_bf16_dense_us", shape, blas, "us", nullptr, 0, double(sh.out) * sh.in * 2 / (c.copy_gbs * 1e3));
      }
      cudaFree(wsp), cudaFree(x), cudaFree(y), cudaFree(wbf), cudaFree(xbf);
    }
}

void bench_dequant(Ctx& c, bool quick) {
  struct S { int out, in; };
  const S shapes[] = {{2048, 5632}, {2048, 27392}, {2048, 2048}, {4096, 11008}};
  std::printf("\n## dequantize -> bf16 (GElem/s; roofline = (K/8 + 2) bytes per element / copy BW)\n");
  std::printf("%-14s %2s %10s %10s %8s\n", "shape", "K", "GElem/s", "roof", "%roof");
  Rng rng(11);
  for (const S& sh : shapes)
    for (int K : {2, 3, 4}) {
      if (quick && K != 3) continue;
      const double elems = double(sh.out) * sh.in;
      const int copies = std::max(2, int(std::min(16.0, 200e6 / (elems * (K / 8.0 + 2)))));
      std::vector<std::unique_ptr<RandomTrellis>> ws;
      std::vector<uint16_t*> outs(copies);
      for (int i = 0; i < copies; i++) {
        ws.push_back(std::make_unique<RandomTrellis>(rng, sh.in, sh.out, K, 1, false));
        TT_CHECK(cudaMalloc(&outs[i], size_t(elems) * 2));
      }
      const double us = time_graph(c, copies * 2, [&](int i) { cuda::trellis_dequantize_bf16(ws[i % copies]->dev, outs[i % copies], c.s); });
      const double ge = elems / (us * 1e3);
      const double roof = c.copy_gbs / (K / 8.0 + 2);
      std::printf("%6dx%-7d %2d %10.0f %10.0f %7.0f%%\n", sh.out, sh.in, K, ge, roof, 100 * ge / roof);
      emit(c, "trellis_dequant", "throughput", std::to_string(sh.out) + "x" + std::to_string(sh.in) + " K=" + std::to_string(K),
           ge, "GElem/s", nullptr, 0, roof);
      for (auto p : outs) cudaFree(p);
    }
}

void bench_moe(Ctx& c) {
  const int hidden = 2048, inter = 1536, E = 64, top_k = 4, K = 3, layers = 4;
  std::printf("\n## one MoE layer: route + 4 of 64 experts + shared (hidden 2048, inter 1536, K=3 MCG), %d layers rotated\n", layers);
  std::printf("%6s %10s %10s %10s %10s %8s\n", "tokens", "layer_us", "route_us", "tok/s", "roof_us", "%roof");
  Rng rng(13);
  struct Layer {
    std::vector<std::unique_ptr<RandomTrellis>> w;
    cuda::DeviceTrellis *experts, *shared;
    uint16_t* gate;
    float* bias;
  };
  std::vector<Layer> L(layers);
  for (auto& l : L) {
    std::vector<cuda::DeviceTrellis> d;
    for (int e = 0; e < E + 1; e++)
      for (int p = 0; p < 3; p++) {
        l.w.push_back(std::make_unique<RandomTrellis>(rng, p < 2 ? hidden : inter, p < 2 ? inter : hidden, K, 1, false));
        d.push_back(l.w.back()->dev);
      }
    l.experts = dev_upload(std::vector<cuda::DeviceTrellis>(d.begin(), d.begin() + 3 * E));
    l.shared = dev_upload(std::vector<cuda::DeviceTrellis>(d.begin() + 3 * E, d.end()));
    std::vector<uint16_t> g(size_t(E) * hidden);
    for (auto& v : g) v = f32_to_bf16(rng.normal() * 0.03f);
    l.gate = dev_upload(g);
    std::vector<float> b(E);
    for (auto& v : b) v = rng.uniform(-0.05f, 0.05f);
    l.bias = dev_upload(b);
  }
  const int max_m = 2048;
  const size_t wsb = cuda::moe_workspace_bytes(max_m, top_k, hidden, inter, E);
  void* ws;
  TT_CHECK(cudaMalloc(&ws, wsb));
  cuda::trellis_workspace_init(ws, wsb, c.s);
  float *x, *out, *wts;
  int* ids;
  TT_CHECK(cudaMalloc(&x, size_t(layers) * max_m * hidden * 4));
  TT_CHECK(cudaMalloc(&out, size_t(max_m) * hidden * 4));
  TT_CHECK(cudaMalloc(&wts, size_t(max_m) * top_k * 4));
  TT_CHECK(cudaMalloc(&ids, size_t(max_m) * top_k * 4));
  std::vector<float> hx(size_t(layers) * max_m * hidden);
  for (auto& v : hx) v = rng.normal();
  TT_CHECK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
  const double expert_bytes = 3.0 * hidden * inter * K / 8;
  for (int m : {1, 8, 32, 128, 2048}) {
    auto layer = [&](int i, bool experts_too) {
      const Layer& l = L[i % layers];
      const float* xi = x + size_t(i % layers) * max_m * hidden;
      cuda::moe_route(xi, l.gate, l.bias, m, hidden, E, top_k, 1, 1, true, 1.8f, wts, ids, c.s);
      if (experts_too) cuda::moe_experts(l.experts, l.shared, E, xi, ids, wts, out, m, top_k, hidden, inter, ws, c.s, 3, 3, 1);  // every expert K = 3 MCG
    };
    const double us = time_graph(c, layers * 2, [&](int i) { layer(i, true); });
    const double route = time_graph(c, layers * 2, [&](int i) { layer(i, false); });
    // Roofline: distinct experts touched (expected count for uniform routing) + shared + router weights.
    const double p_untouched = std::pow(1.0 - double(top_k) / E, m);
    const double bytes = (E * (1 - p_untouched) + 1) * expert_bytes + double(E) * hidden * 2 + 2.0 * m * hidden * 4;
    const double roof = bytes / (c.copy_gbs * 1e3);
    std::printf("%6d %10.2f %10.2f %10.0f %10.2f %7.0f%%\n", m, us, route, m / (us * 1e-6), roof, 100 * roof / us);
    emit(c, "moe_layer", "latency_us", "glm-4.7-flash moe K=3 tokens=" + std::to_string(m), us, "us", nullptr, 0, roof);
  }
  cudaFree(ws), cudaFree(x), cudaFree(out), cudaFree(wts), cudaFree(ids);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  Ctx c;
  c.commit = "unknown";
  std::string only;
  for (int i = 1; i < argc; i++) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) c.json = std::fopen(argv[++i], "a");
    else if (!std::strcmp(argv[i], "--commit") && i + 1 < argc) c.commit = argv[++i];
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
  }
  if (!have_gpu()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop;
  TT_CHECK(cudaGetDeviceProperties(&prop, 0));
  c.gpu = prop.name;
  char buf[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  c.date = buf;
  std::printf("GPU %s, %d SMs, L2 %d MB, date %s, commit %s\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20,
              c.date.c_str(), c.commit.c_str());
  TT_CHECK(cudaStreamCreate(&c.s));
  if (cublasCreate(&c.blas) != CUBLAS_STATUS_SUCCESS) return 1;
  cublasSetStream(c.blas, c.s);
  void* blas_ws;  // a fixed cuBLAS workspace: no allocation while a graph is being captured
  TT_CHECK(cudaMalloc(&blas_ws, 64 << 20));
  cublasSetWorkspace(c.blas, blas_ws, 64 << 20);
  measure_copy(c);
  if (only.empty() || only == "dequant") bench_dequant(c, quick);
  if (only.empty() || only == "moe") bench_moe(c);
  if (only.empty() || only == "matmul") bench_matmul(c, quick);
  if (c.json) std::fclose(c.json);
  return 0;
}
