// The tensor-core MLA attention kernels (src/backend/cuda/mla_*.cu) against the CPU reference (absorbed form,
// f32 math over the same bf16 cache values), on fresh seeded random inputs; outputs are poisoned (NaN) first
// so an unwritten element fails. Skips cleanly without a GPU.
//
// Tolerance for the fast path: relative L2 error 1.5e-2. The kernels round q_lat (and, in prefill, q_nope and
// o_lat) to bf16 (2^-9 relative each) and feed bf16 probabilities to the tensor cores; with these inputs
// (q, cache ~ N(0,1), kv_b ~ N(0, 0.1²): logits of std ~2) that moves the output by ~3e-3 relative. A wrong
// key, a missed split or a masking error moves it by > 1e-1 (one of <= 7 keys, or a whole context slice).
// The v1 fallback (f32 CUDA cores) keeps the f32 tolerance of test_cuda_ops.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/mla.h"
#include "core/half.h"
#include "core/rng.h"

using namespace trellm;

namespace {

constexpr double kFastTol = 1.5e-2;
constexpr double kV1Tol = 2e-5;

struct Dims {
  const char* name;
  int heads, rank, rope, nope, v;
  bool fast;  // covered by the tensor-core kernels (rank 512, rope 64)
  MlaDims mla() const {
    MlaDims d;
    d.heads = heads;
    d.kv_rank = rank;
    d.rope_dim = rope;
    d.nope_dim = nope;
    d.v_dim = v;
    d.scale = 1.0f / std::sqrt(float(nope + rope));
    return d;
  }
};

const Dims kGlm{"glm", 20, 512, 64, 192, 256, true};
const Dims kGlmH3{"glm-heads3", 3, 512, 64, 192, 256, true};
const Dims kOddA{"h3-nope24-v40", 3, 512, 64, 24, 40, true};
const Dims kOddB{"h5-nope100-v72", 5, 512, 64, 100, 72, true};
const Dims kTiny{"h5-rank48-rope16 (v1)", 5, 48, 16, 24, 40, false};

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); i++) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

