// Every CUDA op against its CPU twin on fresh seeded random inputs, odd shapes included; device outputs are
// poisoned (NaN) before each run so an unwritten element fails. Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/paged_test_util.h"
#include "core/half.h"
#include "core/rng.h"
#include "model/glm4_moe_lite.h"

using namespace trellm;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
    gpu = make_cuda_backend(0);
  }
  void TearDown() override {
    for (void* p : ptrs) gpu->release(p);
  }
  // A device copy of host data with the given shape/dtype.
  template <typename T>
  TensorView up(const std::vector<T>& h, DType dt, std::initializer_list<int64_t> shape) {
    TensorView v(nullptr, dt, shape);
    EXPECT_EQ(v.nbytes(), h.size() * sizeof(T));
    v.data = gpu->alloc(v.nbytes());
    ptrs.push_back(v.data);
    gpu->from_host(v.data, h.data(), v.nbytes());
    return v;
  }
  TensorView poisoned(std::initializer_list<int64_t> shape) {
    TensorView v(nullptr, DType::F32, shape);
    std::vector<float> nan(size_t(v.numel()), kNaN);
    return up(nan, DType::F32, shape);
  }
  std::vector<float> down(TensorView v) {
    std::vector<float> h(size_t(v.numel()));
    gpu->to_host(h.data(), v.data, v.nbytes());
    return h;
  }
  static TensorView host(std::vector<float>& v, std::initializer_list<int64_t> shape) { return TensorView(v.data(), DType::F32, shape); }
  // Consecutive positions pos0 .. pos0+n-1 of one sequence whose blocks lie scattered over a pool of `cap` rows
  // (ceil((pos0 + n) / 64) + 1 blocks in a seeded order): the host copy (for the CPU) and a device copy.
  struct Pos {
    std::vector<int32_t> v, seq, table;
    int cap = 0;  // pool rows
    Positions host, dev;
  };
  Pos positions(int pos0, int n) {
    Pos p;
    for (int i = 0; i < n; i++) p.v.push_back(pos0 + i);
    p.seq.assign(size_t(n), 0);
    const int blocks = kv_blocks_for(pos0 + n) + 1;
    p.cap = blocks * kKvBlockTokens;
    p.table.resize(size_t(blocks));
    for (int b = 0; b < blocks; b++) p.table[size_t(b)] = b;
    for (int b = blocks - 1; b > 0; b--) std::swap(p.table[size_t(b)], p.table[rng.next_u64() % uint64_t(b + 1)]);
    p.host = Positions{TensorView(p.v.data(), DType::I32, {n}), pos0 + n, TensorView(p.seq.data(), DType::I32, {n}),
                       TensorView(p.table.data(), DType::I32, {1, blocks}), {}};
    p.dev = Positions{up(p.v, DType::I32, {n}), pos0 + n, up(p.seq, DType::I32, {n}), up(p.table, DType::I32, {1, blocks}), {}};
    return p;
  }
  // A bf16 device cache holding exactly `f` rounded to bf16; `f` is replaced by the rounded values.
  TensorView bf16_cache(std::vector<float>& f, int rows, int width) {
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); i++) {
      h[i] = f32_to_bf16(f[i]);
      f[i] = bf16_to_f32(h[i]);
    }
    return up(h, DType::BF16, {rows, width});
  }
  // MLA's kv_b [heads * (nope + v), kv_rank] in bf16: the CPU's view of wb and a device copy.
  std::pair<Linear, Linear> kv_b_linears(std::vector<uint16_t>& wb, const MlaDims& d) {
    Linear lc, lg;
    lc.in = lg.in = d.kv_rank;
    lc.out = lg.out = int64_t(d.heads) * (d.nope_dim + d.v_dim);
    lc.weight = TensorView(wb.data(), DType::BF16, {lc.out, lc.in});
    lg.weight = up(wb, DType::BF16, {lg.out, lg.in});
    return {lc, lg};
  }
  std::vector<float> down_bf16(TensorView v) {
    std::vector<uint16_t> h(size_t(v.numel()));
    gpu->to_host(h.data(), v.data, v.nbytes());
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); i++) f[i] = bf16_to_f32(h[i]);
    return f;
  }

  std::unique_ptr<Backend> gpu;
  CpuBackend cpu;
  std::vector<void*> ptrs;
  Rng rng{20261125};

  std::vector<float> randn(size_t n, float std = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = rng.normal() * std;
    return v;
  }
};

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); i++) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<uint16_t> to_bf16(const std::vector<float>& f) {
  std::vector<uint16_t> h(f.size());
  for (size_t i = 0; i < f.size(); i++) h[i] = f32_to_bf16(f[i]);
  return h;
}

TEST_F(CudaOps, ElementwiseNormRope) {
  for (auto [n, d] : std::vector<std::pair<int, int>>{{1, 1}, {3, 17}, {17, 333}, {33, 2048}}) {
    auto x = randn(size_t(n) * d, 2.0f), y = randn(size_t(n) * d), w = randn(d);
    TensorView gx = up(x, DType::F32, {n, d}), gy = up(y, DType::F32, {n, d}), gw = up(w, DType::F32, {d});
    std::vector<float> want(x.size());
    // rms_norm
    TensorView o = poisoned({n, d});
    gpu->rms_norm(o, gx, gw, 1e-5f);
    cpu.rms_norm(host(want, {n, d}), host(x, {n, d}), host(w, {d}), 1e-5f);
    EXPECT_LT(rel_err(down(o), want), 1e-6) << "rms_norm " << n << "x" << d;
    // add_rms_norm: h += y, out = norm(h)
    {
      std::vector<float> h = x, hw(x.size());
      TensorView gh = up(h, DType::F32, {n, d});
      o = poisoned({n, d});
      gpu->add_rms_norm(gh, gy, gw, 1e-5f, o);
      cpu.add_rms_norm(host(h, {n, d}), host(y, {n, d}), host(w, {d}), 1e-5f, host(hw, {n, d}));
      EXPECT_EQ(down(gh), h) << "add_rms_norm residual";
      EXPECT_LT(rel_err(down(o), hw), 1e-6) << "add_rms_norm norm";
    }
    // add
    o = poisoned({n, d});
    gpu->add(o, gx, gy);
    cpu.add(host(want, {n, d}), host(x, {n, d}), host(y, {n, d}));
    EXPECT_EQ(down(o), want) << "add";
    // silu_mul
    o = poisoned({n, d});
    gpu->silu_mul(o, gx, gy);
    cpu.silu_mul(host(want, {n, d}), host(x, {n, d}), host(y, {n, d}));
    EXPECT_LT(rel_err(down(o), want), 1e-6) << "silu_mul";
  }
  // RoPE on [n, heads, head_dim] at a large position: bit-identical angle arithmetic on both sides.
  const int n = 5, H = 3, hd = 40;
  auto x = randn(size_t(n) * H * hd);
  TensorView gx = up(x, DType::F32, {n, H, hd});
  Pos p = positions(150000, n);
  gpu->rope(gx, 8, p.dev, RopeParams{1e6f, 32});
  cpu.rope(host(x, {n, H, hd}), 8, p.host, RopeParams{1e6f, 32});
  EXPECT_LT(rel_err(down(gx), x), 1e-6);
}

