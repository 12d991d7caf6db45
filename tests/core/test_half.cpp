// bf16/fp16 conversions against the compiler's own _Float16 and exact bit arithmetic.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/half.h"
#include "core/rng.h"

using namespace trellm;

TEST(Half, F16ToF32MatchesCompilerForAllBitPatterns) {
  for (uint32_t h = 0; h < 65536; h++) {
    _Float16 x;
    uint16_t hb = uint16_t(h);
    std::memcpy(&x, &hb, 2);
    float want = float(x);
    float got = f16_to_f32(hb);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << h;
    } else {
      EXPECT_EQ(f32_to_bits(got), f32_to_bits(want)) << std::hex << h;
    }
  }
}

TEST(Half, F32ToF16MatchesCompilerRoundToNearestEven) {
  Rng rng(1);
  int checked = 0;
  auto check = [&](float f) {
    _Float16 want = _Float16(f);
    uint16_t wb;
    std::memcpy(&wb, &want, 2);
    uint16_t got = f32_to_f16(f);
    if (std::isnan(f)) {
      EXPECT_EQ(got & 0x7c00, 0x7c00);
      EXPECT_NE(got & 0x3ff, 0);
    } else {
      ASSERT_EQ(got, wb) << "f=" << f << " bits=" << std::hex << f32_to_bits(f);
    }
    checked++;
  };
  for (int i = 0; i < 2000000; i++) check(bits_to_f32(rng.next_u32()));
  // Every f16 value, and the exact midpoints between neighbours (ties to even).
  for (uint32_t h = 0; h < 0x7c00; h++) {
    float a = f16_to_f32(uint16_t(h)), b = f16_to_f32(uint16_t(h + 1));
    check(a);
    check(-a);
    check(float((double(a) + double(b)) / 2));
    check(-float((double(a) + double(b)) / 2));
  }
  check(65504.0f);
  check(65519.99f);
  check(65520.0f);
  check(INFINITY);
  check(-INFINITY);
  check(NAN);
  EXPECT_GT(checked, 2000000);
}

TEST(Half, Bf16RoundTripAndRounding) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = bf16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(f32_to_bf16(f), uint16_t(h));
  }
  // 1 + 2^-8 lies exactly between bf16 1.0 and 1.0078125: ties to even gives 1.0.
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
  // 1 + 3*2^-8 lies between 1.0078125 (odd mantissa) and 1.015625: rounds up to even.
  EXPECT_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256 + 1.0f / 65536), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}
