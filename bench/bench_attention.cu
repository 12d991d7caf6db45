// bench_attention: MLA attention per layer at GLM-4.7-Flash dims (20 heads, rank 512, rope 64, nope 192,
// v 256), the v1 kernels (f32 CUDA cores) against the tensor-core ones (v2) in the same run.
//   decode  n = 1 at context 1K/4K/8K/32K (and n = 16, speculative/batched rows, at 1K/32K), captured as a CUDA graph with bound = capacity = 32768 (as the
//           engine captures its step), 12 layers of distinct caches and kv_b per graph so every replay
//           streams from HBM (12 x (37.7 MB cache + 9.2 MB kv_b) >> 50 MB L2); median replay time / 12.
//           Roofline: (T*1152 B of cache + 9.18 MB of kv_b) at the copy bandwidth measured in this run.
//   prefill causal prompts of 512/2K/8K tokens, one layer, event-timed calls (prefill is not graph-captured);
//           FLOPs counted for the absorbed form: pairs*20*(576+512)*2 + projections.
//   batched decode (--batched: only this) B decode rows of B different sequences, each at context T, their cache
//           blocks scattered over one pool (per-row groups, one call), against B single-row calls of the same
//           rows in the same run; graph-captured, 12 layers of distinct pools and kv_b, median replay / 12.
// The caches are paged (backend.h): one sequence over an identity block table unless said otherwise.
// Usage: bench_attention [--json FILE] [--commit HASH] [--reps N] [--profile] [--batched] [--decode]
//        (--profile: one call per shape, for ncu; --decode: the decode table only)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"

using namespace trellm;

namespace {

__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    const float x = (float(h & 0xffffff) / 16777216.0f * 2.0f - 1.0f) * scale;  // uniform, std = scale/sqrt(3)
    const uint32_t u = __float_as_uint(x);
    p[i] = uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
}
__global__ void fill_f32(float* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    p[i] = (float(h & 0xffffff) / 16777216.0f * 2.0f - 1.0f) * scale;
  }
}

