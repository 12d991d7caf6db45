// The fused CPU trellis product (backend/cpu/trellis_gemm.h), every variant this machine supports (forced through
// the internal selector) against the scalar reference: the decoders bit for bit against the one decode definition
// (trellis::state_at + trellis::decode_state) for K = 1..8 and all three codebooks (every one of the 65536 states
// at K = 8), and the products against a double-precision sum over the reference decode, on fresh random tiles and
// activations, odd shapes, outputs poisoned first and guard columns checked. A row's result must not depend on how
// many rows shared the call (the CPU's batch invariance).
//
// Built on its own (no trellm_lib needed beyond the kernel sources) so scripts/arm_cross_test.sh can cross-compile
// it for aarch64 and run the NEON variant under qemu-user.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

#include "backend/cpu/trellis_gemm.h"
#include "core/half.h"
#include "core/rng.h"
#include "quant/trellis_decode.h"

using namespace trellm;
using namespace trellm::cpu;
using trellis::Codebook;

namespace {

constexpr Codebook kCodebooks[] = {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1};

std::vector<uint16_t> random_tiles(int64_t n_tiles, int K, uint64_t seed) {
  std::vector<uint16_t> v(size_t(n_tiles) * trellis::tile_u16(K));
  Rng r(seed);
  for (auto& x : v) x = uint16_t(r.next_u32());
  return v;
}

float reference_weight(const uint16_t* tile, int K, Codebook cb, int p) {
  return f16_to_f32(trellis::decode_state(cb, trellis::state_at(tile, K, p)));
}

// fp16-exact activations, as the product's input transform makes them.
std::vector<float> random_x(int64_t n, uint64_t seed) {
  std::vector<float> x(static_cast<size_t>(n));
  Rng r(seed);
  for (auto& v : x) v = f16_to_f32(f32_to_f16(r.uniform(-2.0f, 2.0f)));
  return x;
}

const float kPoison = std::numeric_limits<float>::quiet_NaN();

struct ForceIsa {  // the selector back to the default when a test ends
  explicit ForceIsa(TrellisIsa isa) { trellis_force_isa(isa); }
  ~ForceIsa() { trellis_force_isa(trellis_supported_isas().back()); }
};

TEST(TrellisCpu, SelectorListsScalarAndPicksTheBest) {
  const auto isas = trellis_supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), TrellisIsa::Scalar);
  EXPECT_EQ(trellis_active_isa(), isas.back());
  for (TrellisIsa i : isas) {
    ForceIsa f(i);
    EXPECT_EQ(trellis_active_isa(), i);
  }
  std::printf("trellis variants here:");
  for (TrellisIsa i : isas) std::printf(" %s", trellis_isa_name(i));
  std::printf(" (active %s)\n", trellis_isa_name(trellis_active_isa()));
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    EXPECT_TRUE(trellis_isa_supported(TrellisIsa::Avx2)) << "an AVX2 CPU must get the AVX2 variant";
  }
#endif
#if defined(__aarch64__)
  EXPECT_TRUE(trellis_isa_supported(TrellisIsa::Neon)) << "the NEON variant should run here (fp16 vector arithmetic)";
#endif
}

