// CPU ops against straightforward double-precision references written here, on seeded random inputs with
// odd shapes; outputs are poisoned (NaN) first so an unwritten element fails.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <complex>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/half.h"
#include "core/rng.h"

using namespace trellm;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> randn(Rng& r, size_t n, float std = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = r.normal() * std;
  return v;
}

TensorView view(std::vector<float>& v, std::initializer_list<int64_t> shape) { return TensorView(v.data(), DType::F32, shape); }

// Rows at consecutive positions pos0 .. pos0+n-1 of one sequence, held in host memory. Its block table maps
// the sequence onto a pool of 2 * blocks + 1 blocks in a random order (when rng is given), so a kernel that
// addresses the pool as if it were contiguous reads the wrong rows.
struct HostPositions {
  std::vector<int32_t> v, seq, table;
  Positions p;
  int pool_blocks = 0;
  HostPositions(int pos0, int n, Rng* rng = nullptr) : v(size_t(n)), seq(size_t(n), 0) {
    for (int i = 0; i < n; i++) v[i] = pos0 + i;
    const int blocks = kv_blocks_for(pos0 + n);
    pool_blocks = rng ? 2 * blocks + 1 : blocks;
    std::vector<int32_t> ids(static_cast<size_t>(pool_blocks));
    for (int b = 0; b < pool_blocks; b++) ids[size_t(b)] = b;
    if (rng)
      for (int b = pool_blocks - 1; b > 0; b--) std::swap(ids[size_t(b)], ids[rng->next_u32() % uint32_t(b + 1)]);
    table.assign(ids.begin(), ids.begin() + blocks);
    p.pos = TensorView(v.data(), DType::I32, {n});
    p.bound = pos0 + n;
    p.seq = TensorView(seq.data(), DType::I32, {n});
    p.tables = TensorView(table.data(), DType::I32, {1, blocks});
  }
  int64_t pool_rows() const { return int64_t(pool_blocks) * kKvBlockTokens; }
  int64_t row(int t) const { return kv_pool_row(table.data(), t); }
};

// A sequence's contiguous cache rows [rows, W] scattered into a NaN-poisoned pool through its block table.
std::vector<float> scatter(const std::vector<float>& rows, int W, const HostPositions& hp) {
  std::vector<float> pool(size_t(hp.pool_rows()) * W, std::numeric_limits<float>::quiet_NaN());
  for (size_t t = 0; t < rows.size() / size_t(W); t++)
    std::copy_n(&rows[t * size_t(W)], W, &pool[size_t(hp.row(int(t))) * W]);
  return pool;
}

double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < got.size(); i++) {
    if (!std::isfinite(got[i])) return INFINITY;
    num = std::max(num, std::fabs(double(got[i]) - want[i]));
    den = std::max(den, std::fabs(want[i]));
  }
  return num / den;
}

// A weight stored in `dt`, plus its exact f32 values.
struct Weight {
  std::vector<uint16_t> h;
  std::vector<float> f;  // the stored values as f32 (exactly)
  DType dt;
  Linear lin;
  Weight(Rng& r, int64_t out, int64_t in, DType t, float std = 0.3f) : dt(t) {
    f = randn(r, size_t(out * in), std);
    if (t != DType::F32) {
      h.resize(f.size());
      for (size_t i = 0; i < f.size(); i++) {
        h[i] = t == DType::BF16 ? f32_to_bf16(f[i]) : f32_to_f16(f[i]);
        f[i] = t == DType::BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
      }
    }
    lin.in = in;
    lin.out = out;
    lin.weight = TensorView(t == DType::F32 ? static_cast<void*>(f.data()) : h.data(), t, {out, in});
  }
};

TEST(CpuOps, MatmulAllDtypesOddShapes) {
  CpuBackend be;
  Rng r(11);
  for (DType t : {DType::F32, DType::F16, DType::BF16})
    for (auto [n, in, out] : std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {3, 17, 33}, {17, 127, 5}, {33, 64, 129}}) {
      Weight w(r, out, in, t);
      std::vector<float> bias = randn(r, out);
      w.lin.bias = view(bias, {out});
      std::vector<float> x = randn(r, size_t(n) * in), y(size_t(n) * out, kNaN);
      be.matmul(view(y, {n, out}), view(x, {n, in}), w.lin);
      std::vector<double> want(y.size());
      for (int i = 0; i < n; i++)
        for (int o = 0; o < out; o++) {
          double s = bias[o];
          for (int k = 0; k < in; k++) s += double(x[i * in + k]) * w.f[size_t(o) * in + k];
          want[size_t(i) * out + o] = s;
        }
      EXPECT_LT(max_rel_err(y, want), 1e-5) << dtype_name(t) << " n=" << n << " in=" << in << " out=" << out;
    }
}