TEST_F(CudaOps, EmbedAndCacheAppend) {
  const int V = 37, d = 50, n = 6;
  auto table = randn(size_t(V) * d);
  std::vector<int32_t> tok = {0, 36, 5, 5, 17, 1};
  TensorView gt = up(to_bf16(table), DType::BF16, {V, d}), gtok = up(tok, DType::I32, {n});
  TensorView o = poisoned({n, d});
  gpu->embed(o, gtok, gt);
  std::vector<float> want(size_t(n) * d);
  auto tb = to_bf16(table);
  cpu.embed(host(want, {n, d}), TensorView(tok.data(), DType::I32, {n}), TensorView(tb.data(), DType::BF16, {V, d}));
  EXPECT_EQ(down(o), want);

  // The GPU cache is bf16: its rows are the CPU's f32 rows rounded once (relative error <= 2^-9). Positions
  // 60..65 cross a block boundary of the scattered table.
  const int rank = 24, rope = 8, pos0 = 60;
  Pos p = positions(pos0, n);
  const int cap = p.cap;
  auto kv = randn(size_t(n) * (rank + rope)), w = randn(rank);
  std::vector<float> cache_h(size_t(cap) * (rank + rope), 0.0f);
  TensorView gc = bf16_cache(cache_h, cap, rank + rope);
  gpu->mla_cache_append(gc, up(kv, DType::F32, {n, rank + rope}), up(w, DType::F32, {rank}), 1e-6f, p.dev, RopeParams{1e4f, rope});
  cpu.mla_cache_append(host(cache_h, {cap, rank + rope}), host(kv, {n, rank + rope}), host(w, {rank}), 1e-6f, p.host, RopeParams{1e4f, rope});
  auto got = down_bf16(gc);
  for (size_t i = 0; i < got.size(); i++) ASSERT_NEAR(got[i], cache_h[i], std::fabs(cache_h[i]) * 0.0040 + 1e-30) << i;
}

// The fused op (one kernel on the GPU) against the two CPU ops it replaces: q rotated, cache rows written, rows
// outside [pos0, pos0 + n) untouched. GLM's decode shape (20 heads of 192 + 64, rank 512) and an odd one.
TEST_F(CudaOps, MlaRopeAppendFused) {
  struct Case { int n, H, nope, rope, rank, pos0; };
  for (const Case& c : {Case{1, 20, 192, 64, 512, 64}, Case{3, 20, 192, 64, 512, 7}, Case{5, 3, 24, 8, 40, 61}}) {
    const int hd = c.nope + c.rope, width = c.rank + c.rope;
    Pos p = positions(c.pos0, c.n);
    const int cap = p.cap;
    auto q = randn(size_t(c.n) * c.H * hd), kv = randn(size_t(c.n) * width), w = randn(c.rank);
    std::vector<float> cache_h = randn(size_t(cap) * width);  // old contents must survive outside the new rows
    TensorView gc = bf16_cache(cache_h, cap, width);
    TensorView gq = up(q, DType::F32, {c.n, c.H, hd});
    gpu->mla_rope_append(gq, c.nope, gc, up(kv, DType::F32, {c.n, width}), up(w, DType::F32, {c.rank}), 1e-6f, p.dev,
                         RopeParams{1e4f, c.rope});
    cpu.rope(host(q, {c.n, c.H, hd}), c.nope, p.host, RopeParams{1e4f, c.rope});
    cpu.mla_cache_append(host(cache_h, {cap, width}), host(kv, {c.n, width}), host(w, {c.rank}), 1e-6f, p.host,
                         RopeParams{1e4f, c.rope});
    EXPECT_LT(rel_err(down(gq), q), 1e-6) << "q rope, H=" << c.H;
    auto got = down_bf16(gc);
    for (size_t i = 0; i < got.size(); i++) ASSERT_NEAR(got[i], cache_h[i], std::fabs(cache_h[i]) * 0.0040 + 1e-30) << i;
  }
}