// Every variant's decoder, bit for bit, every K and codebook, walk order.
TEST(TrellisCpu, DecodersBitExactWithTheDecodeDefinition) {
  for (TrellisIsa isa : trellis_supported_isas()) {
    for (int K = 1; K <= 8; K++) {
      std::vector<uint16_t> tiles = random_tiles(96, K, 1000 + K);
      if (K == 8) {
        // state(p) = B[p-1] << 8 | B[p] for stream bytes B: 512 tiles with B[2q] = i, B[2q+1] = 128h + q (i < 256,
        // h < 2) meet every state (i, b) and (a, i).
        for (int i = 0; i < 256; i++)
          for (int h = 0; h < 2; h++) {
            uint8_t B[256];
            for (int q = 0; q < 128; q++) B[2 * q] = uint8_t(i), B[2 * q + 1] = uint8_t(128 * h + q);
            tiles.resize(tiles.size() + 128);
            uint16_t* t = tiles.data() + tiles.size() - 128;
            // stream half-word e = bytes 2e (high) and 2e + 1 = .trellis element e ^ 1
            for (int e = 0; e < 128; e++) t[e ^ 1] = uint16_t(B[2 * e] << 8 | B[2 * e + 1]);
          }
      }
      const int64_t n = int64_t(tiles.size()) / trellis::tile_u16(K);
      for (Codebook cb : kCodebooks) {
        std::set<uint32_t> seen;
        for (int64_t i = 0; i < n; i++) {
          const uint16_t* tile = tiles.data() + i * trellis::tile_u16(K);
          float out[256];
          std::fill(out, out + 256, kPoison);
          trellis_decode_tile(isa, tile, K, cb, out);
          for (int p = 0; p < 256; p++) {
            const float want = reference_weight(tile, K, cb, p);
            ASSERT_EQ(f32_to_bits(out[p]), f32_to_bits(want))
                << trellis_isa_name(isa) << " K=" << K << " " << trellis::codebook_name(cb) << " tile " << i << " p " << p;
            if (K == 8) seen.insert(trellis::state_at(tile, K, p));
          }
        }
        if (K == 8) {
          EXPECT_EQ(seen.size(), 65536u) << "the K=8 tiles should cover every state";
        }
      }
    }
  }
}

// Hand-made streams: all-zero, all-one and single-bit tiles (the wrap of state 0 and the last word matter most).
TEST(TrellisCpu, DecodersOnEdgeStreams) {
  for (TrellisIsa isa : trellis_supported_isas())
    for (int K = 1; K <= 8; K++)
      for (Codebook cb : kCodebooks) {
        const int n = trellis::tile_u16(K);
        std::vector<std::vector<uint16_t>> cases = {std::vector<uint16_t>(n, 0), std::vector<uint16_t>(n, 0xFFFF)};
        for (int b : {0, 1, 15, 16, 17, 31, 16 * n - 1, 16 * n - 16}) {
          std::vector<uint16_t> t(n, 0);
          t[b / 16] = uint16_t(1u << (b % 16));
          cases.push_back(t);
        }
        for (const auto& t : cases) {
          float out[256];
          std::fill(out, out + 256, kPoison);
          trellis_decode_tile(isa, t.data(), K, cb, out);
          for (int p = 0; p < 256; p++)
            ASSERT_EQ(f32_to_bits(out[p]), f32_to_bits(reference_weight(t.data(), K, cb, p)))
                << trellis_isa_name(isa) << " K=" << K << " " << trellis::codebook_name(cb) << " p " << p;
        }
      }
}

TEST(TrellisCpu, RoundToF16MatchesTheReference) {
  Rng r(3);
  std::vector<float> v;
  for (int i = 0; i < 4099; i++) {
    const float e = std::ldexp(1.0f, int(r.next_u32() % 50) - 30);  // subnormal fp16 .. overflow
    v.push_back(r.uniform(-1.0f, 1.0f) * e);
  }
  v.insert(v.end(), {0.0f, -0.0f, 65504.0f, 65520.0f, -65519.0f, 1e-8f, 5.9604645e-8f, 2.98e-8f});
  for (TrellisIsa isa : trellis_supported_isas()) {
    std::vector<float> a = v;
    round_to_f16(isa, a.data(), int64_t(a.size()));
    for (size_t i = 0; i < v.size(); i++)
      ASSERT_EQ(f32_to_bits(a[i]), f32_to_bits(f16_to_f32(f32_to_f16(v[i])))) << trellis_isa_name(isa) << " " << v[i];
  }
}