TEST(CpuOps, RmsNorm) {
  CpuBackend be;
  Rng r(12);
  for (int d : {1, 7, 64, 333}) {
    const int n = 5;
    std::vector<float> x = randn(r, size_t(n) * d, 3.0f), w = randn(r, d), y(x.size(), kNaN);
    be.rms_norm(view(y, {n, d}), view(x, {n, d}), view(w, {d}), 1e-5f);
    std::vector<double> want(y.size());
    for (int i = 0; i < n; i++) {
      double ss = 0;
      for (int j = 0; j < d; j++) ss += double(x[i * d + j]) * x[i * d + j];
      double inv = 1.0 / std::sqrt(ss / d + 1e-5);
      for (int j = 0; j < d; j++) want[i * d + j] = w[j] * x[i * d + j] * inv;
    }
    EXPECT_LT(max_rel_err(y, want), 1e-6) << "d=" << d;
    be.rms_norm(view(x, {n, d}), view(x, {n, d}), view(w, {d}), 1e-5f);  // in place
    EXPECT_EQ(x, y);
  }
}

// Interleaved RoPE: the pair (x[2i], x[2i+1]) is the complex number x[2i] + i·x[2i+1], multiplied by
// e^{i·pos·θ^(-2i/dim)}.
TEST(CpuOps, RopeRotatesAdjacentPairs) {
  CpuBackend be;
  Rng r(13);
  const int n = 3, heads = 2, hd = 20, offset = 4, dim = 16;
  const float theta = 1e6f;
  const int pos0 = 1000;
  std::vector<float> x = randn(r, size_t(n) * heads * hd), orig = x;
  be.rope(view(x, {n, heads, hd}), offset, HostPositions(pos0, n).p, RopeParams{theta, dim});
  for (int i = 0; i < n; i++)
    for (int h = 0; h < heads; h++) {
      const float* a = orig.data() + (i * heads + h) * hd;
      const float* b = x.data() + (i * heads + h) * hd;
      for (int j = 0; j < offset; j++) EXPECT_EQ(a[j], b[j]) << "non-rotary dims must be untouched";
      for (int k = 0; k < dim / 2; k++) {
        double freq = std::pow(double(theta), -2.0 * k / dim);
        std::complex<double> z(a[offset + 2 * k], a[offset + 2 * k + 1]);
        z *= std::polar(1.0, (pos0 + i) * freq);
        EXPECT_NEAR(b[offset + 2 * k], z.real(), 1e-4 * std::abs(z) + 1e-6);
        EXPECT_NEAR(b[offset + 2 * k + 1], z.imag(), 1e-4 * std::abs(z) + 1e-6);
      }
    }
}

// Rotate-half RoPE (the classic Llama layout) gives different scores: the check above would catch it, and
// this one shows q·k depends only on the distance between positions.
TEST(CpuOps, RopeScoresDependOnRelativePosition) {
  Rng r(14);
  const int dim = 16;
  std::vector<float> q = randn(r, dim), k = randn(r, dim);
  auto score = [&](int pq, int pk) {
    std::vector<float> a = q, b = k;
    cpu::rope_rotate(a.data(), dim, pq, 1e4f);
    cpu::rope_rotate(b.data(), dim, pk, 1e4f);
    double s = 0;
    for (int i = 0; i < dim; i++) s += double(a[i]) * b[i];
    return s;
  };
  EXPECT_NEAR(score(10, 3), score(107, 100), 1e-4);
  EXPECT_GT(std::fabs(score(10, 3) - score(10, 9)), 1e-3);
}