class CudaMla : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
    gpu = make_cuda_backend(0);
  }
  void TearDown() override {
    for (void* p : ptrs) gpu->release(p);
  }
  template <typename T>
  TensorView up(const std::vector<T>& h, DType dt, std::initializer_list<int64_t> shape) {
    TensorView v(nullptr, dt, shape);
    EXPECT_EQ(v.nbytes(), h.size() * sizeof(T));
    v.data = gpu->alloc(v.nbytes());
    ptrs.push_back(v.data);
    gpu->from_host(v.data, h.data(), v.nbytes());
    return v;
  }
  std::vector<float> randn(size_t n, float std = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = rng.normal() * std;
    return v;
  }
  static std::vector<uint16_t> bf16(const std::vector<float>& f) {
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); i++) h[i] = f32_to_bf16(f[i]);
    return h;
  }
  std::vector<float> down(TensorView v) {
    std::vector<float> h(size_t(v.numel()));
    gpu->to_host(h.data(), v.data, v.nbytes());
    return h;
  }
  void poison(TensorView v) {
    std::vector<float> nan(size_t(v.numel()), std::numeric_limits<float>::quiet_NaN());
    gpu->from_host(v.data, nan.data(), v.nbytes());
  }

  // Inputs of one layer: bf16 kv_b and cache (host copies for the CPU, device copies for the GPU).
  struct Layer {
    MlaDims d;
    std::vector<uint16_t> kvb, cache;
    std::vector<float> q;
    Linear lc, lg;
    TensorView gcache, gq, gout;
    int cap = 0, n = 0;
  };
  Layer make_layer(const Dims& dims, int n, int cap) {
    Layer L;
    L.d = dims.mla();
    L.n = n;
    L.cap = cap;
    const int per = dims.nope + dims.v;
    L.kvb = bf16(randn(size_t(dims.heads) * per * dims.rank, 0.1f));
    L.cache = bf16(randn(size_t(cap) * L.d.cache_width()));
    L.q = randn(size_t(n) * dims.heads * L.d.q_head_dim());
    L.lc.in = L.lg.in = dims.rank;
    L.lc.out = L.lg.out = int64_t(dims.heads) * per;
    L.lc.weight = TensorView(L.kvb.data(), DType::BF16, {L.lc.out, L.lc.in});
    L.lg.weight = up(L.kvb, DType::BF16, {L.lg.out, L.lg.in});
    L.gcache = up(L.cache, DType::BF16, {cap, L.d.cache_width()});
    L.gq = up(L.q, DType::F32, {n, dims.heads, L.d.q_head_dim()});
    std::vector<float> zeros(size_t(n) * dims.heads * dims.v, 0.0f);
    L.gout = up(zeros, DType::F32, {n, int64_t(dims.heads) * dims.v});
    return L;
  }
  std::vector<float> reference(Layer& L, std::vector<int32_t>& pos) {
    std::vector<float> want(size_t(L.n) * L.d.heads * L.d.v_dim);
    const int bound = *std::max_element(pos.begin(), pos.end()) + 1;
    cpu.attention_mla(TensorView(want.data(), DType::F32, {L.n, int64_t(L.d.heads) * L.d.v_dim}),
                      TensorView(L.q.data(), DType::F32, {L.n, L.d.heads, L.d.q_head_dim()}),
                      TensorView(L.cache.data(), DType::BF16, {L.cap, L.d.cache_width()}), L.lc,
                      Positions{TensorView(pos.data(), DType::I32, {L.n}), bound}, L.d, MlaMode::Absorbed);
    return want;
  }
  // Rows at positions max(0, ctx - n + i): the last row sees ctx keys; ctx < n repeats position 0.
  static std::vector<int32_t> positions(int n, int ctx) {
    std::vector<int32_t> p(n);
    for (int i = 0; i < n; i++) p[i] = std::max(0, ctx - n + i);
    return p;
  }
  // One call through the backend as the model makes it (absorbed mode for n <= 16), bound as given.
  double check(const Dims& dims, int n, int ctx, int bound, int cap) {
    Layer L = make_layer(dims, n, cap);
    auto pos = positions(n, ctx);
    auto want = reference(L, pos);
    TensorView gpos = up(pos, DType::I32, {n});
    poison(L.gout);
    gpu->attention_mla(L.gout, L.gq, L.gcache, L.lg, Positions{gpos, bound}, L.d, n <= 16 ? MlaMode::Absorbed : MlaMode::Expanded);
    return rel_err(down(L.gout), want);
  }

  std::unique_ptr<Backend> gpu;
  CpuBackend cpu;
  std::vector<void*> ptrs;
  Rng rng{20261126};
};

TEST_F(CudaMla, MatchesCpuAcrossShapesAndContexts) {
  for (const Dims* dims : {&kGlm, &kOddA, &kOddB, &kTiny}) {
    double worst = 0;
    for (int n : {1, 3, 16, 17, 33, 127})
      for (int ctx : {1, 7, 300, 1000, 5000}) {
        // Decode-sized calls get a loose bound (as a graph captured at capacity does), prefill a tight one.
        const int cap = ctx + 3, bound = n <= 16 ? cap : ctx;
        const double e = check(*dims, n, ctx, bound, cap);
        worst = std::max(worst, e);
        EXPECT_LT(e, dims->fast ? kFastTol : kV1Tol) << dims->name << " n=" << n << " ctx=" << ctx << " bound=" << bound;
      }
    std::printf("[ mla %-22s ] worst relative L2 error over n x ctx: %.3g\n", dims->name, worst);
  }
}

// A larger bound than the context (many splits past the last key exit early) and the combine path in prefill.
TEST_F(CudaMla, SplitsAndEarlyExits) {
  struct Case {
    int n, ctx, bound;
  };
  double worst = 0;
  for (Case c : {Case{1, 300, 5000}, Case{2, 65, 9000}, Case{3, 129, 200}, Case{16, 64, 64}, Case{17, 40, 40},
                 Case{33, 700, 700}, Case{127, 127, 127}}) {
    const double e = check(kGlm, c.n, c.ctx, c.bound, c.bound);
    worst = std::max(worst, e);
    EXPECT_LT(e, kFastTol) << "n=" << c.n << " ctx=" << c.ctx << " bound=" << c.bound;
  }
  std::printf("[ mla splits/early-exit ] worst relative L2 error: %.3g\n", worst);
}

