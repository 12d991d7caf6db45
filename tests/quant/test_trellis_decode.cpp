// Decode bit-exactness: TRELLIS.md test vectors, an exhaustive check of all 65536 states per codebook
// against a straightforward _Float16 reference written here, the codebook statistics table, the walk
// order, and state extraction against a bit-by-bit stream reader.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "quant/trellis_decode.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// ---- independent references (no trellm code) ----

uint16_t ref_bits(_Float16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
_Float16 ref_half(uint16_t u) {
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return h;
}

// 3INST/MCG per TRELLIS.md §2.2: the compiler's fp16 addition (RNE).
uint16_t ref_lop3_sum(uint32_t x) {
  x = (x & 0x8FFF8FFFu) ^ 996162400u;
  _Float16 lo = ref_half(uint16_t(x)), hi = ref_half(uint16_t(x >> 16));
  _Float16 r = lo + hi;
  return ref_bits(r);
}
uint16_t ref_3inst(uint32_t s) { return ref_lop3_sum(s * 89226354u + 64248484u); }
uint16_t ref_mcg(uint32_t s) { return ref_lop3_sum(s * 0xCBAC1FEDu); }
// MUL1: fp16 fma with one rounding, done as an exact double fma rounded once by the compiler.
uint16_t ref_mul1(uint32_t s) {
  uint32_t x = s * 0x83DCD12Du;
  int sum = 0;
  for (int i = 0; i < 4; i++) sum += (x >> (8 * i)) & 0xFF;
  double a = double(ref_half(uint16_t(0x6400 + sum)));
  double r = std::fma(a, double(ref_half(0x1EEE)), double(ref_half(0xC931)));
  return ref_bits(_Float16(r));
}

uint16_t ref_decode(int cb, uint32_t s) { return cb == 0 ? ref_3inst(s) : cb == 1 ? ref_mcg(s) : ref_mul1(s); }

// Stream bit b of a tile given as uint16 elements: word b/32 = elem[2m] | elem[2m+1] << 16, MSB first.
int ref_stream_bit(const std::vector<uint16_t>& tile, int b) {
  const int m = b / 32, i = b % 32;  // i-th bit from the top of word m
  // top 16 bits of the word live in element 2m+1
  return i < 16 ? (tile[2 * m + 1] >> (15 - i)) & 1 : (tile[2 * m] >> (31 - i)) & 1;
}
// State p: the 16 stream bits ending at (p+1)K, read bit by bit with wrap-around.
uint32_t ref_state(const std::vector<uint16_t>& tile, int K, int p) {
  const int n = 256 * K;
  uint32_t s = 0;
  for (int i = 0; i < 16; i++) s = (s << 1) | ref_stream_bit(tile, (((p + 1) * K - 16 + i) % n + n) % n);
  return s;
}

std::vector<uint16_t> random_tile(Rng& rng, int K) {
  std::vector<uint16_t> t(16 * K);
  for (auto& v : t) v = uint16_t(rng.next_u32());
  return t;
}

}  // namespace

TEST(TrellisDecode, SpecBitstreamVectorK4) {
  // TRELLIS.md §1.3: K = 4, stream bytes 0x00, 0x01, ..., 0x7F (MSB first).
  std::vector<uint16_t> tile(64);
  for (int m = 0; m < 32; m++) {  // word m = bytes 4m..4m+3 big-endian; int16 pair swapped
    tile[2 * m + 1] = uint16_t(((4 * m) << 8) | (4 * m + 1));
    tile[2 * m] = uint16_t(((4 * m + 2) << 8) | (4 * m + 3));
  }
  const uint16_t want16[8] = {0x0203, 0x0001, 0x0607, 0x0405, 0x0A0B, 0x0809, 0x0E0F, 0x0C0D};
  for (int i = 0; i < 8; i++) EXPECT_EQ(tile[i], want16[i]) << i;
  EXPECT_EQ(state_at(tile.data(), 4, 0), 0xE7F0u);
  EXPECT_EQ(state_at(tile.data(), 4, 1), 0x7F00u);
  EXPECT_EQ(state_at(tile.data(), 4, 2), 0xF000u);
  EXPECT_EQ(state_at(tile.data(), 4, 3), 0x0001u);
  EXPECT_EQ(state_at(tile.data(), 4, 7), 0x0203u);
  uint32_t W[32], lane[8];
  for (int m = 0; m < 32; m++) W[m] = tile_word(tile.data(), m);
  EXPECT_EQ(W[0], 0x00010203u);
  lane_states(W, 4, 0, lane);
  EXPECT_EQ(lane[0], 0xE7F0u);
  EXPECT_EQ(lane[3], 0x0001u);
  EXPECT_EQ(lane[7], 0x0203u);
}

TEST(TrellisDecode, SpecCodebookVectors) {
  // TRELLIS.md §2.2 table: state -> fp16 hex for 3INST, MCG, MUL1.
  struct Row { uint32_t s; uint16_t v[3]; };
  const Row rows[] = {{0x0000, {0x3A25, 0x3F60, 0xC2E8}},
                      {0x0001, {0xBB5B, 0x304E, 0x3921}},
                      {0x1234, {0xC066, 0x3E0F, 0xB89E}},
                      {0x8000, {0xB7F8, 0xB915, 0xBAF2}},
                      {0xFFFF, {0xB110, 0x3ACD, 0xB936}}};
  for (const Row& r : rows) {
    EXPECT_EQ(decode_3inst(r.s), r.v[0]) << std::hex << r.s;
    EXPECT_EQ(decode_mcg(r.s), r.v[1]) << std::hex << r.s;
    EXPECT_EQ(decode_mul1(r.s), r.v[2]) << std::hex << r.s;
    EXPECT_EQ(decode_state<Codebook::Mcg>(r.s), r.v[1]);
    EXPECT_EQ(decode_state(Codebook::Mul1, r.s), r.v[2]);
    // the independent reference agrees with the spec too (so the exhaustive test below means something)
    for (int cb = 0; cb < 3; cb++) EXPECT_EQ(ref_decode(cb, r.s), r.v[cb]) << cb;
  }
}