MoeRouting routing(int E, int K, float scale, bool norm = true, int groups = 1, int topk_groups = 1) {
  MoeRouting m;
  m.n_experts = E;
  m.top_k = K;
  m.routed_scaling_factor = scale;
  m.norm_topk_prob = norm;
  m.n_group = groups;
  m.topk_group = topk_groups;
  return m;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// hidden = 1 and x = 1, so the gate weights are the router logits.
TEST(CpuOps, RoutingBiasChangesSelectionNotWeights) {
  CpuBackend be;
  std::vector<float> x = {1.0f}, gate = {2.0f, 1.0f, 0.5f, -1.0f}, w(2, kNaN);
  std::vector<int32_t> ids(2, -1);
  TensorView tid(ids.data(), DType::I32, {1, 2});
  // Without bias: experts 0 and 1.
  be.moe_route(view(w, {1, 2}), tid, view(x, {1, 1}), view(gate, {4, 1}), TensorView(), routing(4, 2, 1.8f));
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 1}));
  double s0 = sigmoid(2.0), s1 = sigmoid(1.0), s2 = sigmoid(0.5);
  EXPECT_NEAR(w[0], s0 / (s0 + s1) * 1.8, 1e-6);
  EXPECT_NEAR(w[1], s1 / (s0 + s1) * 1.8, 1e-6);
  // A bias on expert 2 makes it win the selection, but its weight is its unbiased sigmoid score.
  std::vector<float> bias = {0.0f, 0.0f, 1.0f, 0.0f};
  be.moe_route(view(w, {1, 2}), tid, view(x, {1, 1}), view(gate, {4, 1}), view(bias, {4}), routing(4, 2, 1.8f));
  EXPECT_EQ(ids, (std::vector<int32_t>{2, 0}));
  EXPECT_NEAR(w[0], s2 / (s2 + s0) * 1.8, 1e-6);
  EXPECT_NEAR(w[1], s0 / (s2 + s0) * 1.8, 1e-6);
  // Without normalisation the weights are the raw scores × the scaling factor.
  be.moe_route(view(w, {1, 2}), tid, view(x, {1, 1}), view(gate, {4, 1}), view(bias, {4}), routing(4, 2, 2.0f, false));
  EXPECT_NEAR(w[0], s2 * 2.0, 1e-6);
  EXPECT_NEAR(w[1], s0 * 2.0, 1e-6);
}

TEST(CpuOps, RoutingGroupLimited) {
  CpuBackend be;
  // Two groups of 3. Group 0 holds the single best expert (0) but group 1's top-2 sum is higher, so with
  // topk_group = 1 only group 1's experts may be chosen.
  std::vector<float> x = {1.0f}, gate = {3.0f, -3.0f, -3.0f, 1.5f, 1.4f, 1.3f}, w(2, kNaN);
  std::vector<int32_t> ids(2, -1);
  be.moe_route(view(w, {1, 2}), TensorView(ids.data(), DType::I32, {1, 2}), view(x, {1, 1}), view(gate, {6, 1}),
               TensorView(), routing(6, 2, 1.0f, true, 2, 1));
  EXPECT_EQ(ids, (std::vector<int32_t>{3, 4}));
}

TEST(CpuOps, MoeFfnMatchesNaive) {
  CpuBackend be;
  Rng r(15);
  const int n = 5, hid = 24, inter = 10, E = 4, K = 2;
  std::vector<Weight> ws;
  ws.reserve(3 * (E + 1));
  std::vector<Expert> ex(E);
  Expert shared;
  for (int e = 0; e <= E; e++) {
    Expert& t = e < E ? ex[e] : shared;
    ws.emplace_back(r, inter, hid, DType::BF16);
    t.gate = ws.back().lin;
    ws.emplace_back(r, inter, hid, DType::BF16);
    t.up = ws.back().lin;
    ws.emplace_back(r, hid, inter, DType::BF16);
    t.down = ws.back().lin;
  }
  std::vector<float> x = randn(r, n * hid), y(n * hid, kNaN), wts = randn(r, n * K);
  std::vector<int32_t> ids = {0, 3, 1, 3, 2, 2 /*same expert twice*/, 0, 1, 3, 0};
  be.moe_ffn(view(y, {n, hid}), view(x, {n, hid}), view(wts, {n, K}), TensorView(ids.data(), DType::I32, {n, K}), ex, &shared);
  auto expert = [&](int e, const float* xi, std::vector<double>& acc, double wgt) {
    const int base = 3 * e;
    std::vector<double> a(inter);
    for (int j = 0; j < inter; j++) {
      double g = 0, u = 0;
      for (int k = 0; k < hid; k++) {
        g += ws[base].f[j * hid + k] * xi[k];
        u += ws[base + 1].f[j * hid + k] * xi[k];
      }
      a[j] = g * sigmoid(g) * u;
    }
    for (int o = 0; o < hid; o++) {
      double s = 0;
      for (int j = 0; j < inter; j++) s += ws[base + 2].f[o * inter + j] * a[j];
      acc[o] += wgt * s;
    }
  };
  std::vector<double> want(n * hid);
  for (int i = 0; i < n; i++) {
    std::vector<double> acc(hid);
    for (int k = 0; k < K; k++) expert(ids[i * K + k], &x[i * hid], acc, wts[i * K + k]);
    expert(E, &x[i * hid], acc, 1.0);
    for (int o = 0; o < hid; o++) want[i * hid + o] = acc[o];
  }
  EXPECT_LT(max_rel_err(y, want), 1e-5);
}