// The block table of one sequence over `rows` pool rows in order (0, 1, 2, ...), and `n` rows' seq ids (all 0).
struct Identity {
  void* table = nullptr;
  void* seq = nullptr;
  int blocks = 0, n = 0;
  CudaBackend* gpu_;
  Identity(CudaBackend& gpu, int rows, int n_rows) : blocks(rows / kKvBlockTokens), n(n_rows), gpu_(&gpu) {
    std::vector<int32_t> t(static_cast<size_t>(blocks)), z(static_cast<size_t>(n), 0);
    for (int b = 0; b < blocks; b++) t[size_t(b)] = b;
    table = gpu.alloc(t.size() * 4);
    seq = gpu.alloc(z.size() * 4);
    gpu.from_host(table, t.data(), t.size() * 4);
    gpu.from_host(seq, z.data(), z.size() * 4);
  }
  Identity(const Identity&) = delete;
  ~Identity() {
    gpu_->release(table);
    gpu_->release(seq);
  }
  Positions positions(void* pos, int rows, int bound) const {
    return Positions{TensorView(pos, DType::I32, {rows}), bound, TensorView(seq, DType::I32, {rows}),
                     TensorView(table, DType::I32, {1, blocks}), {}};
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

struct Out {
  FILE* json = nullptr;
  std::string date, gpu, commit, command;
  void line(const char* metric, const std::string& shape, double value, const char* unit, double base, double limit,
            const char* baseline = "v1 (f32 CUDA cores)") {
    if (!json) return;
    std::fprintf(json,
                 "{\"date\": \"%s\", \"gpu\": \"%s\", \"commit\": \"%s\", \"command\": \"%s\", \"bench\": \"mla_attention\", "
                 "\"metric\": \"%s\", \"shape\": \"%s\", \"value\": %.4g, \"unit\": \"%s\", \"baseline\": \"%s\", "
                 "\"baseline_value\": %.4g, \"limit\": %.4g}\n",
                 date.c_str(), gpu.c_str(), commit.c_str(), command.c_str(), metric, shape.c_str(), value, unit, baseline, base, limit);
    std::fflush(json);
  }
};

}  // namespace

int main(int argc, char** argv) {
  Out out;
  int reps = 30;
  bool profile = false, batched = false, decode_only = false;
  for (int i = 0; i < argc; i++) {
    if (i) out.command += ' ';
    out.command += argv[i];
  }
  for (int i = 1; i < argc; i++) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) out.json = std::fopen(argv[++i], "a");
    else if (!std::strcmp(argv[i], "--commit") && i + 1 < argc) out.commit = argv[++i];
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::max(3, std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--profile")) profile = true;  // one call per shape, for ncu
    else if (!std::strcmp(argv[i], "--batched")) batched = true;
    else if (!std::strcmp(argv[i], "--decode")) decode_only = true;
  }
  if (!cuda_available()) {
    std::printf("no CUDA device\n");
    return 1;
  }
  CudaBackend gpu(0);
  cudaStream_t s = static_cast<cudaStream_t>(gpu.stream());
  cudaDeviceProp prop;
  TRELLM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  out.gpu = prop.name;
  {
    char buf[32];
    std::time_t t = std::time(nullptr);
    std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
    out.date = buf;
  }
  cudaEvent_t e0, e1;
  TRELLM_CUDA_CHECK(cudaEventCreate(&e0));
  TRELLM_CUDA_CHECK(cudaEventCreate(&e1));
  auto time_ms = [&](auto&& fn) {
    TRELLM_CUDA_CHECK(cudaEventRecord(e0, s));
    fn();
    TRELLM_CUDA_CHECK(cudaEventRecord(e1, s));
    TRELLM_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    TRELLM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return double(ms);
  };

  MlaDims d;
  d.heads = 20, d.kv_rank = 512, d.rope_dim = 64, d.nope_dim = 192, d.v_dim = 256, d.scale = 1.0f / 16.0f;
  const int H = d.heads, W = d.cache_width(), per = d.nope_dim + d.v_dim;
  const size_t kvb_elems = size_t(H) * per * d.kv_rank, kvb_bytes = kvb_elems * 2;
  auto fill16 = [&](void* p, size_t n, uint32_t seed, float scale) {
    fill_bf16<<<1024, 256, 0, s>>>(static_cast<uint16_t*>(p), n, seed, scale);
    TRELLM_CUDA_LAUNCH_CHECK();
  };
  auto fill32 = [&](void* p, size_t n, uint32_t seed, float scale) {
    fill_f32<<<1024, 256, 0, s>>>(static_cast<float*>(p), n, seed, scale);
    TRELLM_CUDA_LAUNCH_CHECK();
  };

