// The tensor-core MLA attention kernels (src/backend/cuda/mla_*.cu) and the v1 kernels against the CPU reference
// (f32 math over the same bf16 cache values), on fresh seeded random inputs over a paged cache: sequences laid out
// over scattered pool blocks (paged_test_util.h: unowned rows NaN, table entries past a sequence far outside the
// pool), prefix blocks shared between sequences, decode rows of different sequences in one call (per-row groups),
// and mixed runs. Outputs are poisoned (NaN) first so an unwritten element fails. Skips cleanly without a GPU.
//
// Tolerance for the fast path: relative L2 error 1.5e-2 per query row. The kernels round q_lat (and, in prefill,
// q_nope and o_lat) to bf16 (2^-9 relative each) and feed bf16 probabilities to the tensor cores; with these
// inputs (q, cache ~ N(0,1), kv_b ~ N(0, 0.1²): logits of std ~2) that moves the output by ~3e-3 relative. A wrong
// key, a missed split or a masking error moves it by > 1e-1 (one of <= 7 keys, or a whole context slice); a wrong
// block reads NaN. The v1 fallback (f32 CUDA cores) keeps the f32 tolerance of test_cuda_ops.
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
#include "backend/cuda/paged_test_util.h"
#include "core/half.h"
#include "core/rng.h"

using namespace trellm;
using test::PagedLayout;
using test::StepRows;

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
  double tol() const { return fast ? kFastTol : kV1Tol; }
};

const Dims kGlm{"glm", 20, 512, 64, 192, 256, true};
const Dims kGlmH3{"glm-heads3", 3, 512, 64, 192, 256, true};
const Dims kOddA{"h3-nope24-v40", 3, 512, 64, 24, 40, true};
const Dims kOddB{"h5-nope100-v72", 5, 512, 64, 100, 72, true};
const Dims kTiny{"h5-rank48-rope16 (v1)", 5, 48, 16, 24, 40, false};

// The largest relative L2 error over the n query rows (a row is heads * v values): one row of a batch reading
// the wrong sequence cannot hide behind the others.
double rel_err(const std::vector<float>& got, const std::vector<float>& want, int n) {
  const size_t per = got.size() / size_t(n);
  double worst = 0;
  for (int i = 0; i < n; i++) {
    double num = 0, den = 0;
    for (size_t j = size_t(i) * per; j < size_t(i + 1) * per; j++) {
      if (!std::isfinite(got[j])) return INFINITY;
      num += (double(got[j]) - want[j]) * (double(got[j]) - want[j]);
      den += double(want[j]) * want[j];
    }
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-30)));
  }
  return worst;
}