// Plain multi-head attention on fully expanded K/V, in double: the definition both MLA forms must match.
std::vector<double> naive_mla(const std::vector<float>& q, const std::vector<float>& cache, const Weight& kvb, int n,
                              int pos0, const MlaDims& d) {
  const int W = d.cache_width(), per = d.nope_dim + d.v_dim, T = pos0 + n;
  std::vector<double> out(size_t(n) * d.heads * d.v_dim);
  std::vector<double> kv(size_t(T) * d.heads * per);
  for (int t = 0; t < T; t++)
    for (int o = 0; o < d.heads * per; o++) {
      double s = 0;
      for (int k = 0; k < d.kv_rank; k++) s += double(kvb.f[size_t(o) * d.kv_rank + k]) * cache[size_t(t) * W + k];
      kv[size_t(t) * d.heads * per + o] = s;
    }
  for (int i = 0; i < n; i++)
    for (int h = 0; h < d.heads; h++) {
      const float* qh = &q[(size_t(i) * d.heads + h) * d.q_head_dim()];
      std::vector<double> sc(pos0 + i + 1);
      double mx = -INFINITY, sum = 0;
      for (int t = 0; t <= pos0 + i; t++) {
        double s = 0;
        for (int j = 0; j < d.nope_dim; j++) s += qh[j] * kv[(size_t(t) * d.heads + h) * per + j];
        for (int j = 0; j < d.rope_dim; j++) s += qh[d.nope_dim + j] * double(cache[size_t(t) * W + d.kv_rank + j]);
        sc[t] = s * d.scale;
        mx = std::max(mx, sc[t]);
      }
      for (auto& s : sc) sum += (s = std::exp(s - mx));
      for (int j = 0; j < d.v_dim; j++) {
        double o = 0;
        for (int t = 0; t <= pos0 + i; t++) o += sc[t] / sum * kv[(size_t(t) * d.heads + h) * per + d.nope_dim + j];
        out[(size_t(i) * d.heads + h) * d.v_dim + j] = o;
      }
    }
  return out;
}

TEST(CpuOps, AttentionAbsorbedAndExpandedAgreeWithNaive) {
  CpuBackend be;
  Rng r(16);
  MlaDims d;
  d.heads = 3;
  d.kv_rank = 20;
  d.rope_dim = 8;
  d.nope_dim = 12;
  d.v_dim = 10;
  d.scale = 1.0f / std::sqrt(20.0f);
  for (DType t : {DType::F32, DType::BF16})
    for (auto [n, pos0] : std::vector<std::pair<int, int>>{{1, 0}, {1, 70}, {3, 5}, {17, 0}, {33, 40}, {70, 1}, {5, 127}}) {
      Weight kvb(r, d.heads * (d.nope_dim + d.v_dim), d.kv_rank, t);
      const int T = pos0 + n;
      std::vector<float> rows = randn(r, size_t(T) * d.cache_width());
      std::vector<float> q = randn(r, size_t(n) * d.heads * d.q_head_dim());
      std::vector<double> want = naive_mla(q, rows, kvb, n, pos0, d);
      HostPositions hp(pos0, n, &r);  // scattered blocks; every row outside the sequence is NaN
      std::vector<float> pool = scatter(rows, d.cache_width(), hp);
      for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Expanded}) {
        std::vector<float> out(size_t(n) * d.heads * d.v_dim, kNaN);
        be.attention_mla(view(out, {n, d.heads * d.v_dim}), view(q, {n, d.heads, d.q_head_dim()}),
                         view(pool, {hp.pool_rows(), d.cache_width()}), kvb.lin, hp.p, d, mode);
        EXPECT_LT(max_rel_err(out, want), 2e-5)
            << (mode == MlaMode::Absorbed ? "absorbed" : "expanded") << " " << dtype_name(t) << " n=" << n << " pos0=" << pos0;
      }
    }
}