TEST(TrellisDecode, ExhaustiveAgainstFloat16Reference) {
  const Codebook cbs[3] = {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1};
  for (int cb = 0; cb < 3; cb++) {
    int mismatches = 0;
    for (uint32_t s = 0; s < 65536; s++) {
      const uint16_t got = decode_state(cbs[cb], s), want = ref_decode(cb, s);
      if (got != want && ++mismatches <= 5) ADD_FAILURE() << codebook_name(cbs[cb]) << " state " << s;
    }
    EXPECT_EQ(mismatches, 0) << codebook_name(cbs[cb]);
  }
}

TEST(TrellisDecode, CodebookStatisticsTable) {
  // TRELLIS.md §2.2: RMS / min / max over all 65536 states.
  struct Row { Codebook cb; double rms, mn, mx; };
  const Row rows[] = {{Codebook::Inst3, 1.243711, -3.957, 3.973},
                      {Codebook::Mcg, 1.244112, -3.949, 3.949},
                      {Codebook::Mul1, 1.000312, -3.453, 3.348}};
  for (const Row& r : rows) {
    double ss = 0, mn = 1e9, mx = -1e9;
    for (uint32_t s = 0; s < 65536; s++) {
      const double v = f16_to_f32(decode_state(r.cb, s));
      ss += v * v;
      mn = std::min(mn, v);
      mx = std::max(mx, v);
    }
    EXPECT_NEAR(std::sqrt(ss / 65536), r.rms, 6e-7) << codebook_name(r.cb);
    EXPECT_NEAR(mn, r.mn, 6e-4) << codebook_name(r.cb);
    EXPECT_NEAR(mx, r.mx, 6e-4) << codebook_name(r.cb);
  }
  EXPECT_NEAR(kCodebookScale3Inst, 1.243711, 1e-6);
}

TEST(TrellisDecode, WalkOrderIsTheMmaFragmentLayout) {
  std::vector<int> seen(256, 0);
  for (int p = 0; p < 256; p++) {
    // TRELLIS.md §1.2 written out literally
    const int t = p / 8, j = p % 8, r0 = 2 * (t % 4), c0 = t / 4;
    const int rows[4] = {r0, r0 + 1, r0 + 8, r0 + 9};
    const int k = rows[j % 4], n = j < 4 ? c0 : c0 + 8;
    EXPECT_EQ(walk_k(p), k) << p;
    EXPECT_EQ(walk_n(p), n) << p;
    EXPECT_EQ(walk_pos(k, n), p);
    seen[k * 16 + n]++;
  }
  for (int i = 0; i < 256; i++) EXPECT_EQ(seen[i], 1) << i;
}

TEST(TrellisDecode, StatesMatchBitReaderEveryK) {
  Rng rng(1234);
  for (int K = 1; K <= 8; K++) {
    for (int rep = 0; rep < 4; rep++) {
      const auto tile = random_tile(rng, K);
      std::vector<uint32_t> W(8 * K);
      for (int m = 0; m < 8 * K; m++) W[m] = tile_word(tile.data(), m);
      for (int t = 0; t < 32; t++) {
        uint32_t lane[8];
        lane_states(W.data(), K, t, lane);
        for (int j = 0; j < 8; j++) {
          const int p = 8 * t + j;
          const uint32_t want = ref_state(tile, K, p);
          ASSERT_EQ(state_at(tile.data(), K, p), want) << "K=" << K << " p=" << p;
          ASSERT_EQ(state_at_words(W.data(), K, p), want) << "K=" << K << " p=" << p;
          ASSERT_EQ(lane[j], want) << "K=" << K << " p=" << p;
        }
      }
      // shift-register recurrence, cyclic (tail-biting): state(p) >> K == state(p-1) & (2^(16-K)-1)
      for (int p = 0; p < 256; p++) {
        const uint32_t prev = state_at(tile.data(), K, (p + 255) % 256), cur = state_at(tile.data(), K, p);
        ASSERT_EQ(cur >> K, prev & ((1u << (16 - K)) - 1)) << "K=" << K << " p=" << p;
      }
    }
  }
}

TEST(TrellisDecode, DecodeTilePlacesValuesInWalkOrder) {
  Rng rng(7);
  const auto tile = random_tile(rng, 3);
  uint16_t out[256];
  std::memset(out, 0xFF, sizeof out);  // poison
  decode_tile(tile.data(), 3, Codebook::Mcg, out);
  for (int p = 0; p < 256; p++) {
    const int t = p / 8, j = p % 8;
    const int k = 2 * (t % 4) + (j & 1) + ((j % 4) >= 2 ? 8 : 0), n = t / 4 + (j >= 4 ? 8 : 0);
    EXPECT_EQ(out[k * 16 + n], ref_mcg(ref_state(tile, 3, p))) << p;
  }
}