// MLA from the projections on: rope + cache append + attention as one op. With GLM's latent dims the GPU folds
// the first two into the attention's q_lat kernel for decode (n <= 16); checked against the three CPU ops on
// fresh inputs: the output (the tensor-core path's bf16 rounding, see test_cuda_mla: 1.5e-2) and every cache
// row (the new rows as the append kernel writes them, the old ones untouched). n = 17 takes the unfused ops.
TEST_F(CudaOps, MlaAttentionWithRopeAppendGlm) {
  const Config glm = Config::glm47_flash();  // 20 heads, nope 192, v 256, rank 512, rope 64, theta 1e6
  const MlaDims d = glm.mla();
  const RopeParams rp = glm.rope();
  for (auto [n, pos0] : std::vector<std::pair<int, int>>{{1, 0}, {1, 300}, {3, 41}, {17, 5}}) {
    Pos p = positions(pos0, n);
    const int per = d.nope_dim + d.v_dim, cap = p.cap, W = d.cache_width();
    auto wb = to_bf16(randn(size_t(d.heads) * per * d.kv_rank, 0.05f));
    const auto [lc, lg] = kv_b_linears(wb, d);
    auto cache = randn(size_t(cap) * W), q = randn(size_t(n) * d.heads * d.q_head_dim()), kv = randn(size_t(n) * W);
    auto nw = randn(d.kv_rank);
    TensorView gc = bf16_cache(cache, cap, W), gq = up(q, DType::F32, {n, d.heads, d.q_head_dim()});
    TensorView o = poisoned({n, d.heads * d.v_dim});
    gpu->attention_mla_append(o, gq, d.nope_dim, gc, up(kv, DType::F32, {n, W}), up(nw, DType::F32, {d.kv_rank}), 1e-6f, lg,
                              p.dev, d, rp, MlaMode::Absorbed);
    std::vector<float> want(size_t(n) * d.heads * d.v_dim);
    cpu.rope(host(q, {n, d.heads, d.q_head_dim()}), d.nope_dim, p.host, rp);
    cpu.mla_cache_append(host(cache, {cap, W}), host(kv, {n, W}), host(nw, {d.kv_rank}), 1e-6f, p.host, rp);
    for (auto& v : cache) v = bf16_to_f32(f32_to_bf16(v));  // the GPU cache holds bf16 rows
    cpu.attention_mla(host(want, {n, d.heads * d.v_dim}), host(q, {n, d.heads, d.q_head_dim()}), host(cache, {cap, W}), lc,
                      p.host, d, MlaMode::Absorbed);
    EXPECT_LT(rel_err(down(o), want), 1.5e-2) << "n=" << n << " pos0=" << pos0;
    auto got = down_bf16(gc);
    for (size_t i = 0; i < got.size(); i++) ASSERT_NEAR(got[i], cache[i], std::fabs(cache[i]) * 0.0080 + 1e-30) << i;
  }
}

// The rows of a batched step (decode rows of different sequences, some sharing a prefix block, and prompt chunks,
// on scattered blocks) through the cache append kernel and the attention op with the rope + append folded in (one
// stretch of <= 16 decode rows or one short run) or not (more rows, mixed runs), against the CPU ops on the same
// bf16 pool: the output, and every pool row (the new rows at their pool rows; all others, NaN rows included,
// untouched).
TEST_F(CudaOps, PagedAppendAndAttentionOfBatchedRows) {
  const Config glm = Config::glm47_flash();
  const MlaDims d = glm.mla();
  const RopeParams rp = glm.rope();
  const int W = d.cache_width(), per = d.nope_dim + d.v_dim;
  auto wb = to_bf16(randn(size_t(d.heads) * per * d.kv_rank, 0.05f));
  const auto [lc, lg] = kv_b_linears(wb, d);
  auto nw = randn(d.kv_rank);
  const TensorView gnw = up(nw, DType::F32, {d.kv_rank});
  auto check_pool = [&](const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, const char* what) {
    for (size_t i = 0; i < got.size(); i++) {
      const float g = bf16_to_f32(got[i]), w = bf16_to_f32(want[i]);
      if (std::isnan(w)) ASSERT_TRUE(std::isnan(g)) << what << ": pool value " << i << " was written";
      else ASSERT_NEAR(g, w, std::fabs(w) * 0.0080 + 1e-30) << what << ": pool value " << i;
    }
  };
  for (const std::vector<int>& runs : {std::vector<int>{1}, std::vector<int>{1, 1, 1, 1, 1}, std::vector<int>(16, 1),
                                       std::vector<int>(20, 1), std::vector<int>{1, 1, 30}, std::vector<int>{7},
                                       std::vector<int>{40}}) {
    const int S = int(runs.size());
    std::vector<int> len(static_cast<size_t>(S));
    for (int s = 0; s < S; s++) len[size_t(s)] = runs[size_t(s)] + 64 + int(rng.next_u64() % 700);
    std::vector<test::Share> share;
    if (S >= 2) share.push_back({1, 0, 1});  // both are >= 65 tokens long: the first block is common
    test::PagedLayout L = test::make_layout(len, rng, share);
    test::StepRows rows;
    for (int s = 0; s < S; s++) {
      if (runs[size_t(s)] == 1) rows.decode(L, s);
      else rows.chunk(L, s, runs[size_t(s)]);
    }
    const int n = rows.n(), bound = rows.bound();
    auto pool = test::make_pool(L, W, rng);
    auto q = randn(size_t(n) * d.heads * d.q_head_dim()), kv = randn(size_t(n) * W);
    Positions hp = test::host_positions(rows, L, bound);
    Positions dp = hp;
    dp.pos = up(rows.pos, DType::I32, {n});
    dp.seq = up(rows.seq, DType::I32, {n});
    dp.tables = up(L.tables, DType::I32, {L.sequences(), L.max_blocks});
    const TensorView gkv = up(kv, DType::F32, {n, W});

    // The append kernel alone.
    {
      TensorView gpool = up(pool, DType::BF16, {L.pool_rows(), W});
      std::vector<uint16_t> want = pool;
      gpu->mla_cache_append(gpool, gkv, gnw, 1e-6f, dp, rp);
      cpu.mla_cache_append(TensorView(want.data(), DType::BF16, {L.pool_rows(), W}), host(kv, {n, W}), host(nw, {d.kv_rank}),
                           1e-6f, hp, rp);
      std::vector<uint16_t> got(pool.size());
      gpu->to_host(got.data(), gpool.data, got.size() * 2);
      check_pool(got, want, "mla_cache_append");
    }
    // Rope + append + attention as one op.
    TensorView gpool = up(pool, DType::BF16, {L.pool_rows(), W});
    TensorView gq = up(q, DType::F32, {n, d.heads, d.q_head_dim()});
    TensorView o = poisoned({n, d.heads * d.v_dim});
    gpu->attention_mla_append(o, gq, d.nope_dim, gpool, gkv, gnw, 1e-6f, lg, dp, d, rp, MlaMode::Absorbed);
    std::vector<float> want(size_t(n) * d.heads * d.v_dim);
    cpu.rope(host(q, {n, d.heads, d.q_head_dim()}), d.nope_dim, hp, rp);
    const TensorView hpool(pool.data(), DType::BF16, {L.pool_rows(), W});
    cpu.mla_cache_append(hpool, host(kv, {n, W}), host(nw, {d.kv_rank}), 1e-6f, hp, rp);
    cpu.attention_mla(host(want, {n, d.heads * d.v_dim}), host(q, {n, d.heads, d.q_head_dim()}), hpool, lc, hp, d,
                      MlaMode::Absorbed);
    EXPECT_LT(rel_err(down(o), want), 1.5e-2) << "runs=" << S << " rows=" << n;
    std::vector<uint16_t> got(pool.size());
    gpu->to_host(got.data(), gpool.data, got.size() * 2);
    check_pool(got, pool, "attention_mla_append");
  }
}