// One call over rows of several sequences: decode rows of different sequences at different depths (runs of one),
// then a prompt chunk; the sequences' tables share their first blocks (what the prefix cache hands out) and the
// rest are scattered over one pool. Each row must see exactly its own sequence.
TEST(CpuOps, AttentionOverSharedScatteredBlockTablesOfManySequences) {
  CpuBackend be;
  Rng r(18);
  MlaDims d;
  d.heads = 2;
  d.kv_rank = 16;
  d.rope_dim = 4;
  d.nope_dim = 8;
  d.v_dim = 6;
  d.scale = 0.3f;
  const int W = d.cache_width(), B = kKvBlockTokens;
  const int shared_blocks = 2;                        // every sequence starts with the same 128 tokens
  const std::vector<int> lens = {129, 200, 300, 140};  // positions [0, len) of each sequence exist
  const int chunk = 11;                                // the last sequence's last 11 rows are a prompt chunk
  int pool_blocks = shared_blocks;
  std::vector<std::vector<int32_t>> tables(lens.size());
  for (size_t s = 0; s < lens.size(); s++) {
    for (int b = 0; b < shared_blocks; b++) tables[s].push_back(b);
    for (int b = shared_blocks; b < (lens[s] + B - 1) / B; b++) tables[s].push_back(pool_blocks++);
  }
  pool_blocks += 3;  // unused blocks
  std::vector<int32_t> perm(static_cast<size_t>(pool_blocks));
  for (int b = 0; b < pool_blocks; b++) perm[size_t(b)] = b;
  for (int b = pool_blocks - 1; b > 0; b--) std::swap(perm[size_t(b)], perm[r.next_u32() % uint32_t(b + 1)]);
  const int stride = (lens[2] + B - 1) / B;
  std::vector<int32_t> flat(lens.size() * size_t(stride), -1);
  for (size_t s = 0; s < lens.size(); s++)
    for (size_t b = 0; b < tables[s].size(); b++) flat[s * size_t(stride) + b] = perm[size_t(tables[s][b])];
  // Logical rows per sequence (the shared head identical across sequences), scattered into the pool.
  std::vector<std::vector<float>> rows(lens.size());
  std::vector<float> pool(size_t(pool_blocks) * B * W, kNaN);
  const std::vector<float> head = randn(r, size_t(shared_blocks) * B * W);
  for (size_t s = 0; s < lens.size(); s++) {
    rows[s] = randn(r, size_t(lens[s]) * W);
    std::copy(head.begin(), head.end(), rows[s].begin());
    for (int t = 0; t < lens[s]; t++)
      std::copy_n(&rows[s][size_t(t) * W], W, &pool[size_t(kv_pool_row(&flat[s * size_t(stride)], t)) * W]);
  }
  // Rows: the last position of sequences 0..2 (decode), then the chunk of sequence 3.
  std::vector<int32_t> pos, seq;
  std::vector<int> runs;
  for (int s = 0; s < 3; s++) pos.push_back(lens[size_t(s)] - 1), seq.push_back(s), runs.push_back(1);
  for (int i = 0; i < chunk; i++) pos.push_back(lens[3] - chunk + i), seq.push_back(3);
  runs.push_back(chunk);
  const int n = int(pos.size());
  Weight kvb(r, d.heads * (d.nope_dim + d.v_dim), d.kv_rank, DType::F32);
  std::vector<float> q = randn(r, size_t(n) * d.heads * d.q_head_dim());
  Positions p;
  p.pos = TensorView(pos.data(), DType::I32, {n});
  p.bound = *std::max_element(pos.begin(), pos.end()) + 1;
  p.seq = TensorView(seq.data(), DType::I32, {n});
  p.tables = TensorView(flat.data(), DType::I32, {int64_t(lens.size()), stride});
  p.runs = runs;
  std::vector<float> out(size_t(n) * d.heads * d.v_dim, kNaN);
  be.attention_mla(view(out, {n, d.heads * d.v_dim}), view(q, {n, d.heads, d.q_head_dim()}),
                   view(pool, {int64_t(pool_blocks) * B, W}), kvb.lin, p, d, MlaMode::Absorbed);
  const size_t per_row = size_t(d.heads) * d.v_dim;
  auto check = [&](int row0, int count, int s) {
    const int pos0 = pos[size_t(row0)];
    std::vector<float> qs(q.begin() + ptrdiff_t(size_t(row0) * d.heads * d.q_head_dim()),
                          q.begin() + ptrdiff_t(size_t(row0 + count) * d.heads * d.q_head_dim()));
    std::vector<float> ctx(rows[size_t(s)].begin(), rows[size_t(s)].begin() + ptrdiff_t(size_t(pos0 + count) * W));
    const std::vector<double> want = naive_mla(qs, ctx, kvb, count, pos0, d);
    std::vector<float> got(out.begin() + ptrdiff_t(row0 * per_row), out.begin() + ptrdiff_t((row0 + count) * per_row));
    EXPECT_LT(max_rel_err(got, want), 2e-5) << "sequence " << s;
  };
  for (int s = 0; s < 3; s++) check(s, 1, s);
  check(3, chunk, 3);
}