// The expanded prefill (KVx by cuBLAS, flash attention per head): query blocks of 64 rows with a ragged last
// block, repeated positions (ctx < n), a prefix before the chunk, and the plan's choice checked so each case
// really runs the expanded kernel (the absorbed form is covered above).
TEST_F(CudaMla, ExpandedPrefillMatchesCpu) {
  struct Case {
    const Dims* dims;
    int n, ctx;
  };
  double worst = 0;
  for (Case c : {Case{&kGlm, 17, 17}, Case{&kGlm, 64, 64}, Case{&kGlm, 65, 65}, Case{&kGlm, 64, 40}, Case{&kGlm, 200, 237},
                 Case{&kGlm, 300, 300}, Case{&kGlmH3, 1000, 1000}, Case{&kGlmH3, 500, 2000}, Case{&kGlmH3, 129, 131}}) {
    const cuda::mla::Plan p = cuda::mla::make_plan(c.n, c.dims->heads, c.dims->nope, c.dims->v, c.ctx, 132);
    ASSERT_TRUE(p.expanded) << c.dims->name << " n=" << c.n << " ctx=" << c.ctx;
    const double e = check(*c.dims, c.n, c.ctx, c.ctx, c.ctx + 3);
    worst = std::max(worst, e);
    EXPECT_LT(e, kFastTol) << c.dims->name << " n=" << c.n << " ctx=" << c.ctx;
  }
  // A short chunk after a long prefix stays absorbed (expanding 2,000 keys costs more than it saves).
  EXPECT_FALSE(cuda::mla::make_plan(100, 20, 192, 256, 2000, 132).expanded);
  std::printf("[ mla expanded prefill ] worst relative L2 error: %.3g\n", worst);
}

// The decode step as the engine runs it: captured once in a CUDA graph with bound = capacity, replayed at
// many positions with the positions (and the newest cache row) written between replays.
TEST_F(CudaMla, DecodeGraphCapturedOnceReplayedAtManyPositions) {
  auto* cg = dynamic_cast<CudaBackend*>(gpu.get());
  ASSERT_NE(cg, nullptr);
  cudaStream_t stream = static_cast<cudaStream_t>(cg->stream());
  const int cap = 4100;
  for (int n : {1, 4}) {
    Layer L = make_layer(kGlm, n, cap);
    std::vector<int32_t> pos = positions(n, cap);
    TensorView gpos = up(pos, DType::I32, {n});
    const Positions P{gpos, cap};
    gpu->attention_mla(L.gout, L.gq, L.gcache, L.lg, P, L.d, MlaMode::Absorbed);  // warm-up: scratch sized here
    gpu->synchronize();

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    gpu->attention_mla(L.gout, L.gq, L.gcache, L.lg, P, L.d, MlaMode::Absorbed);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

    double worst = 0;
    for (int last : {0, 1, 5, 63, 64, 65, 700, 2047, 4099}) {
      pos = positions(n, last + 1);
      // a fresh newest row, as mla_cache_append would have written it before the attention
      auto row = bf16(randn(size_t(L.d.cache_width())));
      std::copy(row.begin(), row.end(), L.cache.begin() + size_t(last) * L.d.cache_width());
      gpu->from_host(static_cast<uint16_t*>(L.gcache.data) + size_t(last) * L.d.cache_width(), row.data(), row.size() * 2);
      gpu->from_host(gpos.data, pos.data(), pos.size() * 4);
      poison(L.gout);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      gpu->synchronize();
      const double e = rel_err(down(L.gout), reference(L, pos));
      worst = std::max(worst, e);
      EXPECT_LT(e, kFastTol) << "graph replay n=" << n << " last position " << last;
    }
    std::printf("[ mla graph n=%d ] worst relative L2 error over replays: %.3g\n", n, worst);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
}

// The v1 kernels stay reachable (the ladder baseline): same shapes, f32 tolerance.
TEST_F(CudaMla, V1BaselineStillMatches) {
  auto* cg = dynamic_cast<CudaBackend*>(gpu.get());
  ASSERT_NE(cg, nullptr);
  cg->use_mla_v1(true);
  for (auto [n, ctx] : std::vector<std::pair<int, int>>{{1, 1000}, {3, 300}, {33, 300}})
    EXPECT_LT(check(kGlm, n, ctx, ctx + 3, ctx + 3), 1e-4) << "v1 n=" << n << " ctx=" << ctx;
  cg->use_mla_v1(false);
}

}  // namespace