  if (profile) {  // v2 only, one plain-stream call per shape: decode n=1 at 1K and 32K, n=16 at 32K, prefill 2K
    const int C = 32768, NMAX = 2048;
    void* cache = gpu.alloc(size_t(C) * W * 2);
    void* kvb = gpu.alloc(kvb_bytes);
    float* q = static_cast<float*>(gpu.alloc(size_t(NMAX) * H * d.q_head_dim() * 4));
    float* o = static_cast<float*>(gpu.alloc(size_t(NMAX) * H * d.v_dim * 4));
    int32_t* pos = static_cast<int32_t*>(gpu.alloc(NMAX * 4));
    const Identity id(gpu, C, NMAX);
    fill16(cache, size_t(C) * W, 11, 1.7f);
    fill16(kvb, kvb_elems, 12, 0.17f);
    fill32(q, size_t(NMAX) * H * d.q_head_dim(), 13, 1.7f);
    Linear lin;
    lin.in = d.kv_rank;
    lin.out = int64_t(H) * per;
    lin.weight = TensorView(kvb, DType::BF16, {lin.out, lin.in});
    struct Shape {
      int n, T, bound;
    };
    for (Shape sh : {Shape{1, 1024, C}, Shape{1, 32768, C}, Shape{16, 32768, C}, Shape{2048, 2048, 2048}}) {
      std::vector<int32_t> hp(sh.n);
      for (int i = 0; i < sh.n; i++) hp[i] = sh.T - sh.n + i;
      gpu.from_host(pos, hp.data(), hp.size() * 4);
      gpu.attention_mla(TensorView(o, DType::F32, {sh.n, int64_t(H) * d.v_dim}), TensorView(q, DType::F32, {sh.n, H, d.q_head_dim()}),
                        TensorView(cache, DType::BF16, {C, W}), lin, id.positions(pos, sh.n, sh.bound), d,
                        sh.n <= 16 ? MlaMode::Absorbed : MlaMode::Expanded);
      gpu.synchronize();
      std::printf("profiled n=%d T=%d bound=%d\n", sh.n, sh.T, sh.bound);
    }
    return 0;
  }

