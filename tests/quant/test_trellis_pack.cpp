// Packing: states <-> EXL3 bitstream for every K, against an independent bit writer and the spec vector.
#include <gtest/gtest.h>

#include <vector>

#include "core/rng.h"
#include "quant/trellis_pack.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// Independent writer: stream bit b (MSB first within each K-bit chunk) goes to bit 31-(b%32) of word b/32;
// word m is stored as int16 elements 2m (low half) and 2m+1 (high half).
std::vector<uint16_t> ref_pack(const std::vector<uint32_t>& chunks, int K) {
  std::vector<uint32_t> words(8 * K, 0);
  for (int b = 0; b < 256 * K; b++) {
    const uint32_t bit = (chunks[b / K] >> (K - 1 - b % K)) & 1;
    words[b / 32] |= bit << (31 - b % 32);
  }
  std::vector<uint16_t> tile(16 * K);
  for (int m = 0; m < 8 * K; m++) {
    tile[2 * m] = uint16_t(words[m]);
    tile[2 * m + 1] = uint16_t(words[m] >> 16);
  }
  return tile;
}

// The tail-biting state sequence of a chunk sequence: state(p) = the last 16 bits of the circular
// chunk stream up to and including chunk p.
std::vector<uint16_t> states_of(const std::vector<uint32_t>& chunks, int K) {
  std::vector<uint16_t> s(256);
  for (int p = 0; p < 256; p++) {
    uint32_t v = 0;
    for (int i = 16 / K + 1; i >= 0; i--) v = (v << K) | chunks[((p - i) % 256 + 256) % 256];
    s[p] = uint16_t(v & 0xFFFF);
  }
  return s;
}

}  // namespace

TEST(TrellisPack, RoundTripEveryK) {
  Rng rng(99);
  for (int K = 1; K <= 8; K++) {
    for (int rep = 0; rep < 20; rep++) {
      std::vector<uint32_t> chunks(256);
      for (auto& c : chunks) c = rng.next_u32() & ((1u << K) - 1);
      const auto states = states_of(chunks, K);
      ASSERT_TRUE(is_tail_biting(states.data(), K)) << K;
      std::vector<uint16_t> tile(16 * K, 0xDEAD), back(256, 0xBEEF);  // poisoned outputs
      pack_tile(states.data(), K, tile.data());
      EXPECT_EQ(tile, ref_pack(chunks, K)) << "K=" << K;
      unpack_tile(tile.data(), K, back.data());
      EXPECT_EQ(back, states) << "K=" << K;
    }
  }
}

TEST(TrellisPack, AnyTileRepacksToItself) {
  // Every bit pattern is a valid stream: unpack -> pack is the identity on random tiles.
  Rng rng(5);
  for (int K = 1; K <= 8; K++) {
    std::vector<uint16_t> tile(16 * K), states(256), again(16 * K, 0);
    for (auto& v : tile) v = uint16_t(rng.next_u32());
    unpack_tile(tile.data(), K, states.data());
    EXPECT_TRUE(is_tail_biting(states.data(), K));
    pack_tile(states.data(), K, again.data());
    EXPECT_EQ(again, tile) << "K=" << K;
  }
}

TEST(TrellisPack, SpecVectorK4) {
  // TRELLIS.md §1.3: the K = 4 stream of bytes 0x00..0x7F: chunk p is nibble p.
  std::vector<uint32_t> chunks(256);
  for (int p = 0; p < 256; p++) chunks[p] = p % 2 == 0 ? (p / 2) >> 4 : (p / 2) & 15;
  const auto states = states_of(chunks, 4);
  EXPECT_EQ(states[0], 0xE7F0);
  EXPECT_EQ(states[7], 0x0203);
  std::vector<uint16_t> tile(64);
  pack_tile(states.data(), 4, tile.data());
  const uint16_t want[8] = {0x0203, 0x0001, 0x0607, 0x0405, 0x0A0B, 0x0809, 0x0E0F, 0x0C0D};
  for (int i = 0; i < 8; i++) EXPECT_EQ(tile[i], want[i]) << i;
}

TEST(TrellisPack, DetectsBrokenTailBiting) {
  Rng rng(3);
  for (int K = 1; K <= 8; K++) {
    std::vector<uint32_t> chunks(256);
    for (auto& c : chunks) c = rng.next_u32() & ((1u << K) - 1);
    auto states = states_of(chunks, K);
    states[0] ^= 0x8000;  // top bit of state 0 must equal a bit of state 255 (16 - K >= 8 > 0 bits overlap)
    EXPECT_FALSE(is_tail_biting(states.data(), K)) << K;
  }
}