// Rows at positions max(0, ctx - n + i) of one sequence (one run): the last row sees ctx keys; ctx < n repeats
// position 0.
StepRows chunk_rows(int n, int ctx) {
  StepRows r;
  for (int i = 0; i < n; i++) {
    r.pos.push_back(std::max(0, ctx - n + i));
    r.seq.push_back(0);
  }
  r.runs.push_back(n);
  return r;
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

  // One layer's inputs over a paged cache: bf16 kv_b, the pool and its tables, the step's rows and q (host copies
  // for the CPU, device copies for the GPU).
  struct Case {
    MlaDims d;
    PagedLayout L;
    StepRows rows;
    int bound = 0;
    std::vector<uint16_t> kvb, pool;
    std::vector<float> q;
    Linear lc, lg;
    TensorView gpool, gq, gout, gpos, gseq, gtables;
    int n() const { return rows.n(); }
    Positions dev() const {
      Positions p;
      p.pos = gpos;
      p.bound = bound;
      p.seq = gseq;
      p.tables = gtables;
      p.runs = rows.runs;
      return p;
    }
  };
  Case make_case(const Dims& dims, PagedLayout L, StepRows rows, int bound) {
    Case c;
    c.d = dims.mla();
    c.L = std::move(L);
    c.rows = std::move(rows);
    c.bound = bound;
    const int n = c.n(), per = dims.nope + dims.v, W = c.d.cache_width();
    c.kvb = bf16(randn(size_t(dims.heads) * per * dims.rank, 0.1f));
    c.pool = test::make_pool(c.L, W, rng);
    c.q = randn(size_t(n) * dims.heads * c.d.q_head_dim());
    c.lc.in = c.lg.in = dims.rank;
    c.lc.out = c.lg.out = int64_t(dims.heads) * per;
    c.lc.weight = TensorView(c.kvb.data(), DType::BF16, {c.lc.out, c.lc.in});
    c.lg.weight = up(c.kvb, DType::BF16, {c.lg.out, c.lg.in});
    c.gpool = up(c.pool, DType::BF16, {c.L.pool_rows(), W});
    c.gq = up(c.q, DType::F32, {n, dims.heads, c.d.q_head_dim()});
    c.gout = up(std::vector<float>(size_t(n) * dims.heads * dims.v), DType::F32, {n, int64_t(dims.heads) * dims.v});
    c.gpos = up(c.rows.pos, DType::I32, {n});
    c.gseq = up(c.rows.seq, DType::I32, {n});
    c.gtables = up(c.L.tables, DType::I32, {c.L.sequences(), c.L.max_blocks});
    return c;
  }
  std::vector<float> reference(Case& c, MlaMode mode = MlaMode::Absorbed) {
    const int n = c.n();
    std::vector<float> want(size_t(n) * c.d.heads * c.d.v_dim);
    cpu.attention_mla(TensorView(want.data(), DType::F32, {n, int64_t(c.d.heads) * c.d.v_dim}),
                      TensorView(c.q.data(), DType::F32, {n, c.d.heads, c.d.q_head_dim()}),
                      TensorView(c.pool.data(), DType::BF16, {c.L.pool_rows(), c.d.cache_width()}), c.lc,
                      test::host_positions(c.rows, c.L, c.bound), c.d, mode);
    return want;
  }
  // One call through the backend (mode as given), against the CPU twin.
  double run(Case& c, MlaMode mode) {
    const auto want = reference(c, mode);
    poison(c.gout);
    gpu->attention_mla(c.gout, c.gq, c.gpool, c.lg, c.dev(), c.d, mode);
    return rel_err(down(c.gout), want, c.n());
  }
  // n rows at the end of one sequence of ctx tokens, on scattered blocks, with tables covering `bound`.
  double check(const Dims& dims, int n, int ctx, int bound) {
    Case c = make_case(dims, test::make_layout({ctx}, rng, {}, (bound + 63) / 64), chunk_rows(n, ctx), bound);
    return run(c, n <= 16 ? MlaMode::Absorbed : MlaMode::Expanded);
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
        const int bound = n <= 16 ? ctx + 3 : ctx;
        const double e = check(*dims, n, ctx, bound);
        worst = std::max(worst, e);
        EXPECT_LT(e, dims->tol()) << dims->name << " n=" << n << " ctx=" << ctx << " bound=" << bound;
      }
    std::printf("[ mla %-22s ] worst relative L2 error over n x ctx: %.3g\n", dims->name, worst);
  }
}

// A larger bound than the context (many splits past the last key exit early; table entries past the sequence
// are never read), long contexts whose splits hold several tiles (both smem stages reused, tiles asked into L2
// ahead), and the combine path in prefill.
TEST_F(CudaMla, SplitsAndEarlyExits) {
  struct Case {
    int n, ctx, bound;
  };
  double worst = 0;
  for (Case c : {Case{1, 300, 5000}, Case{1, 20000, 32768}, Case{2, 65, 9000}, Case{2, 12000, 12001}, Case{3, 129, 200}, Case{16, 64, 64}, Case{17, 40, 40},
                 Case{33, 700, 700}, Case{127, 127, 127}}) {
    const double e = check(kGlm, c.n, c.ctx, c.bound);
    worst = std::max(worst, e);
    EXPECT_LT(e, kFastTol) << "n=" << c.n << " ctx=" << c.ctx << " bound=" << c.bound;
  }
  std::printf("[ mla splits/early-exit ] worst relative L2 error: %.3g\n", worst);
}

// The expanded prefill (the sequence's rows gathered, KVx by cuBLAS, flash attention per head): query blocks of 64
// rows with a ragged last block, repeated positions (ctx < n), a prefix before the chunk, a bound past the
// sequence, and the plan's choice checked so each case really runs the expanded kernel.
TEST_F(CudaMla, ExpandedPrefillMatchesCpu) {
  struct Case {
    const Dims* dims;
    int n, ctx, bound;
  };
  double worst = 0;
  for (Case c : {Case{&kGlm, 17, 17, 17}, Case{&kGlm, 64, 64, 64}, Case{&kGlm, 65, 65, 65}, Case{&kGlm, 64, 40, 40},
                 Case{&kGlm, 200, 237, 237}, Case{&kGlm, 300, 300, 300}, Case{&kGlm, 300, 300, 400},
                 Case{&kGlmH3, 1000, 1000, 1000}, Case{&kGlmH3, 500, 2000, 2000}, Case{&kGlmH3, 129, 131, 131}}) {
    const cuda::mla::Plan p = cuda::mla::make_plan(c.n, c.dims->heads, c.dims->nope, c.dims->v, c.bound, 132);
    ASSERT_TRUE(p.expanded) << c.dims->name << " n=" << c.n << " ctx=" << c.ctx;
    const double e = check(*c.dims, c.n, c.ctx, c.bound);
    worst = std::max(worst, e);
    EXPECT_LT(e, kFastTol) << c.dims->name << " n=" << c.n << " ctx=" << c.ctx << " bound=" << c.bound;
  }
  // A short chunk after a long prefix stays absorbed (expanding 2,000 keys costs more than it saves); decode
  // rows of different sequences never expand.
  EXPECT_FALSE(cuda::mla::make_plan(100, 20, 192, 256, 2000, 132).expanded);
  EXPECT_FALSE(cuda::mla::make_plan(300, 20, 192, 256, 300, 132, cuda::mla::Grouping::PerRow).expanded);
  std::printf("[ mla expanded prefill ] worst relative L2 error: %.3g\n", worst);
}