TEST_F(CudaOps, DenseMatmulGemvAndCublas) {
  for (DType dt : {DType::BF16, DType::F16, DType::F32})
    for (auto [n, in, out] : std::vector<std::tuple<int, int, int>>{{1, 64, 33}, {3, 127, 17}, {9, 50, 40}, {17, 333, 129}, {64, 200, 77}, {65, 64, 24}, {127, 256, 300}, {200, 96, 64}}) {
      auto wf = randn(size_t(out) * in, 0.1f), x = randn(size_t(n) * in), b = randn(out);
      std::vector<uint16_t> wh(wf.size());
      for (size_t i = 0; i < wf.size(); i++) {
        wh[i] = dt == DType::BF16 ? f32_to_bf16(wf[i]) : f32_to_f16(wf[i]);
        if (dt != DType::F32) wf[i] = dt == DType::BF16 ? bf16_to_f32(wh[i]) : f16_to_f32(wh[i]);
      }
      Linear lc, lg;
      lc.in = lg.in = in;
      lc.out = lg.out = out;
      lc.weight = dt == DType::F32 ? TensorView(wf.data(), DType::F32, {out, in}) : TensorView(wh.data(), dt, {out, in});
      lg.weight = dt == DType::F32 ? up(wf, DType::F32, {out, in}) : up(wh, dt, {out, in});
      lc.bias = host(b, {out});
      lg.bias = up(b, DType::F32, {out});
      std::vector<float> want(size_t(n) * out);
      cpu.matmul(host(want, {n, out}), host(x, {n, in}), lc);
      TensorView o = poisoned({n, out});
      gpu->matmul(o, up(x, DType::F32, {n, in}), lg);
      // n <= 8: the f32 GEMV; 8 < n <= 64: cuBLAS on activations split into two 16-bit terms (~2^-17 relative
      // each for bf16, 2^-22 for fp16); n > 64: cuBLAS with activations rounded to the weight dtype (bf16: 2^-9).
      const double tol = n <= 8 || dt == DType::F32 ? 1e-5 : n <= 64 ? 3e-5 : (dt == DType::BF16 ? 1e-2 : 2e-3);
      EXPECT_LT(rel_err(down(o), want), tol) << dtype_name(dt) << " n=" << n << " in=" << in << " out=" << out;
    }
}

TEST_F(CudaOps, MlaAttentionBothForms) {
  MlaDims d;
  d.heads = 5;
  d.kv_rank = 48;
  d.rope_dim = 16;
  d.nope_dim = 24;
  d.v_dim = 40;
  d.scale = 1.0f / std::sqrt(40.0f);
  for (auto [n, pos0] : std::vector<std::pair<int, int>>{{1, 0}, {1, 300}, {3, 7}, {17, 0}, {33, 250}, {127, 1}}) {
    Pos p = positions(pos0, n);
    const int per = d.nope_dim + d.v_dim, cap = p.cap;
    auto w = randn(size_t(d.heads) * per * d.kv_rank, 0.2f);
    auto wb = to_bf16(w);
    const auto [lc, lg] = kv_b_linears(wb, d);
    auto cache = randn(size_t(cap) * d.cache_width()), q = randn(size_t(n) * d.heads * d.q_head_dim());
    TensorView gc = bf16_cache(cache, cap, d.cache_width()), gq = up(q, DType::F32, {n, d.heads, d.q_head_dim()});
    for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Expanded}) {
      std::vector<float> want(size_t(n) * d.heads * d.v_dim);
      cpu.attention_mla(host(want, {n, d.heads * d.v_dim}), host(q, {n, d.heads, d.q_head_dim()}), host(cache, {cap, d.cache_width()}), lc, p.host, d, mode);
      TensorView o = poisoned({n, d.heads * d.v_dim});
      gpu->attention_mla(o, gq, gc, lg, p.dev, d, mode);
      EXPECT_LT(rel_err(down(o), want), 2e-5) << (mode == MlaMode::Absorbed ? "absorbed" : "expanded") << " n=" << n << " pos0=" << pos0;
    }
  }
}