  // Copy bandwidth (read + write) of this card, the roofline's denominator.
  double copy_gbs = 0;
  {
    const size_t bytes = size_t(1) << 30;
    void *a = gpu.alloc(bytes), *b = gpu.alloc(bytes);
    std::vector<double> t;
    for (int r = 0; r < 8; r++) t.push_back(time_ms([&] { TRELLM_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s)); }));
    t.erase(t.begin());
    copy_gbs = 2.0 * bytes / (median(t) * 1e-3) / 1e9;
    gpu.release(a);
    gpu.release(b);
  }
  std::printf("GPU %s (%d SMs), %s, commit %s\ncopy bandwidth (read+write): %.0f GB/s\n\n", prop.name, prop.multiProcessorCount,
              out.date.c_str(), out.commit.c_str(), copy_gbs);

  // ---------------- batched decode: rows of different sequences ----------------
  if (batched) {
    const int NL = 12, BMAX = 64, TMAX = 4096;
    const size_t pool_rows = size_t(BMAX) * TMAX;
    std::vector<void*> pools(NL), kvbs(NL);
    std::vector<Linear> lin(NL);
    for (int l = 0; l < NL; l++) {
      pools[l] = gpu.alloc(pool_rows * W * 2);
      kvbs[l] = gpu.alloc(kvb_bytes);
      fill16(pools[l], pool_rows * W, 6000 + l, 1.7f);
      fill16(kvbs[l], kvb_elems, 7000 + l, 0.17f);
      lin[l].in = d.kv_rank;
      lin[l].out = int64_t(H) * per;
      lin[l].weight = TensorView(kvbs[l], DType::BF16, {lin[l].out, lin[l].in});
    }
    float* q = static_cast<float*>(gpu.alloc(size_t(BMAX) * H * d.q_head_dim() * 4));
    float* o = static_cast<float*>(gpu.alloc(size_t(BMAX) * H * d.v_dim * 4));
    int32_t* pos = static_cast<int32_t*>(gpu.alloc(BMAX * 4));
    int32_t* seq = static_cast<int32_t*>(gpu.alloc(BMAX * 4));
    int32_t* tables = static_cast<int32_t*>(gpu.alloc(pool_rows / kKvBlockTokens * 4));
    fill32(q, size_t(BMAX) * H * d.q_head_dim(), 8, 1.7f);
    std::printf("## batched decode, per layer: B rows of B sequences at context T each, blocks scattered (graph of %d layers)\n\n", NL);
    std::printf("| B | T | B single-row calls µs | one per-row call µs | speed-up | bytes/layer | per-row GB/s | %% of copy BW |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int B : {1, 16, 32, 64})
      for (int T : {1024, TMAX}) {
        const int nb = T / kKvBlockTokens;
        std::vector<int32_t> t(static_cast<size_t>(B) * nb), sq(static_cast<size_t>(B)), ps(static_cast<size_t>(B), T - 1);
        for (size_t i = 0; i < t.size(); i++) t[i] = int32_t(i);
        uint64_t r = 88172645463325252ull;  // xorshift: a scattered block order
        for (size_t i = t.size() - 1; i > 0; i--) {
          r ^= r << 13, r ^= r >> 7, r ^= r << 17;
          std::swap(t[i], t[r % (i + 1)]);
        }
        for (int i = 0; i < B; i++) sq[size_t(i)] = i;
        gpu.from_host(tables, t.data(), t.size() * 4);
        gpu.from_host(seq, sq.data(), sq.size() * 4);
        gpu.from_host(pos, ps.data(), ps.size() * 4);
        const std::vector<int> runs(size_t(B), 1), one = {1};
        const TensorView tt(tables, DType::I32, {B, nb});
        auto step = [&](bool per_row) {
          for (int l = 0; l < NL; l++) {
            const TensorView pool(pools[l], DType::BF16, {int64_t(pool_rows), W});
            if (per_row) {
              gpu.attention_mla(TensorView(o, DType::F32, {B, int64_t(H) * d.v_dim}), TensorView(q, DType::F32, {B, H, d.q_head_dim()}),
                                pool, lin[l], Positions{TensorView(pos, DType::I32, {B}), T, TensorView(seq, DType::I32, {B}), tt, runs},
                                d, MlaMode::Absorbed);
              continue;
            }
            for (int i = 0; i < B; i++)
              gpu.attention_mla(TensorView(o + size_t(i) * H * d.v_dim, DType::F32, {1, int64_t(H) * d.v_dim}),
                                TensorView(q + size_t(i) * H * d.q_head_dim(), DType::F32, {1, H, d.q_head_dim()}), pool, lin[l],
                                Positions{TensorView(pos + i, DType::I32, {1}), T, TensorView(seq + i, DType::I32, {1}), tt, one},
                                d, MlaMode::Absorbed);
          }
        };
        double us[2];
        for (int v = 0; v < 2; v++) {
          step(v == 1);
          gpu.synchronize();
          cudaGraph_t g;
          cudaGraphExec_t ge;
          TRELLM_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
          step(v == 1);
          TRELLM_CUDA_CHECK(cudaStreamEndCapture(s, &g));
          TRELLM_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
          for (int rep = 0; rep < 3; rep++) TRELLM_CUDA_CHECK(cudaGraphLaunch(ge, s));
          std::vector<double> tm;
          for (int rep = 0; rep < reps; rep++) tm.push_back(time_ms([&] { TRELLM_CUDA_CHECK(cudaGraphLaunch(ge, s)); }));
          us[v] = median(tm) * 1e3 / NL;
          TRELLM_CUDA_CHECK(cudaGraphExecDestroy(ge));
          TRELLM_CUDA_CHECK(cudaGraphDestroy(g));
        }
        const double bytes = double(B) * T * W * 2 + double(kvb_bytes);
        const double gbs = bytes / (us[1] * 1e-6) / 1e9;
        std::printf("| %d | %d | %.1f | %.1f | %.2fx | %.1f MB | %.0f | %.0f%% |\n", B, T, us[0], us[1], us[0] / us[1], bytes / 1e6,
                    gbs, 100.0 * gbs / copy_gbs);
        out.line("batched_decode_layer_us",
                 "glm-4.7-flash attention per-row B=" + std::to_string(B) + " ctx=" + std::to_string(T) + " scattered blocks",
                 us[1], "us", us[0], bytes / (copy_gbs * 1e9) * 1e6, "B single-row calls");
      }
    if (out.json) std::fclose(out.json);
    return 0;
  }

  // ---------------- decode ----------------
  {
    const int C = 32768, NL = 12;
    std::vector<void*> caches(NL), kvbs(NL);
    std::vector<Linear> lin(NL);
    for (int l = 0; l < NL; l++) {
      caches[l] = gpu.alloc(size_t(C) * W * 2);
      kvbs[l] = gpu.alloc(kvb_bytes);
      fill16(caches[l], size_t(C) * W, 1000 + l, 1.7f);
      fill16(kvbs[l], kvb_elems, 2000 + l, 0.17f);
      lin[l].in = d.kv_rank;
      lin[l].out = int64_t(H) * per;
      lin[l].weight = TensorView(kvbs[l], DType::BF16, {lin[l].out, lin[l].in});
    }
    const int NMAX = 16;
    float* q = static_cast<float*>(gpu.alloc(size_t(NMAX) * H * d.q_head_dim() * 4));
    float* o = static_cast<float*>(gpu.alloc(size_t(NMAX) * H * d.v_dim * 4));
    int32_t* pos = static_cast<int32_t*>(gpu.alloc(NMAX * 4));
    const Identity id(gpu, C, NMAX);
    fill32(q, size_t(NMAX) * H * d.q_head_dim(), 7, 1.7f);

    std::printf("## decode, per layer (graph of %d layers, bound = capacity = %d)\n\n", NL, C);
    std::printf("| n | context | v1 µs | v2 µs | speed-up | bytes/layer | roofline µs @ copy BW | v2 %% of roofline | v2 GB/s |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int n : {1, 16})
      for (int T : {1024, 4096, 8192, 32768}) {
        if (n > 1 && (T == 4096 || T == 8192)) continue;
        const TensorView tq(q, DType::F32, {n, H, d.q_head_dim()}), to(o, DType::F32, {n, int64_t(H) * d.v_dim});
        const Positions P = id.positions(pos, n, C);
        std::vector<int32_t> hp(n);
        for (int i = 0; i < n; i++) hp[i] = T - n + i;  // speculative/batched rows: consecutive positions
        gpu.from_host(pos, hp.data(), hp.size() * 4);
        double us[2];
        for (int v = 0; v < 2; v++) {
          gpu.use_mla_v1(v == 0);
          for (int l = 0; l < NL; l++) gpu.attention_mla(to, tq, TensorView(caches[l], DType::BF16, {C, W}), lin[l], P, d, MlaMode::Absorbed);
          gpu.synchronize();
          cudaGraph_t g;
          cudaGraphExec_t ge;
          TRELLM_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
          for (int l = 0; l < NL; l++) gpu.attention_mla(to, tq, TensorView(caches[l], DType::BF16, {C, W}), lin[l], P, d, MlaMode::Absorbed);
          TRELLM_CUDA_CHECK(cudaStreamEndCapture(s, &g));
          TRELLM_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
          for (int r = 0; r < 3; r++) TRELLM_CUDA_CHECK(cudaGraphLaunch(ge, s));
          std::vector<double> t;
          const int R = v == 0 ? std::max(3, reps / 6) : reps;
          for (int r = 0; r < R; r++) t.push_back(time_ms([&] { TRELLM_CUDA_CHECK(cudaGraphLaunch(ge, s)); }));
          us[v] = median(t) * 1e3 / NL;
          TRELLM_CUDA_CHECK(cudaGraphExecDestroy(ge));
          TRELLM_CUDA_CHECK(cudaGraphDestroy(g));
        }
        const double bytes = double(T) * W * 2 + double(kvb_bytes);
        const double roof = bytes / (copy_gbs * 1e9) * 1e6;
        std::printf("| %d | %d | %.1f | %.2f | %.1fx | %.2f MB | %.2f | %.0f%% | %.0f |\n", n, T, us[0], us[1], us[0] / us[1], bytes / 1e6,
                    roof, 100.0 * roof / us[1], bytes / (us[1] * 1e-6) / 1e9);
        out.line("decode_layer_us", "glm-4.7-flash attention n=" + std::to_string(n) + " ctx=" + std::to_string(T) + " bound=32768",
                 us[1], "us", us[0], roof);
      }
    gpu.use_mla_v1(false);
    for (int l = 0; l < NL; l++) {
      gpu.release(caches[l]);
      gpu.release(kvbs[l]);
    }
    gpu.release(q);
    gpu.release(o);
    gpu.release(pos);
  }

  if (decode_only) return 0;

  // ---------------- prefill ----------------
  {
    std::printf("\n## prefill, causal, one layer (event-timed calls, median)\n\n");
    std::printf("| prompt | v1 ms | v2 ms | speed-up | GFLOP (absorbed) | v2 TFLOP/s | compute floor ms @ 790 TFLOP/s | attention-only tok/s, 47 layers |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    void* kvb = gpu.alloc(kvb_bytes);
    fill16(kvb, kvb_elems, 3000, 0.17f);
    Linear lin;
    lin.in = d.kv_rank;
    lin.out = int64_t(H) * per;
    lin.weight = TensorView(kvb, DType::BF16, {lin.out, lin.in});
    for (int Pn : {512, 2048, 8192}) {
      void* cache = gpu.alloc(size_t(Pn) * W * 2);
      float* q = static_cast<float*>(gpu.alloc(size_t(Pn) * H * d.q_head_dim() * 4));
      float* o = static_cast<float*>(gpu.alloc(size_t(Pn) * H * d.v_dim * 4));
      int32_t* pos = static_cast<int32_t*>(gpu.alloc(size_t(Pn) * 4));
      const Identity id(gpu, Pn, Pn);
      fill16(cache, size_t(Pn) * W, 4000 + Pn, 1.7f);
      fill32(q, size_t(Pn) * H * d.q_head_dim(), 5000 + Pn, 1.7f);
      std::vector<int32_t> hp(Pn);
      for (int i = 0; i < Pn; i++) hp[i] = i;
      gpu.from_host(pos, hp.data(), hp.size() * 4);
      const TensorView tq(q, DType::F32, {Pn, H, d.q_head_dim()}), to(o, DType::F32, {Pn, int64_t(H) * d.v_dim}),
          tc(cache, DType::BF16, {Pn, W});
      const Positions P = id.positions(pos, Pn, Pn);
      double ms[2];
      for (int v = 0; v < 2; v++) {
        gpu.use_mla_v1(v == 0);
        gpu.attention_mla(to, tq, tc, lin, P, d, MlaMode::Expanded);
        gpu.synchronize();
        std::vector<double> t;
        const int R = v == 0 ? 3 : std::max(5, reps / 3);
        for (int r = 0; r < R; r++) t.push_back(time_ms([&] { gpu.attention_mla(to, tq, tc, lin, P, d, MlaMode::Expanded); }));
        ms[v] = median(t);
      }
      const double pairs = double(Pn) * (Pn + 1) / 2;
      const double flop = pairs * H * (W + d.kv_rank) * 2.0 + double(Pn) * H * (d.nope_dim + d.v_dim) * d.kv_rank * 2.0;
      const double floor_ms = flop / 790e12 * 1e3;
      std::printf("| %d | %.2f | %.3f | %.1fx | %.1f | %.0f | %.3f | %.0f |\n", Pn, ms[0], ms[1], ms[0] / ms[1], flop / 1e9,
                  flop / (ms[1] * 1e-3) / 1e12, floor_ms, Pn / (47 * ms[1] * 1e-3));
      out.line("prefill_layer_ms", "glm-4.7-flash attention causal prompt=" + std::to_string(Pn), ms[1], "ms", ms[0], floor_ms);
      gpu.release(cache);
      gpu.release(q);
      gpu.release(o);
      gpu.release(pos);
    }
    gpu.use_mla_v1(false);
    gpu.release(kvb);
  }
  if (out.json) std::fclose(out.json);
  return 0;
}