// Decode rows of different sequences in one call (per-row groups: each CTA its own table and position): n <= 16
// on the decode kernels, more on the cuBLAS projections; odd lengths, a tight and a loose bound.
TEST_F(CudaMla, DecodeRowsOfDifferentSequences) {
  const std::vector<int> odd = {1, 3, 17, 33, 127, 200, 1000, 1501, 64, 65, 128};
  for (const Dims* dims : {&kGlm, &kOddB, &kTiny}) {
    double worst = 0;
    for (int n : {1, 3, 16, 17, 40, 64}) {
      std::vector<int> len(static_cast<size_t>(n));
      for (int i = 0; i < n; i++) len[size_t(i)] = i < int(odd.size()) ? odd[size_t(odd.size() - 1 - i)] : 1 + int(rng.next_u64() % 1500);
      for (bool loose : {false, true}) {
        PagedLayout L = test::make_layout(len, rng, {}, loose ? 2048 / 64 : 0);
        StepRows rows;
        for (int i = 0; i < n; i++) rows.decode(L, i);
        const int bound = loose ? 2048 : rows.bound();
        Case c = make_case(*dims, std::move(L), std::move(rows), bound);
        const double e = run(c, MlaMode::Absorbed);
        worst = std::max(worst, e);
        EXPECT_LT(e, dims->tol()) << dims->name << " n=" << n << " bound=" << bound;
      }
    }
    std::printf("[ mla per-row %-18s ] worst relative L2 error over n: %.3g\n", dims->name, worst);
  }
}

// Prefix-cache sharing: sequences 1..3 start with sequence 0's first blocks (one of them exactly its whole
// length), read as decode rows and as chunks (absorbed and expanded) in one call.
TEST_F(CudaMla, SharedPrefixBlocks) {
  for (const Dims* dims : {&kGlm, &kTiny}) {
    const std::vector<int> len = {700, 300, 1000, 256, 450};
    const std::vector<test::Share> share = {{1, 0, 4}, {2, 0, 4}, {3, 0, 4}, {4, 2, 7}};
    struct Step {
      std::vector<std::pair<int, int>> parts;  // (sequence, rows): rows 1 = a decode row
    };
    for (const Step& st : {Step{{{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}}}, Step{{{0, 1}, {1, 1}, {3, 1}, {2, 200}}},
                           Step{{{1, 300}}}, Step{{{4, 450}, {0, 1}, {3, 256}}}}) {
      for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Expanded}) {
        PagedLayout L = test::make_layout(len, rng, share);
        StepRows rows;
        for (auto [s, m] : st.parts) {
          if (m == 1) rows.decode(L, s);
          else rows.chunk(L, s, m);
        }
        const int bound = rows.bound();
        Case c = make_case(*dims, std::move(L), std::move(rows), bound);
        const double e = run(c, mode);
        EXPECT_LT(e, dims->tol()) << dims->name << " rows=" << c.n() << " runs=" << c.rows.runs.size()
                                  << (mode == MlaMode::Absorbed ? " absorbed" : " expanded");
      }
    }
  }
}

// Mixed steps as the scheduler makes them: decode rows and prompt chunks of several sequences, interleaved, in
// both modes (the fast path picks its form per part; v1 runs per run), decode stretches of <= 16 and > 16 rows.
TEST_F(CudaMla, MixedRuns) {
  for (const Dims* dims : {&kGlm, &kOddA, &kTiny}) {
    double worst = 0;
    // The last: 20 decode rows (cuBLAS projections) + a chunk.
    for (const std::vector<int>& runs_full :
         {std::vector<int>{1, 1, 1, 37, 1, 1, 100, 1}, std::vector<int>{17, 1}, std::vector<int>{1, 300},
          std::vector<int>{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 64}}) {
      std::vector<int> len;
      for (int m : runs_full) len.push_back(m + int(rng.next_u64() % 900));
      PagedLayout L = test::make_layout(len, rng);
      StepRows rows;
      for (size_t s = 0; s < runs_full.size(); s++) {
        if (runs_full[s] == 1) rows.decode(L, int(s));
        else rows.chunk(L, int(s), runs_full[s]);
      }
      const int bound = rows.bound() + 5;
      for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Expanded}) {
        Case c = make_case(*dims, L, rows, bound);
        const double e = run(c, mode);
        worst = std::max(worst, e);
        EXPECT_LT(e, dims->tol()) << dims->name << " runs=" << runs_full.size() << " rows=" << c.n()
                                  << (mode == MlaMode::Absorbed ? " absorbed" : " expanded");
      }
    }
    std::printf("[ mla mixed runs %-15s ] worst relative L2 error: %.3g\n", dims->name, worst);
  }
}

