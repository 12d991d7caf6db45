// Bit-exact bf16 / fp16 <-> f32 conversions, usable on host and device.
// Rounding is round-to-nearest-even, like the hardware (cvt.rn) and torch.
#pragma once
#include <cstdint>
#include <cstring>

#include "core/hd.h"

namespace trellm {

TRELLM_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

TRELLM_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

TRELLM_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

TRELLM_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

TRELLM_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

TRELLM_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520 -> Inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): value / 2^-24 rounded to nearest even integer
    if (a < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 exactly ties to even = 0)
    uint32_t exp = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // man * 2^(exp-150) / 2^-24 = man >> (126 - exp)
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return uint16_t(sign | q);
  }
  // normal: rebias exponent and round 13 dropped mantissa bits to nearest even
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  r -= 0x38000000u;  // (127 - 15) << 23
  return uint16_t(sign | (r >> 13));
}

}  // namespace trellm