TEST_F(CudaOps, MoeRouteAndDenseExperts) {
  for (auto [m, E, K, groups, tg] : std::vector<std::tuple<int, int, int, int, int>>{{1, 8, 2, 1, 1}, {17, 64, 4, 1, 1}, {5, 16, 3, 4, 2}}) {
    const int hidden = 72, inter = 20;
    auto x = randn(size_t(m) * hidden), gate = randn(size_t(E) * hidden, 0.3f), bias = randn(E, 0.3f);
    auto gb = to_bf16(gate);
    MoeRouting r;
    r.n_experts = E;
    r.top_k = K;
    r.n_group = groups;
    r.topk_group = tg;
    r.routed_scaling_factor = 1.8f;
    std::vector<float> wc(size_t(m) * K);
    std::vector<int32_t> ic(size_t(m) * K);
    cpu.moe_route(host(wc, {m, K}), TensorView(ic.data(), DType::I32, {m, K}), host(x, {m, hidden}),
                  TensorView(gb.data(), DType::BF16, {E, hidden}), host(bias, {E}), r);
    TensorView gw = poisoned({m, K});
    std::vector<int32_t> minus(size_t(m) * K, -1);
    TensorView gi = up(minus, DType::I32, {m, K});
    TensorView gx = up(x, DType::F32, {m, hidden});
    gpu->moe_route(gw, gi, gx, up(gb, DType::BF16, {E, hidden}), up(bias, DType::F32, {E}), r);
    std::vector<int32_t> ig(ic.size());
    gpu->to_host(ig.data(), gi.data, ig.size() * 4);
    EXPECT_EQ(ig, ic) << "expert choice m=" << m << " E=" << E;
    EXPECT_LT(rel_err(down(gw), wc), 1e-6);

    // Experts: bf16 weights; E experts + a shared one of twice the intermediate size.
    std::vector<std::vector<uint16_t>> wts;
    wts.reserve(3 * (E + 1));
    std::vector<Expert> ec(E), eg(E);
    Expert sc, sg;
    for (int e = 0; e <= E; e++) {
      const int I = e == E ? 2 * inter : inter;
      Expert& c = e == E ? sc : ec[e];
      Expert& g = e == E ? sg : eg[e];
      Linear* lcs[3] = {&c.gate, &c.up, &c.down};
      Linear* lgs[3] = {&g.gate, &g.up, &g.down};
      for (int p = 0; p < 3; p++) {
        const int64_t out = p == 2 ? hidden : I, in = p == 2 ? I : hidden;
        wts.push_back(to_bf16(randn(size_t(out * in), 0.2f)));
        lcs[p]->in = lgs[p]->in = in;
        lcs[p]->out = lgs[p]->out = out;
        lcs[p]->weight = TensorView(wts.back().data(), DType::BF16, {out, in});
        lgs[p]->weight = up(wts.back(), DType::BF16, {out, in});
      }
    }
    std::vector<float> want(size_t(m) * hidden);
    cpu.moe_ffn(host(want, {m, hidden}), host(x, {m, hidden}), host(wc, {m, K}), TensorView(ic.data(), DType::I32, {m, K}), ec, &sc);
    TensorView o = poisoned({m, hidden});
    gpu->moe_ffn(o, gx, gw, gi, eg, &sg);
    EXPECT_LT(rel_err(down(o), want), 1e-5) << "moe_ffn m=" << m;
  }
}

}  // namespace