// The decode step as the engine runs it: captured once in a CUDA graph with bound = capacity, replayed at many
// positions with the positions (and the newest cache row) written between replays. One sequence (n = 1, and 4
// speculative rows) and batches of different sequences (per-row groups: 8 rows on the decode kernels, 32 on the
// cuBLAS projections), whose block tables and sequence ids are rewritten between replays too.
TEST_F(CudaMla, DecodeGraphCapturedOnceReplayedAtManyPositions) {
  auto* cg = dynamic_cast<CudaBackend*>(gpu.get());
  ASSERT_NE(cg, nullptr);
  cudaStream_t stream = static_cast<cudaStream_t>(cg->stream());
  const int cap = 4100, cap_blocks = (cap + 63) / 64;
  struct Shape {
    int n;
    bool per_row;
  };
  for (Shape sh : {Shape{1, false}, Shape{4, false}, Shape{8, true}, Shape{32, true}}) {
    const int n = sh.n, S = sh.per_row ? n : 1;
    // Every sequence holds `cap` tokens (all rows random): the replays use prefixes of them.
    PagedLayout L = test::make_layout(std::vector<int>(size_t(S), cap), rng, {}, cap_blocks);
    StepRows rows = chunk_rows(n, cap);
    if (sh.per_row) {
      rows = StepRows{};
      for (int i = 0; i < n; i++) rows.decode(L, i);
    }
    Case c = make_case(kGlm, std::move(L), std::move(rows), cap);
    const Positions P = c.dev();
    gpu->attention_mla(c.gout, c.gq, c.gpool, c.lg, P, c.d, MlaMode::Absorbed);  // warm-up: scratch sized here
    gpu->synchronize();

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    gpu->attention_mla(c.gout, c.gq, c.gpool, c.lg, P, c.d, MlaMode::Absorbed);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

    double worst = 0;
    for (int last : {0, 1, 5, 63, 64, 65, 700, 2047, 4099}) {
      if (sh.per_row) {
        // Two sequences trade block tables (the tables rewritten in place), and row i reads sequence
        // (i + shift) % n at its own position.
        const int a = int(rng.next_u64() % uint64_t(n)), b = int(rng.next_u64() % uint64_t(n));
        std::swap_ranges(c.L.tables.begin() + size_t(a) * c.L.max_blocks, c.L.tables.begin() + size_t(a + 1) * c.L.max_blocks,
                         c.L.tables.begin() + size_t(b) * c.L.max_blocks);
        gpu->from_host(c.gtables.data, c.L.tables.data(), c.L.tables.size() * 4);
        const int shift = int(rng.next_u64() % uint64_t(n));
        for (int i = 0; i < n; i++) {
          c.rows.seq[size_t(i)] = (i + shift) % n;
          c.rows.pos[size_t(i)] = i == 0 ? last : int(rng.next_u64() % uint64_t(last + 1));
        }
      } else {
        c.rows = chunk_rows(n, last + 1);
      }
      // A fresh newest row per row, as mla_cache_append would have written it before the attention.
      for (int i = 0; i < n; i++) {
        auto row = bf16(randn(size_t(c.d.cache_width())));
        const int64_t pr = c.L.row(c.rows.seq[size_t(i)], c.rows.pos[size_t(i)]);
        std::copy(row.begin(), row.end(), c.pool.begin() + pr * c.d.cache_width());
        gpu->from_host(static_cast<uint16_t*>(c.gpool.data) + pr * c.d.cache_width(), row.data(), row.size() * 2);
      }
      gpu->from_host(c.gpos.data, c.rows.pos.data(), size_t(n) * 4);
      gpu->from_host(c.gseq.data, c.rows.seq.data(), size_t(n) * 4);
      poison(c.gout);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      gpu->synchronize();
      const double e = rel_err(down(c.gout), reference(c), n);
      worst = std::max(worst, e);
      EXPECT_LT(e, kFastTol) << "graph replay n=" << n << " last position " << last;
    }
    std::printf("[ mla graph n=%d%s ] worst relative L2 error over replays: %.3g\n", n, sh.per_row ? " per-row" : "", worst);
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
    EXPECT_LT(check(kGlm, n, ctx, ctx + 3), 1e-4) << "v1 n=" << n << " ctx=" << ctx;
  cg->use_mla_v1(false);
}

}  // namespace
