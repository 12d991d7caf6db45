// The AVX2 (+FMA, F16C) variant of the fused trellis product: 8 states per ymm in 32-bit lanes.
//
// A chunk (32 walk positions) is 4 groups of 8 (one trellis lane t each). Per group: one load of 8 words from a
// padded copy of the tile (word -1 = the last word, for the tail-biting wrap), two vpermd that give each lane its
// words W[i0] and W[i1], and (W[i0] << (32 - shift) | W[i1] >> shift) & 0xFFFF: the state (word_i0 / word_i1 /
// word_shift, from trellis::state_window). The codebook then runs in 32-bit lanes: x = state * M (+ b), the
// mask/xor, and both fp16 halves turned into f32 scaled by 2^-112 with two shifts and a mask each (an arithmetic
// shift by 3 aligns fp16's 5-bit exponent with f32's 8 bits and copies the sign: exact, and never denormal because
// the codebook's halves are >= 1/8 in magnitude). Their sum is exact; Veltkamp's split rounds it to 11 significant
// bits (nearest even) and a multiply by 2^112 restores the scale. MUL1: the byte sum by vpmaddubsw + vpmaddwd,
// 1024 + bytesum times scale plus bias (exact in f32), rounded the same way.
#include "backend/cpu/trellis_gemm_impl.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#if defined(__clang__)  // clang has no GCC target pragma: the same target as an attribute on every function below
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#endif
#ifndef __clang__
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif
#include "backend/cpu/trellis_gemm_drivers.inc"

namespace trellm::cpu {
namespace {

struct Geom256 {
  std::array<int32_t, 8> i0{}, i1{}, sl{}, sr{};  // vpermd indices (relative to base) and the two shifts
  int base = 0;                                    // first word of the load in the padded copy
};

// Group t (positions 8t .. 8t+7). Padded copy: index 0 = word 8K-1, index 1 + i = word i.
constexpr Geom256 geom256(int K, int t) {
  Geom256 g;
  int lo = 1 << 30;
  for (int j = 0; j < 8; j++) lo = std::min(lo, word_i0(K, 8 * t + j) + 1);
  g.base = lo;
  for (int j = 0; j < 8; j++) {
    const int p = 8 * t + j;
    g.i0[j] = word_i0(K, p) + 1 - lo;
    g.i1[j] = word_i1(K, p) + 1 - lo;
    g.sr[j] = word_shift(K, p);
    g.sl[j] = 32 - word_shift(K, p);  // 32: the high word contributes nothing (vpsllvd gives 0)
  }
  return g;
}

constexpr bool geom256_ok(int K) {
  for (int t = 0; t < 32; t++) {
    const Geom256 g = geom256(K, t);
    for (int j = 0; j < 8; j++)
      if (g.i0[j] < 0 || g.i0[j] > 7 || g.i1[j] < 0 || g.i1[j] > 7) return false;
    if (g.base + 8 > 8 * K + 1 + 8) return false;  // the load stays inside the padded copy
  }
  return true;
}
static_assert(geom256_ok(1) && geom256_ok(2) && geom256_ok(3) && geom256_ok(4) && geom256_ok(5) && geom256_ok(6) &&
              geom256_ok(7) && geom256_ok(8));

template <int K, int T>
inline constexpr Geom256 kGeom256 = geom256(K, T);

inline __m256i load_i32x8(const std::array<int32_t, 8>& a) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.data()));
}

// The barrier keeps GCC from contracting c - s into fma(s, 8193, -s) (which would be exact, and wrong here).
inline __m256 round11(__m256 s) {
  __m256 c = _mm256_mul_ps(s, _mm256_set1_ps(8193.0f));
  __asm__("" : "+v"(c));
  return _mm256_sub_ps(c, _mm256_sub_ps(c, s));
}

struct Ops256 {
  struct V {
    __m256 a, b;  // lanes 0-7, 8-15
  };
  static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, V v) {
    _mm256_storeu_ps(p, v.a);
    _mm256_storeu_ps(p + 8, v.b);
  }
  static V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
  static V bcast2(float a, float b) {
    const __m256 v = _mm256_blend_ps(_mm256_set1_ps(a), _mm256_set1_ps(b), 0xF0);
    return {v, v};
  }

  template <int K, trellis::Codebook CB>
  struct Tile {
    alignas(32) uint32_t w[8 * K + 1 + 8];
    explicit Tile(const uint16_t* tile) {
      std::memcpy(w + 1, tile, 32 * K);
      w[0] = w[8 * K];
      std::memset(w + 8 * K + 1, 0, 32);
    }

    template <int T>
    __m256 group() const {
      constexpr const Geom256& g = kGeom256<K, T>;
      const __m256i win = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g.base));
      const __m256i A = _mm256_permutevar8x32_epi32(win, load_i32x8(g.i0));
      const __m256i B = _mm256_permutevar8x32_epi32(win, load_i32x8(g.i1));
      const __m256i s = _mm256_and_si256(_mm256_or_si256(_mm256_sllv_epi32(A, load_i32x8(g.sl)), _mm256_srlv_epi32(B, load_i32x8(g.sr))),
                                         _mm256_set1_epi32(0xFFFF));
      if constexpr (CB == trellis::Codebook::Mul1) {
        const __m256i x = _mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::kMul1Mul)));
        const __m256i bs = _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_add_epi32(bs, _mm256_set1_epi32(1024)));
        const __m256 sc = _mm256_cvtph_ps(_mm_set1_epi16(short(trellis::kMul1Scale)));
        const __m256 bi = _mm256_cvtph_ps(_mm_set1_epi16(short(trellis::kMul1Bias)));
        return round11(_mm256_fmadd_ps(v, sc, bi));  // exact, then rounded
      } else {
        __m256i x = CB == trellis::Codebook::Inst3
                        ? _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::kInst3Mul))),
                                           _mm256_set1_epi32(int(trellis::kInst3Add)))
                        : _mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::kMcgMul)));
        x = _mm256_xor_si256(_mm256_and_si256(x, _mm256_set1_epi32(int(trellis::kFpMaskAnd))),
                             _mm256_set1_epi32(int(trellis::kFpMaskXor)));
        const __m256i m = _mm256_set1_epi32(int(0x8FFFE000u));
        const __m256i h = _mm256_and_si256(_mm256_srai_epi32(x, 3), m);                         // high half * 2^-112
        const __m256i l = _mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(x, 16), 3), m);  // low half * 2^-112
        const __m256 sum = _mm256_add_ps(_mm256_castsi256_ps(l), _mm256_castsi256_ps(h));
        return _mm256_mul_ps(round11(sum), _mm256_set1_ps(0x1p112f));
      }
    }

    template <int C>
    void chunk(V& lo, V& hi) const {
      lo = {group<4 * C>(), group<4 * C + 1>()};
      hi = {group<4 * C + 2>(), group<4 * C + 3>()};
    }
  };
};

void round_f16_256(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  for (; i < n; i++) x[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}

const TrellisKernels kKernels256 = {dispatch_strips<Ops256>, dispatch_strips_t<Ops256>, dispatch_decode_tile<Ops256>,
                                    round_f16_256};

}  // namespace
}  // namespace trellm::cpu
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace trellm::cpu {
const TrellisKernels* trellis_kernels_avx2() { return &kKernels256; }
}  // namespace trellm::cpu
#else
namespace trellm::cpu {
const TrellisKernels* trellis_kernels_avx2() { return nullptr; }
}  // namespace trellm::cpu
#endif
