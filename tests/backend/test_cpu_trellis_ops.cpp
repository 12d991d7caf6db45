// CPU backend ops on trellis-coded Linears (the fused product, cpu_trellis.cpp / cpu_attention_trellis.cpp /
// cpu_moe.cpp) against the same ops on the dequantized dense f32 weight (trellis::dequantize_hf_f32) and against the
// reference product (trellis::trellis_matmul_ref), on random codes, odd dims (padding), scattered cache blocks and
// depths past one cache block; outputs poisoned first. A row's result must be bit-identical whatever else was in its
// step (the CPU's batch invariance).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/half.h"
#include "core/rng.h"
#include "quant/trellis_ref.h"
#include "quant/trellis_weight.h"

using namespace trellm;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> randn(Rng& r, size_t n, float std = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = r.normal() * std;
  return v;
}

// A random trellis-coded Linear (out x in) and its dequantized dense twin.
struct TrellisLinear {
  std::vector<uint16_t> codes, suh, svh;
  trellis::TrellisWeight w;
  std::vector<float> dense;  // HF orientation (out, in)
  Linear lin, lin_dense;
  TrellisLinear(Rng& r, int64_t out, int64_t in, int K, trellis::Codebook cb) {
    w.key = "test";
    w.K = K;
    w.codebook = cb;
    w.in = in;
    w.out = out;
    w.in_padded = trellis::round_up_128(in);
    w.out_padded = trellis::round_up_128(out);
    codes.resize(size_t(w.in_padded * w.out_padded * K / 16));
    for (auto& c : codes) c = uint16_t(r.next_u32());
    suh.resize(size_t(w.in_padded));
    svh.resize(size_t(w.out_padded));
    for (auto& s : suh) s = f32_to_f16(r.uniform(-1, 1) * std::sqrt(3.0f / float(in)));
    for (auto& s : svh) s = f32_to_f16(r.uniform(-1.5f, 1.5f));
    w.trellis = codes.data();
    w.suh = suh.data();
    w.svh = svh.data();
    dense.resize(size_t(out * in));
    trellis::dequantize_hf_f32(w, dense.data());
    lin.in = lin_dense.in = in;
    lin.out = lin_dense.out = out;
    lin.exl3 = &w;
    lin_dense.weight = TensorView(dense.data(), DType::F32, {out, in});
  }
};

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); i++) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return num / den;
}

TensorView view(std::vector<float>& v, std::initializer_list<int64_t> shape) { return TensorView(v.data(), DType::F32, shape); }

TEST(CpuTrellisOps, MatmulMatchesTheReferenceProductAndIsRowInvariant) {
  CpuBackend be;
  Rng r(1);
  for (int K : {1, 3, 4, 8})
    for (trellis::Codebook cb : {trellis::Codebook::Inst3, trellis::Codebook::Mcg, trellis::Codebook::Mul1})
      for (auto [out, in] : std::vector<std::pair<int, int>>{{33, 17}, {300, 129}, {128, 256}}) {
        TrellisLinear t(r, out, in, K, cb);
        for (int m : {1, 2, 3, 17, 70}) {
          std::vector<float> x = randn(r, size_t(m * in));
          std::vector<float> y(size_t(m * out), kNaN), ref(size_t(m * out));
          be.matmul(view(y, {m, out}), view(x, {m, in}), t.lin);
          trellis::trellis_matmul_ref(t.w, x.data(), m, ref.data());
          EXPECT_LT(rel_err(y, ref), 2e-5) << "K=" << K << " " << trellis::codebook_name(cb) << " " << out << "x" << in << " m=" << m;
          // every row alone gives the same bits
          for (int i : {0, m - 1}) {
            std::vector<float> xi(x.begin() + i * in, x.begin() + (i + 1) * in), yi(size_t(out), kNaN);
            be.matmul(view(yi, {1, out}), view(xi, {1, in}), t.lin);
            EXPECT_EQ(std::memcmp(yi.data(), y.data() + i * out, sizeof(float) * out), 0) << "row " << i << " of " << m;
          }
        }
      }
}