struct Problem {
  int K;
  Codebook cb;
  int64_t tiles_k, tiles_n, m;
  std::vector<uint16_t> tiles;
  std::vector<float> x;    // m x (16 tiles_k)
  std::vector<double> ref;  // m x (16 tiles_n): Σ_k x·Q in double over the reference decode
  std::vector<double> mag;  // Σ_k |x·Q|
  TrellisTiles t() const { return {tiles.data(), K, cb, tiles_k, tiles_n}; }
};

Problem make_problem(int K, Codebook cb, int64_t tiles_k, int64_t tiles_n, int64_t m, uint64_t seed) {
  Problem P{K, cb, tiles_k, tiles_n, m, random_tiles(tiles_k * tiles_n, K, seed), random_x(m * tiles_k * 16, seed + 1), {}, {}};
  const int64_t N = 16 * tiles_n, Kd = 16 * tiles_k;
  std::vector<float> q(size_t(Kd * N));  // Q[k][n]
  for (int64_t tk = 0; tk < tiles_k; tk++)
    for (int64_t tn = 0; tn < tiles_n; tn++)
      for (int p = 0; p < 256; p++)
        q[(16 * tk + trellis::walk_k(p)) * N + 16 * tn + trellis::walk_n(p)] = reference_weight(P.t().tile(tk, tn), K, cb, p);
  P.ref.assign(size_t(m * N), 0.0);
  P.mag.assign(size_t(m * N), 0.0);
  for (int64_t r = 0; r < m; r++)
    for (int64_t k = 0; k < Kd; k++)
      for (int64_t n = 0; n < N; n++) {
        const double v = double(P.x[r * Kd + k]) * q[k * N + n];
        P.ref[r * N + n] += v;
        P.mag[r * N + n] += std::abs(v);
      }
  return P;
}

// f32 products and sums against the double reference: a few ulps of the sum of magnitudes.
constexpr double kRelTol = 2e-6;

TEST(TrellisCpu, ProductsMatchTheReferenceOnOddShapes) {
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 1, 2}, {1, 3, 3}, {17, 3, 1}, {3, 17, 17}, {33, 2, 33}, {2, 1, 127}, {5, 7, 127}};
  uint64_t seed = 10;
  for (int K = 1; K <= 8; K++)
    for (Codebook cb : kCodebooks)
      for (const auto& s : shapes) {
        const Problem P = make_problem(K, cb, s[0], s[1], s[2], seed++);
        const int64_t N = 16 * P.tiles_n, ldy = N + 19;  // guard columns after every row
        std::vector<float> xp(size_t(P.m * P.tiles_k * kChunk));
        permute_x(P.x.data(), 16 * P.tiles_k, P.m, P.tiles_k, xp.data());
        for (TrellisIsa isa : trellis_supported_isas()) {
          std::vector<float> y(size_t(P.m * ldy), kPoison);
          trellis_strips(isa, P.t(), xp.data(), P.m, y.data(), ldy, 0, P.tiles_n);
          for (int64_t r = 0; r < P.m; r++) {
            for (int64_t n = 0; n < N; n++) {
              const float v = y[r * ldy + n];
              ASSERT_TRUE(std::isfinite(v)) << trellis_isa_name(isa) << " K=" << K << " unwritten y[" << r << "][" << n << "]";
              ASSERT_LE(std::abs(v - P.ref[r * N + n]), kRelTol * P.mag[r * N + n] + 1e-30)
                  << trellis_isa_name(isa) << " K=" << K << " " << trellis::codebook_name(cb) << " shape " << s[0] << "x"
                  << s[1] << " m=" << s[2] << " y[" << r << "][" << n << "]";
            }
            for (int64_t n = N; n < ldy; n++) ASSERT_TRUE(std::isnan(y[r * ldy + n])) << "guard column written";
          }
        }
      }
}

