// The NEON variant of the fused trellis product, with the Armv8.2 fp16 vector arithmetic (FEAT_FP16: Apple M1 and
// later, Graviton 2 and later, Cortex-A76 and later): 8 states per q register in 16-bit lanes.
//
// A chunk (32 walk positions) is 4 groups of 8 (one trellis lane t each). The tile is copied once into stream
// half-word order (each 32-bit word's halves swapped, half-word -1 = the stream's last, for the tail-biting wrap);
// per group, one 16-byte load, two vqtbl1q_u8 that give each lane its half-words H[a] and H[a+1], and
// (H[a] << b) | (H[a+1] >> (16 - b)) by vshlq_u16: the state (halfword_a / halfword_b, from trellis::state_window).
// The codebook runs in 32-bit lanes (x = state * M (+ b), mask/xor), the halves are narrowed back to 16-bit lanes
// and added by vaddq_f16 (3INST / MCG) or 1024 + bytesum goes through vfmaq_f16 (MUL1): the codebook's own fp16
// rounding. Speed is not measured (no Arm machine here); tests run this variant under qemu-user.
#include "backend/cpu/trellis_gemm_impl.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#if !defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("fp16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+fp16")
#endif
#define TRELLM_NEON_TARGET_PUSHED 1
#endif

#include "backend/cpu/trellis_gemm_drivers.inc"

namespace trellm::cpu {
namespace {

struct GeomNeon {
  std::array<uint8_t, 16> ta{}, tb{};  // vqtbl1q_u8 byte indices for H[a], H[a+1] (relative to base)
  std::array<int16_t, 8> sl{}, sr{};   // b and b - 16 (vshlq: negative = right shift)
  int base = 0;                        // first half-word of the load in the copy (index 0 = half-word -1)
};

constexpr GeomNeon geom_neon(int K, int t) {
  GeomNeon g;
  int lo = 1 << 30;
  for (int j = 0; j < 8; j++) lo = std::min(lo, halfword_a(K, 8 * t + j) + 1);
  g.base = lo;
  for (int j = 0; j < 8; j++) {
    const int p = 8 * t + j, a = halfword_a(K, p) + 1 - lo, b = halfword_b(K, p);
    const int a1 = b == 0 ? a : a + 1;  // b == 0: H[a+1] is shifted out
    g.ta[2 * j] = uint8_t(2 * a);
    g.ta[2 * j + 1] = uint8_t(2 * a + 1);
    g.tb[2 * j] = uint8_t(2 * a1);
    g.tb[2 * j + 1] = uint8_t(2 * a1 + 1);
    g.sl[j] = int16_t(b);
    g.sr[j] = int16_t(b - 16);
  }
  return g;
}

constexpr bool geom_neon_ok(int K) {
  for (int t = 0; t < 32; t++) {
    const GeomNeon g = geom_neon(K, t);
    for (int i = 0; i < 16; i++)
      if (g.ta[i] > 15 || g.tb[i] > 15) return false;
    if (g.base + 8 > 16 * K + 1 + 8) return false;
  }
  return true;
}
static_assert(geom_neon_ok(1) && geom_neon_ok(2) && geom_neon_ok(3) && geom_neon_ok(4) && geom_neon_ok(5) &&
              geom_neon_ok(6) && geom_neon_ok(7) && geom_neon_ok(8));

template <int K, int T>
inline constexpr GeomNeon kGeomNeon = geom_neon(K, T);

struct OpsNeon {
  struct V {
    float32x4_t v[4];
  };
  static V zero() { return {{vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)}}; }
  static V load(const float* p) { return {{vld1q_f32(p), vld1q_f32(p + 4), vld1q_f32(p + 8), vld1q_f32(p + 12)}}; }
  static void store(float* p, V v) {
    for (int i = 0; i < 4; i++) vst1q_f32(p + 4 * i, v.v[i]);
  }
  static V bcast2(float a, float b) { return {{vdupq_n_f32(a), vdupq_n_f32(b), vdupq_n_f32(a), vdupq_n_f32(b)}}; }
  static V fma(V a, V b, V c) {
    V r;
    for (int i = 0; i < 4; i++) r.v[i] = vfmaq_f32(c.v[i], a.v[i], b.v[i]);
    return r;
  }

  template <int K, trellis::Codebook CB>
  struct Tile {
    alignas(16) uint16_t h[16 * K + 1 + 15];  // h[1 + i] = stream half-word i, h[0] = half-word 16K - 1
    explicit Tile(const uint16_t* tile) {
      for (int i = 0; i < 16 * K; i += 8) vst1q_u16(h + 1 + i, vrev32q_u16(vld1q_u16(tile + i)));
      h[0] = h[16 * K];
      std::memset(h + 16 * K + 1, 0, 15 * sizeof(uint16_t));
    }