// Absorbed attention with a trellis kv_b_proj (its per-head slices through the product and its transpose, the
// softmax block by block) against the same op with the dequantized dense kv_b_proj.
TEST(CpuTrellisOps, AbsorbedAttentionWithTrellisKvbMatchesTheDenseWeight) {
  CpuBackend be;
  Rng r(2);
  MlaDims d;
  d.heads = 3;
  d.kv_rank = 40;
  d.rope_dim = 8;
  d.nope_dim = 24;
  d.v_dim = 40;  // out = 3 * 64 = 192: padded to 256, heads straddle the 128-blocks
  d.scale = 1.0f / std::sqrt(32.0f);
  const int W = d.cache_width();
  for (trellis::Codebook cb : {trellis::Codebook::Mcg, trellis::Codebook::Mul1}) {
    TrellisLinear kvb(r, d.heads * (d.nope_dim + d.v_dim), d.kv_rank, 3, cb);
    for (auto [n, pos0] : std::vector<std::pair<int, int>>{{1, 0}, {1, 200}, {5, 130}, {9, 60}}) {
      const int T = pos0 + n, blocks = kv_blocks_for(T), pool_blocks = 2 * blocks + 1;
      std::vector<int32_t> ids(static_cast<size_t>(pool_blocks));
      for (int b = 0; b < pool_blocks; b++) ids[size_t(b)] = b;
      for (int b = pool_blocks - 1; b > 0; b--) std::swap(ids[size_t(b)], ids[r.next_u32() % uint32_t(b + 1)]);
      std::vector<int32_t> table(ids.begin(), ids.begin() + blocks);
      std::vector<int32_t> pos(static_cast<size_t>(n)), seq(static_cast<size_t>(n), 0);
      for (int i = 0; i < n; i++) pos[size_t(i)] = pos0 + i;
      std::vector<float> pool(size_t(pool_blocks) * kKvBlockTokens * W, kNaN);  // rows outside the sequence: NaN
      const std::vector<float> rows = randn(r, size_t(T) * W);
      for (int t = 0; t < T; t++) std::copy_n(&rows[size_t(t) * W], W, &pool[size_t(kv_pool_row(table.data(), t)) * W]);
      std::vector<float> q = randn(r, size_t(n) * d.heads * d.q_head_dim());
      auto run = [&](const Linear& lin, int i0, int count) {
        Positions p;
        p.pos = TensorView(pos.data() + i0, DType::I32, {count});
        p.bound = T;
        p.seq = TensorView(seq.data(), DType::I32, {count});
        p.tables = TensorView(table.data(), DType::I32, {1, blocks});
        std::vector<float> out(size_t(count) * d.heads * d.v_dim, kNaN);
        std::vector<float> qi(q.begin() + ptrdiff_t(size_t(i0) * d.heads * d.q_head_dim()),
                              q.begin() + ptrdiff_t(size_t(i0 + count) * d.heads * d.q_head_dim()));
        be.attention_mla(view(out, {count, d.heads * d.v_dim}), view(qi, {count, d.heads, d.q_head_dim()}),
                         view(pool, {int64_t(pool_blocks) * kKvBlockTokens, W}), lin, p, d, MlaMode::Absorbed);
        return out;
      };
      const std::vector<float> got = run(kvb.lin, 0, n), want = run(kvb.lin_dense, 0, n);
      EXPECT_LT(rel_err(got, want), 2e-5) << trellis::codebook_name(cb) << " n=" << n << " pos0=" << pos0;
      for (int i = 0; i < n; i++) {  // alone (the block-parallel path) = within the step (the row-parallel path)
        const std::vector<float> one = run(kvb.lin, i, 1);
        const size_t per = size_t(d.heads) * d.v_dim;
        EXPECT_EQ(std::memcmp(one.data(), got.data() + i * per, per * sizeof(float)), 0) << "row " << i << " of " << n;
      }
    }
  }
}

// The routed experts in shared product phases (and the shared expert) against the same experts dequantized, and
// bit for bit against one expert at a time.
TEST(CpuTrellisOps, MoeFfnWithTrellisExpertsMatchesTheDenseExperts) {
  CpuBackend be;
  Rng r(3);
  const int hidden = 136, inter = 72, E = 6, top = 2;
  std::vector<std::unique_ptr<TrellisLinear>> keep;
  std::vector<Expert> tex(E), dex(E);
  auto make = [&](int out, int in) {
    keep.push_back(std::make_unique<TrellisLinear>(r, out, in, 3, trellis::Codebook::Mcg));
    return keep.back().get();
  };
  for (int e = 0; e < E; e++) {
    TrellisLinear *g = make(inter, hidden), *u = make(inter, hidden), *dn = make(hidden, inter);
    tex[e] = {g->lin, u->lin, dn->lin};
    dex[e] = {g->lin_dense, u->lin_dense, dn->lin_dense};
  }
  TrellisLinear *sg = make(inter, hidden), *su = make(inter, hidden), *sd = make(hidden, inter);
  const Expert tsh{sg->lin, su->lin, sd->lin}, dsh{sg->lin_dense, su->lin_dense, sd->lin_dense};
  for (int n : {1, 7}) {
    std::vector<float> x = randn(r, size_t(n * hidden)), w(size_t(n * top));
    std::vector<int32_t> ids(size_t(n * top));
    for (int i = 0; i < n; i++) {
      ids[size_t(i * top)] = int32_t(r.next_u32() % E);
      ids[size_t(i * top + 1)] = int32_t((ids[size_t(i * top)] + 1 + r.next_u32() % (E - 1)) % E);
      w[size_t(i * top)] = r.uniform(0.1f, 1.0f);
      w[size_t(i * top + 1)] = r.uniform(0.1f, 1.0f);
    }
    const TensorView idv(ids.data(), DType::I32, {n, top});
    std::vector<float> got(size_t(n * hidden), kNaN), want(size_t(n * hidden), kNaN);
    be.moe_ffn(view(got, {n, hidden}), view(x, {n, hidden}), view(w, {n, top}), idv, tex, &tsh);
    be.moe_ffn(view(want, {n, hidden}), view(x, {n, hidden}), view(w, {n, top}), idv, dex, &dsh);
    // The trellis product rounds its transformed inputs to fp16 (2^-11 relative) where the dense one does not.
    EXPECT_LT(rel_err(got, want), 5e-3) << "n=" << n;
    // One expert at a time through matmul (the path a calibration observer takes): the same bits.
    CpuBackend one;
    one.set_linear_observer([](const Linear&, TensorView) {});
    std::vector<float> seq_out(size_t(n * hidden), kNaN);
    one.moe_ffn(view(seq_out, {n, hidden}), view(x, {n, hidden}), view(w, {n, top}), idv, tex, &tsh);
    EXPECT_EQ(std::memcmp(seq_out.data(), got.data(), got.size() * sizeof(float)), 0) << "n=" << n;
  }
}

}  // namespace