TEST(CpuOps, CacheAppendNormsAndRotates) {
  CpuBackend be;
  Rng r(17);
  const int rank = 6, rope = 4, n = 3, W = rank + rope;
  for (int pos0 : {3, 62}) {  // 62: the rows straddle two scattered blocks
    HostPositions hp(pos0, n, &r);
    std::vector<float> kv = randn(r, n * W), w = randn(r, rank), cache(size_t(hp.pool_rows()) * W, kNaN);
    be.mla_cache_append(view(cache, {hp.pool_rows(), W}), view(kv, {n, W}), view(w, {rank}), 1e-6f, hp.p,
                        RopeParams{1e4f, rope});
    std::vector<bool> written(static_cast<size_t>(hp.pool_rows()), false);
    for (int i = 0; i < n; i++) {
      const float* src = &kv[i * W];
      const float* dst = &cache[size_t(hp.row(pos0 + i)) * W];
      written[size_t(hp.row(pos0 + i))] = true;
      double ss = 0;
      for (int j = 0; j < rank; j++) ss += double(src[j]) * src[j];
      for (int j = 0; j < rank; j++) EXPECT_NEAR(dst[j], w[j] * src[j] / std::sqrt(ss / rank + 1e-6), 1e-5);
      std::vector<float> k(src + rank, src + rank + rope);
      cpu::rope_rotate(k.data(), rope, pos0 + i, 1e4f);
      for (int j = 0; j < rope; j++) EXPECT_EQ(dst[rank + j], k[j]);
    }
    for (int64_t row = 0; row < hp.pool_rows(); row++) {
      if (written[size_t(row)]) continue;
      ASSERT_TRUE(std::isnan(cache[size_t(row) * W])) << "pool row " << row << " written";
    }
  }
}

TEST(CpuOps, GatherRowsAndSampleRows) {
  CpuBackend be;
  Rng r(19);
  const int n = 5, V = 37;
  std::vector<float> x = randn(r, size_t(n) * V), g(3 * V, kNaN);
  std::vector<int32_t> idx = {4, 0, 2};
  be.gather_rows(view(g, {3, V}), view(x, {n, V}), TensorView(idx.data(), DType::I32, {3}));
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < V; j++) ASSERT_EQ(g[size_t(i) * V + j], x[size_t(idx[size_t(i)]) * V + j]);
  // Every row sampled with its own parameters and step equals cpu::sample_token on that row alone.
  std::vector<SamplingParams> ps(n);
  std::vector<int32_t> steps(n), toks(n, -1);
  for (int i = 0; i < n; i++) {
    ps[size_t(i)].temperature = i == 0 ? 0.0f : 0.5f + 0.3f * i;
    ps[size_t(i)].top_k = i == 2 ? 5 : 0;
    ps[size_t(i)].top_p = i == 3 ? 0.8f : 1.0f;
    ps[size_t(i)].seed = 1000 + uint64_t(i);
    steps[size_t(i)] = 7 * i;
  }
  be.sample_rows(view(x, {n, V}), TensorView(ps.data(), DType::U8, {int64_t(sizeof(SamplingParams)) * n}),
                 TensorView(steps.data(), DType::I32, {n}), TensorView(toks.data(), DType::I32, {n}));
  for (int i = 0; i < n; i++)
    EXPECT_EQ(toks[size_t(i)], cpu::sample_token(&x[size_t(i) * V], V, ps[size_t(i)], uint64_t(steps[size_t(i)]))) << "row " << i;
}

}  // namespace