    template <int T>
    float16x8_t group() const {
      constexpr const GeomNeon& g = kGeomNeon<K, T>;
      const uint8x16_t win = vreinterpretq_u8_u16(vld1q_u16(h + g.base));
      const uint16x8_t A = vreinterpretq_u16_u8(vqtbl1q_u8(win, vld1q_u8(g.ta.data())));
      const uint16x8_t B = vreinterpretq_u16_u8(vqtbl1q_u8(win, vld1q_u8(g.tb.data())));
      const uint16x8_t s = vorrq_u16(vshlq_u16(A, vld1q_s16(g.sl.data())), vshlq_u16(B, vld1q_s16(g.sr.data())));
      constexpr uint32_t M = CB == trellis::Codebook::Inst3 ? trellis::kInst3Mul
                             : CB == trellis::Codebook::Mcg ? trellis::kMcgMul
                                                            : trellis::kMul1Mul;
      uint32x4_t x0 = vmulq_u32(vmovl_u16(vget_low_u16(s)), vdupq_n_u32(M));
      uint32x4_t x1 = vmulq_u32(vmovl_high_u16(s), vdupq_n_u32(M));
      if constexpr (CB == trellis::Codebook::Mul1) {
        const uint32x4_t b0 = vpaddlq_u16(vpaddlq_u8(vreinterpretq_u8_u32(x0)));
        const uint32x4_t b1 = vpaddlq_u16(vpaddlq_u8(vreinterpretq_u8_u32(x1)));
        const uint16x8_t s16 = vaddq_u16(vcombine_u16(vmovn_u32(b0), vmovn_u32(b1)), vdupq_n_u16(0x6400));
        return vfmaq_f16(vreinterpretq_f16_u16(vdupq_n_u16(trellis::kMul1Bias)), vreinterpretq_f16_u16(s16),
                         vreinterpretq_f16_u16(vdupq_n_u16(trellis::kMul1Scale)));
      } else {
        if constexpr (CB == trellis::Codebook::Inst3) {
          x0 = vaddq_u32(x0, vdupq_n_u32(trellis::kInst3Add));
          x1 = vaddq_u32(x1, vdupq_n_u32(trellis::kInst3Add));
        }
        const uint32x4_t am = vdupq_n_u32(trellis::kFpMaskAnd), xm = vdupq_n_u32(trellis::kFpMaskXor);
        x0 = veorq_u32(vandq_u32(x0, am), xm);
        x1 = veorq_u32(vandq_u32(x1, am), xm);
        const uint16x8_t lo = vcombine_u16(vmovn_u32(x0), vmovn_u32(x1));
        const uint16x8_t hi = vcombine_u16(vshrn_n_u32(x0, 16), vshrn_n_u32(x1, 16));
        return vaddq_f16(vreinterpretq_f16_u16(lo), vreinterpretq_f16_u16(hi));
      }
    }

    template <int C>
    void chunk(V& lo, V& hi) const {
      const float16x8_t g0 = group<4 * C>(), g1 = group<4 * C + 1>(), g2 = group<4 * C + 2>(), g3 = group<4 * C + 3>();
      lo = {{vcvt_f32_f16(vget_low_f16(g0)), vcvt_high_f32_f16(g0), vcvt_f32_f16(vget_low_f16(g1)), vcvt_high_f32_f16(g1)}};
      hi = {{vcvt_f32_f16(vget_low_f16(g2)), vcvt_high_f32_f16(g2), vcvt_f32_f16(vget_low_f16(g3)), vcvt_high_f32_f16(g3)}};
    }
  };
};

void round_f16_neon(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vcvt_f32_f16(vcvt_f16_f32(vld1q_f32(x + i))));
  for (; i < n; i++) x[i] = vgetq_lane_f32(vcvt_f32_f16(vcvt_f16_f32(vdupq_n_f32(x[i]))), 0);
}

const TrellisKernels kKernelsNeon = {dispatch_strips<OpsNeon>, dispatch_strips_t<OpsNeon>, dispatch_decode_tile<OpsNeon>,
                                     round_f16_neon};

}  // namespace
}  // namespace trellm::cpu

#if defined(TRELLM_NEON_TARGET_PUSHED)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace trellm::cpu {
const TrellisKernels* trellis_kernels_neon() { return &kKernelsNeon; }
// The fp16 vector arithmetic is optional before Armv8.2: ask the kernel (Linux), always there on Apple silicon.
bool trellis_neon_fp16_available() {
#if defined(__APPLE__)
  return true;
#elif defined(__linux__)
  return (getauxval(AT_HWCAP) & (1ul << 10)) != 0;  // HWCAP_ASIMDHP
#else
  return false;
#endif
}
}  // namespace trellm::cpu
#else
namespace trellm::cpu {
const TrellisKernels* trellis_kernels_neon() { return nullptr; }
bool trellis_neon_fp16_available() { return false; }
}  // namespace trellm::cpu
#endif