namespace {

// The device sampler draws the same tokens as the CPU reference (same thresholds, same counter-based noise).
// Float sums of the top-p mass differ from the CPU's double sums in the last bits, so a draw that lands exactly
// on the top-p boundary could differ: we require >= 98% identical over 160 draws and every GPU token inside the
// top-k set.
TEST_F(CudaOps, SampleStepMatchesCpuReference) {
  const int64_t V = 154880;
  auto l = randn(size_t(V), 3.0f);
  l[77] = NAN;
  l[78] = -INFINITY;
  TensorView gl = up(l, DType::F32, {1, V});
  std::vector<SamplingParams> cases(4);
  cases[0].temperature = 0;
  cases[1].temperature = 1.0f;
  cases[2].temperature = 0.7f, cases[2].top_k = 40, cases[2].top_p = 0.9f;
  cases[3].temperature = 1.1f, cases[3].top_p = 0.95f, cases[3].min_p = 0.05f;
  int same = 0, total = 0;
  std::vector<int32_t> zero = {0};
  for (size_t c = 0; c < cases.size(); c++) {
    SamplingParams p = cases[c];
    p.seed = 100 + c;
    std::vector<uint8_t> pb(sizeof p);
    std::memcpy(pb.data(), &p, sizeof p);
    TensorView gp = up(pb, DType::U8, {int64_t(sizeof p)});
    std::vector<int32_t> hist(64, 0);
    TensorView gh = up(hist, DType::I32, {64}), gt = up(zero, DType::I32, {1}), gpos = up(zero, DType::I32, {1});
    for (int s = 0; s < 40; s++) gpu->sample_step(gl, gp, gt, gpos, gh);
    gpu->to_host(hist.data(), gh.data, hist.size() * 4);
    ASSERT_EQ(hist[0], 40);
    std::vector<float> sorted = l;
    std::sort(sorted.begin(), sorted.end(), [](float a, float b) { return std::isnan(b) || (!std::isnan(a) && a > b); });
    for (int s = 0; s < 40; s++) {
      const int32_t want = cpu::sample_token(l.data(), V, p, uint64_t(s));
      same += hist[1 + s] == want;
      total++;
      if (p.top_k > 0) EXPECT_GE(l[hist[1 + s]], sorted[p.top_k - 1]) << "outside the top-k";
      EXPECT_TRUE(std::isfinite(l[hist[1 + s]]));
    }
    std::vector<int32_t> posv(1);
    gpu->to_host(posv.data(), gpos.data, 4);
    EXPECT_EQ(posv[0], 40);
  }
  EXPECT_GE(same, total * 98 / 100) << same << " of " << total << " draws identical";
}

// Batched sampling: every row with its own params and noise step, greedy and sampled rows in one call, the same
// tokens as cpu::sample_token per row (greedy rows exactly; sampled rows >= 98% identical, as for sample_step).
TEST_F(CudaOps, SampleRowsMatchesCpuPerRow) {
  for (int64_t V : {int64_t(154880), int64_t(1000)}) {
    std::vector<SamplingParams> p(7);
    p[0].temperature = 0;
    p[1].temperature = 1.0f;
    p[2].temperature = 0.7f, p[2].top_k = 40, p[2].top_p = 0.9f;
    p[3].temperature = 0;
    p[4].temperature = 1.1f, p[4].top_p = 0.95f, p[4].min_p = 0.05f;
    p[5].temperature = 0.5f, p[5].top_k = 1;
    p[6].temperature = 1.3f, p[6].top_k = 5;
    const int n = int(p.size());
    for (int i = 0; i < n; i++) p[size_t(i)].seed = 1000 + uint64_t(i);
    std::vector<uint8_t> pb(p.size() * sizeof(SamplingParams));
    std::memcpy(pb.data(), p.data(), pb.size());
    const TensorView gp = up(pb, DType::U8, {int64_t(pb.size())});
    int same = 0, total = 0;
    for (int round = 0; round < 20; round++) {
      auto l = randn(size_t(n) * V, 3.0f);
      l[77] = NAN, l[78] = -INFINITY, l[size_t(3 * V + 5)] = INFINITY;
      std::vector<int32_t> steps(static_cast<size_t>(n)), minus(size_t(n), -1);
      for (auto& s : steps) s = int32_t(rng.next_u64() % 5000);
      TensorView gt = up(minus, DType::I32, {n});
      gpu->sample_rows(up(l, DType::F32, {n, V}), gp, up(steps, DType::I32, {n}), gt);
      std::vector<int32_t> got(static_cast<size_t>(n)), want(static_cast<size_t>(n));
      gpu->to_host(got.data(), gt.data, got.size() * 4);
      cpu.sample_rows(host(l, {n, V}), TensorView(pb.data(), DType::U8, {int64_t(pb.size())}),
                      TensorView(steps.data(), DType::I32, {n}), TensorView(want.data(), DType::I32, {n}));
      for (int i = 0; i < n; i++) {
        ASSERT_GE(got[size_t(i)], 0) << "row " << i << " not written";
        ASSERT_LT(got[size_t(i)], V);
        EXPECT_TRUE(std::isfinite(l[size_t(i) * V + got[size_t(i)]])) << "row " << i;
        if (p[size_t(i)].temperature == 0 || p[size_t(i)].top_k == 1) {
          EXPECT_EQ(got[size_t(i)], want[size_t(i)]) << "greedy row " << i << " V=" << V;
        } else {
          same += got[size_t(i)] == want[size_t(i)];
          total++;
        }
      }
    }
    EXPECT_GE(same, total * 98 / 100) << same << " of " << total << " sampled draws identical, V=" << V;
  }
}

TEST_F(CudaOps, SpecVerifyAndPrepareMatchCpu) {
  // m sequences of K drafts over vocabularies of GLM's size and odd ones; drafts drawn from q (the target plus
  // noise: some accepted, some not) by the CPU sampler, greedy rows with a wrong draft somewhere. Greedy outcomes
  // must be identical; sampled ones (thresholds and exp differ in the last bits) nearly always.
  int same = 0, total = 0;
  for (int64_t V : {int64_t(154880), int64_t(333), int64_t(2)}) {
    for (int K : {0, 1, 3, 4}) {
      for (int m : {1, 3, 9}) {
        const int S = 16;
        std::vector<SamplingParams> p(static_cast<size_t>(m));
        for (int i = 0; i < m; i++) {
          p[size_t(i)].temperature = i % 3 == 0 ? 0.0f : 0.6f + 0.2f * float(i % 4);
          p[size_t(i)].top_k = i % 4 == 2 ? 20 : 0;
          p[size_t(i)].top_p = i % 5 == 4 ? 0.9f : 1.0f;
          p[size_t(i)].seed = 50 + uint64_t(i) + uint64_t(V);
        }
        auto target = randn(size_t(m) * (K + 1) * V, 3.0f);
        std::vector<float> draft(size_t(std::max(K, 1)) * S * V, 0.0f);
        std::vector<int32_t> src(static_cast<size_t>(m)), tokens(size_t(m) * (K + 1)), steps(static_cast<size_t>(m));
        for (int i = 0; i < m; i++) {
          src[size_t(i)] = int32_t((i * 5 + 3) % S);
          steps[size_t(i)] = int32_t(rng.next_u64() % 1000);
          for (int j = 0; j < K; j++) {
            float* q = draft.data() + (int64_t(j) * S + src[size_t(i)]) * V;
            const float* t = target.data() + (int64_t(i) * (K + 1) + j) * V;
            for (int64_t v = 0; v < V; v++) q[v] = t[v] + 1.5f * (rng.uniform() * 2 - 1);
            SamplingParams dp = p[size_t(i)];
            dp.seed ^= kSpecDraftSalt;
            int32_t d = cpu::sample_token(q, V, dp, uint64_t(steps[size_t(i)] + j));
            if (dp.temperature == 0 && j == K - 1) d = int32_t((d + 1) % V);  // a greedy draft the target rejects
            tokens[size_t(i * (K + 1) + 1 + j)] = d;
          }
        }
        std::vector<uint8_t> pb(p.size() * sizeof(SamplingParams));
        std::memcpy(pb.data(), p.data(), pb.size());
        std::vector<int32_t> want(size_t(m) * (K + 2)), poison(size_t(m) * (K + 2), -5);
        SpecVerify v;
        v.K = K;
        v.draft_stride = S;
        v.target = host(target, {m * (K + 1), V});
        v.draft = host(draft, {int64_t(std::max(K, 1)) * S, V});
        v.src = TensorView(src.data(), DType::I32, {m});
        v.tokens = TensorView(tokens.data(), DType::I32, {m * (K + 1)});
        v.params = TensorView(pb.data(), DType::U8, {int64_t(pb.size())});
        v.steps = TensorView(steps.data(), DType::I32, {m});
        v.out = TensorView(want.data(), DType::I32, {m * (K + 2)});
        cpu.spec_verify(v);
        SpecVerify g = v;
        g.target = up(target, DType::F32, {m * (K + 1), V});
        g.draft = up(draft, DType::F32, {int64_t(std::max(K, 1)) * S, V});
        g.src = up(src, DType::I32, {m});
        g.tokens = up(tokens, DType::I32, {m * (K + 1)});
        g.params = up(pb, DType::U8, {int64_t(pb.size())});
        g.steps = up(steps, DType::I32, {m});
        g.out = up(poison, DType::I32, {m * (K + 2)});
        gpu->spec_verify(g);
        std::vector<int32_t> got(want.size());
        gpu->to_host(got.data(), g.out.data, got.size() * 4);
        for (int i = 0; i < m; i++) {
          const int32_t* w = &want[size_t(i) * (K + 2)];
          const int32_t* o = &got[size_t(i) * (K + 2)];
          ASSERT_GE(o[0], 0) << "sequence " << i << " not written";
          ASSERT_LE(o[0], K);
          for (int j = 1; j < K + 2; j++) ASSERT_TRUE(o[j] >= 0 && o[j] < V) << "sequence " << i << " token " << j;
          const bool equal = std::equal(w, w + K + 2, o);
          if (p[size_t(i)].temperature == 0) {
            EXPECT_TRUE(equal) << "greedy sequence " << i << " V " << V << " K " << K;
          } else {
            same += equal;
            total++;
          }
        }
        if (K == 0) continue;
        // spec_prepare after it: step 0, then step 1, from the GPU's own result
        std::vector<int32_t> pos(size_t(m) * (K + 1));
        for (size_t r = 0; r < pos.size(); r++) pos[r] = int32_t(40 + 3 * r);
        std::vector<int32_t> drafts(static_cast<size_t>(m));
        for (auto& d : drafts) d = int32_t(rng.next_u64() % uint64_t(V));
        std::vector<int32_t> h_tok(pos.size(), -1), h_pos = pos, h_seq(pos.size(), -1), h_idx(size_t(m), -1),
            h_base(size_t(m), -1), h_steps(size_t(m), -1);
        auto cpu_view = [](std::vector<int32_t>& x) { return TensorView(x.data(), DType::I32, {int64_t(x.size())}); };
        std::vector<int32_t> res = got;
        SpecPrepare cp;
        cp.K = K;
        cp.result = cpu_view(res);
        cp.steps = cpu_view(steps);
        cp.base = cpu_view(h_base);
        cp.tokens = cpu_view(h_tok);
        cp.pos = cpu_view(h_pos);
        cp.seq = cpu_view(h_seq);
        cp.logit_idx = cpu_view(h_idx);
        cp.steps_out = cpu_view(h_steps);
        cp.drafts = cpu_view(drafts);
        SpecPrepare gp = cp;
        std::vector<int32_t> m1(pos.size(), -1), ms(size_t(m), -1);
        gp.result = g.out;
        gp.steps = g.steps;
        gp.base = up(ms, DType::I32, {m});
        gp.tokens = up(m1, DType::I32, {int64_t(m1.size())});
        gp.pos = up(pos, DType::I32, {int64_t(pos.size())});
        gp.seq = up(m1, DType::I32, {int64_t(m1.size())});
        gp.logit_idx = up(ms, DType::I32, {m});
        gp.steps_out = up(ms, DType::I32, {m});
        gp.drafts = up(drafts, DType::I32, {m});
        for (int j : {0, 1}) {
          if (j >= K) break;
          cp.j = gp.j = j;
          cpu.spec_prepare(cp);
          gpu->spec_prepare(gp);
          auto back = [&](TensorView t) {
            std::vector<int32_t> h(size_t(t.numel()));
            gpu->to_host(h.data(), t.data, h.size() * 4);
            return h;
          };
          EXPECT_EQ(back(gp.tokens), h_tok) << "tokens, step " << j;
          EXPECT_EQ(back(gp.pos), h_pos) << "pos, step " << j;
          EXPECT_EQ(back(gp.seq), h_seq) << "seq, step " << j;
          EXPECT_EQ(back(gp.logit_idx), h_idx) << "logit_idx, step " << j;
          EXPECT_EQ(back(gp.base), h_base) << "base, step " << j;
          EXPECT_EQ(back(gp.steps_out), h_steps) << "steps_out, step " << j;
        }
      }
    }
  }
  EXPECT_GE(same, total * 95 / 100) << same << " of " << total << " sampled verifications identical";
}

// The calibration observer (Backend::set_linear_observer) on the GPU reports what the CPU's reports: the same
// Linears in the same order, each with the same rows: matmul's input as given, matmul_pair's twice, rms_norm_matmul's
// normalised input, moe_ffn's experts one by one over exactly the rows routed to them (then the shared expert), and
// kv_b_proj's latents from attention_mla_append (bf16 in the GPU's cache). The products keep their results.
TEST_F(CudaOps, CalibrationObserverSeesTheCpuRows) {
  struct Seen {
    std::string name;
    int64_t rows, cols;
    std::vector<float> x;
  };
  std::map<const Linear*, std::string> names;
  std::vector<Seen> on_cpu, on_gpu;
  cpu.set_linear_observer([&](const Linear& w, TensorView x) {
    on_cpu.push_back({names.at(&w), x.rows(), x.cols(), std::vector<float>(x.ptr<float>(), x.ptr<float>() + x.numel())});
  });
  gpu->set_linear_observer([&](const Linear& w, TensorView x) {
    Seen s{names.at(&w), x.rows(), x.cols(), std::vector<float>(size_t(x.numel()))};
    gpu->to_host(s.x.data(), x.data, x.nbytes());
    on_gpu.push_back(std::move(s));
  });
  std::vector<std::vector<uint16_t>> keep;  // bf16 weights the CPU Linears point to
  auto linear = [&](const std::string& name, int64_t out, int64_t in, Linear& lc, Linear& lg) {
    keep.push_back(to_bf16(randn(size_t(out * in), 0.2f)));
    lc.in = lg.in = in;
    lc.out = lg.out = out;
    lc.weight = TensorView(keep.back().data(), DType::BF16, {out, in});
    lg.weight = up(keep.back(), DType::BF16, {out, in});
    names[&lc] = names[&lg] = name;
  };
  const int hidden = 72, inter = 20, E = 16, K = 3, m = 70;
  // Dense products: 100 rows (cuBLAS), a pair of 9, a normed product of 5.
  Linear ac, ag, bc, bg, cc, cg;
  linear("a", 33, hidden, ac, ag);
  linear("b", 41, hidden, bc, bg);
  linear("c", 17, hidden, cc, cg);
  auto x = randn(size_t(100) * hidden), nw = randn(hidden);
  std::vector<float> yc(100 * 41), yc2(100 * 41);
  cpu.matmul(host(yc, {100, 33}), host(x, {100, hidden}), ac);
  gpu->matmul(poisoned({100, 33}), up(x, DType::F32, {100, hidden}), ag);
  cpu.matmul_pair(host(yc, {9, 33}), host(yc2, {9, 41}), host(x, {9, hidden}), ac, bc);
  TensorView g9 = up(std::vector<float>(x.begin(), x.begin() + 9 * hidden), DType::F32, {9, hidden});
  gpu->matmul_pair(poisoned({9, 33}), poisoned({9, 41}), g9, ag, bg);
  auto x5 = std::vector<float>(x.begin(), x.begin() + 5 * hidden);
  TensorView g5 = up(x5, DType::F32, {5, hidden});
  cpu.rms_norm_matmul(host(yc, {5, 17}), host(x5, {5, hidden}), host(nw, {hidden}), 1e-6f, cc);
  gpu->rms_norm_matmul(poisoned({5, 17}), g5, up(nw, DType::F32, {hidden}), 1e-6f, cg);
  // MoE: distinct random experts per token (some experts get no row), random weights, a shared expert.
  std::vector<Expert> ec(E), eg(E);
  Expert sc, sg;
  for (int e = 0; e <= E; e++) {
    Expert& c = e == E ? sc : ec[size_t(e)];
    Expert& g = e == E ? sg : eg[size_t(e)];
    const std::string p = e == E ? "shared." : str_cat("expert", e, ".");
    linear(p + "gate", inter, hidden, c.gate, g.gate);
    linear(p + "up", inter, hidden, c.up, g.up);
    linear(p + "down", hidden, inter, c.down, g.down);
  }
  std::vector<int32_t> ids(size_t(m) * K);
  for (int i = 0; i < m; i++)
    for (int k = 0; k < K; k++) {
      int32_t e;
      do e = int32_t(rng.next_u64() % (E - 3));  // experts 13..15 see no token
      while (std::find(ids.begin() + i * K, ids.begin() + i * K + k, e) != ids.begin() + i * K + k);
      ids[size_t(i * K + k)] = e;
    }
  auto wts = randn(size_t(m) * K, 0.5f), xm = randn(size_t(m) * hidden);
  std::vector<float> want(size_t(m) * hidden);
  cpu.moe_ffn(host(want, {m, hidden}), host(xm, {m, hidden}), host(wts, {m, K}), TensorView(ids.data(), DType::I32, {m, K}),
              ec, &sc);
  TensorView o = poisoned({m, hidden});
  gpu->moe_ffn(o, up(xm, DType::F32, {m, hidden}), up(wts, DType::F32, {m, K}), up(ids, DType::I32, {m, K}), eg, &sg);
  EXPECT_LT(rel_err(down(o), want), 1e-2) << "observed moe_ffn";
  // MLA on GLM's dims: kv_b's inputs are the 7 appended tokens' latents.
  const Config glm = Config::glm47_flash();
  const MlaDims d = glm.mla();
  const RopeParams rp = glm.rope();
  Pos p = positions(61, 7);
  const int W = d.cache_width(), n = 7;
  Linear kc, kg;
  linear("kv_b", int64_t(d.heads) * (d.nope_dim + d.v_dim), d.kv_rank, kc, kg);
  auto cache = randn(size_t(p.cap) * W), q = randn(size_t(n) * d.heads * d.q_head_dim()), kv = randn(size_t(n) * W);
  auto knw = randn(d.kv_rank);
  TensorView gc = bf16_cache(cache, p.cap, W);
  gpu->attention_mla_append(poisoned({n, d.heads * d.v_dim}), up(q, DType::F32, {n, d.heads, d.q_head_dim()}), d.nope_dim, gc,
                            up(kv, DType::F32, {n, W}), up(knw, DType::F32, {d.kv_rank}), 1e-6f, kg, p.dev, d, rp,
                            MlaMode::Absorbed);
  std::vector<float> oc(size_t(n) * d.heads * d.v_dim);
  cpu.attention_mla_append(host(oc, {n, d.heads * d.v_dim}), host(q, {n, d.heads, d.q_head_dim()}), d.nope_dim,
                           host(cache, {p.cap, W}), host(kv, {n, W}), host(knw, {d.kv_rank}), 1e-6f, kc, p.host, d, rp,
                           MlaMode::Absorbed);
  cpu.set_linear_observer(nullptr);
  gpu->set_linear_observer(nullptr);

  ASSERT_EQ(on_gpu.size(), on_cpu.size());
  int routed = 0;
  for (size_t i = 0; i < on_cpu.size(); i++) {
    const Seen &c = on_cpu[i], &g = on_gpu[i];
    ASSERT_EQ(g.name, c.name) << "observation " << i;
    ASSERT_EQ(g.rows, c.rows) << c.name;
    ASSERT_EQ(g.cols, c.cols) << c.name;
    const bool expert_in = c.name.rfind("expert", 0) == 0 && c.name.find(".down") == std::string::npos;
    routed += expert_in && c.name.find(".gate") != std::string::npos ? int(c.rows) : 0;
    if (c.name == "a" || c.name == "b" || expert_in || c.name == "shared.gate" || c.name == "shared.up")
      EXPECT_EQ(g.x, c.x) << c.name << ": the rows as given (gathered, not computed)";
    else if (c.name == "kv_b")  // the CPU's f32 latents against the GPU's bf16 cache rows
      EXPECT_LT(rel_err(g.x, c.x), 4e-3) << c.name;
    else
      EXPECT_LT(rel_err(g.x, c.x), c.name == "shared.down" ? 1e-2 : 1e-4) << c.name;
  }
  EXPECT_EQ(routed, m * K) << "every (token, slot) reaches its expert once";
  EXPECT_EQ(on_cpu.back().name, "kv_b");
}

TEST_F(CudaOps, GatherRows) {
  // Rows of 4096 floats (the 16-byte path), 333 and 3 (the byte path); repeated and reordered indices.
  const std::vector<int32_t> idx = {8, 0, 0, 5, 3};
  const int m = int(idx.size());
  const TensorView gi = up(idx, DType::I32, {m});
  for (int d : {333, 3, 4096}) {
    auto x = randn(size_t(9) * d);
    std::vector<float> want(size_t(m) * d);
    cpu.gather_rows(host(want, {m, d}), host(x, {9, d}), TensorView(const_cast<int32_t*>(idx.data()), DType::I32, {m}));
    TensorView o = poisoned({m, d});
    gpu->gather_rows(o, up(x, DType::F32, {9, d}), gi);
    EXPECT_EQ(down(o), want) << "d=" << d;
  }
}

}  // namespace