// A row's result is bit-identical whether it ran alone, in a pair or among 127 rows (registers vs strip buffer), and
// whatever strip range the call covered.
TEST(TrellisCpu, RowResultsDoNotDependOnTheBatch) {
  for (TrellisIsa isa : trellis_supported_isas())
    for (int K : {2, 3, 6}) {
      const Problem P = make_problem(K, Codebook::Mcg, 9, 5, 127, 77 + K);
      const int64_t N = 16 * P.tiles_n;
      std::vector<float> xp(size_t(P.m * P.tiles_k * kChunk));
      permute_x(P.x.data(), 16 * P.tiles_k, P.m, P.tiles_k, xp.data());
      std::vector<float> all(size_t(P.m * N), kPoison);
      trellis_strips(isa, P.t(), xp.data(), P.m, all.data(), N, 0, P.tiles_n);
      for (int64_t m : {int64_t(1), int64_t(2), int64_t(3), int64_t(64), int64_t(65)})
        for (int64_t r0 : {int64_t(0), int64_t(5), P.m - m}) {
          if (r0 + m > P.m) continue;
          std::vector<float> part(size_t(m * N), kPoison);
          // two calls over strip ranges [0, 2) and [2, 5)
          trellis_strips(isa, P.t(), xp.data() + r0 * P.tiles_k * kChunk, m, part.data(), N, 0, 2);
          trellis_strips(isa, P.t(), xp.data() + r0 * P.tiles_k * kChunk, m, part.data() + 32, N, 2, P.tiles_n);
          ASSERT_EQ(std::memcmp(part.data(), all.data() + r0 * N, part.size() * sizeof(float)), 0)
              << trellis_isa_name(isa) << " K=" << K << " rows " << r0 << "+" << m;
        }
    }
}

TEST(TrellisCpu, TransposedProductsMatchTheReference) {
  uint64_t seed = 500;
  const int64_t shapes[][5] = {{1, 1, 1, 0, 1}, {3, 5, 2, 1, 4}, {17, 3, 3, 0, 3}, {4, 17, 1, 3, 16}};  // tiles_k, tiles_n, m, tn0, tn1
  for (int K = 1; K <= 8; K++)
    for (Codebook cb : kCodebooks)
      for (const auto& s : shapes) {
        const int64_t tiles_k = s[0], tiles_n = s[1], m = s[2], tn0 = s[3], tn1 = s[4];
        const std::vector<uint16_t> tiles = random_tiles(tiles_k * tiles_n, K, seed++);
        const TrellisTiles t{tiles.data(), K, cb, tiles_k, tiles_n};
        const int64_t N = 16 * tiles_n, Kd = 16 * tiles_k, ldu = Kd + 5;
        const std::vector<float> z = random_x(m * N, seed++);
        std::vector<double> ref(size_t(m * Kd), 0.0), mag(size_t(m * Kd), 0.0);
        for (int64_t tk = 0; tk < tiles_k; tk++)
          for (int64_t tn = tn0; tn < tn1; tn++)
            for (int p = 0; p < 256; p++) {
              const double w = reference_weight(t.tile(tk, tn), K, cb, p);
              for (int64_t r = 0; r < m; r++) {
                const double v = w * z[r * N + 16 * tn + trellis::walk_n(p)];
                ref[r * Kd + 16 * tk + trellis::walk_k(p)] += v;
                mag[r * Kd + 16 * tk + trellis::walk_k(p)] += std::abs(v);
              }
            }
        for (TrellisIsa isa : trellis_supported_isas()) {
          std::vector<float> u(size_t(m * ldu), kPoison);
          trellis_strips_t(isa, t, z.data() + 16 * tn0, N, m, u.data(), ldu, 0, tiles_k, tn0, tn1);
          for (int64_t r = 0; r < m; r++) {
            for (int64_t k = 0; k < Kd; k++)
              ASSERT_LE(std::abs(u[r * ldu + k] - ref[r * Kd + k]), kRelTol * mag[r * Kd + k] + 1e-30)
                  << trellis_isa_name(isa) << " K=" << K << " " << trellis::codebook_name(cb) << " u[" << r << "][" << k << "]";
            for (int64_t k = Kd; k < ldu; k++) ASSERT_TRUE(std::isnan(u[r * ldu + k])) << "guard written";
          }
        }
      }
}

}  // namespace
