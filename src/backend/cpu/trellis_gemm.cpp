// The fused trellis product: the portable scalar variant (the reference the SIMD ones are tested against), the
// activation permutations, and the run-time choice of variant.
#include "backend/cpu/trellis_gemm.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "backend/cpu/trellis_gemm_impl.h"
#include "core/error.h"
#include "core/half.h"

namespace trellm::cpu {

bool trellis_neon_fp16_available();  // trellis_gemm_neon.cpp

namespace {

// ---- scalar: trellis::decode_state on every position, f32 sums over k in increasing order ----

void scalar_decode_tile(const uint16_t* tile, int K, trellis::Codebook cb, float out[256]) {
  for (int p = 0; p < trellis::kTileElems; p++) out[p] = f16_to_f32(trellis::decode_state(cb, trellis::state_at(tile, K, p)));
}

// Row k's x from the permuted copy: any lane l with walk_k(l) == k (walk_pos(k, 0) is one, < 32).
inline float x_at(const float* xp_row, int64_t tk, int k) { return xp_row[tk * kChunk + trellis::walk_pos(k, 0)]; }

void scalar_strips(const TrellisTiles& t, const float* xp, int64_t m, float* y, int64_t ldy, int64_t tn0, int64_t tn1) {
  std::vector<float> acc(size_t(m) * 16);
  float w[256];
  for (int64_t tn = tn0; tn < tn1; tn++) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t tk = 0; tk < t.tiles_k; tk++) {
      scalar_decode_tile(t.tile(tk, tn), t.K, t.cb, w);
      for (int64_t r = 0; r < m; r++) {
        const float* xr = xp + r * t.tiles_k * kChunk;
        for (int p = 0; p < 256; p++) acc[r * 16 + trellis::walk_n(p)] += x_at(xr, tk, trellis::walk_k(p)) * w[p];
      }
    }
    for (int64_t r = 0; r < m; r++)
      for (int n = 0; n < 16; n++) y[r * ldy + 16 * (tn - tn0) + n] = acc[r * 16 + n];
  }
}

void scalar_strips_t(const TrellisTiles& t, const float* z, int64_t ldz, int64_t m, float* u, int64_t ldu, int64_t tk0,
                     int64_t tk1, int64_t tn0, int64_t tn1) {
  const int64_t nt = tn1 - tn0;
  float w[256];
  std::vector<float> acc(size_t(m) * 16);
  for (int64_t tk = tk0; tk < tk1; tk++) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t s = 0; s < nt; s++) {
      scalar_decode_tile(t.tile(tk, tn0 + s), t.K, t.cb, w);
      for (int64_t r = 0; r < m; r++) {
        const float* zs = z + r * ldz + 16 * s;
        for (int p = 0; p < 256; p++) acc[r * 16 + trellis::walk_k(p)] += w[p] * zs[trellis::walk_n(p)];
      }
    }
    for (int64_t r = 0; r < m; r++)
      for (int k = 0; k < 16; k++) u[r * ldu + 16 * (tk - tk0) + k] = acc[r * 16 + k];
  }
}

void scalar_round_f16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = f16_to_f32(f32_to_f16(x[i]));
}

const TrellisKernels kScalar = {scalar_strips, scalar_strips_t, scalar_decode_tile, scalar_round_f16};

const TrellisKernels* kernels_of(TrellisIsa isa) {
  switch (isa) {
    case TrellisIsa::Scalar: return &kScalar;
    case TrellisIsa::Avx2: return trellis_kernels_avx2();
    case TrellisIsa::Avx512: return trellis_kernels_avx512();
    case TrellisIsa::Avx512Fp16: return trellis_kernels_avx512fp16();
    case TrellisIsa::Neon: return trellis_kernels_neon();
  }
  return nullptr;
}

bool cpu_has(TrellisIsa isa) {
  switch (isa) {
    case TrellisIsa::Scalar: return true;
#if defined(__x86_64__) || defined(_M_X64)
    case TrellisIsa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case TrellisIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    case TrellisIsa::Avx512Fp16:
      return cpu_has(TrellisIsa::Avx512) && __builtin_cpu_supports("avx512fp16") && __builtin_cpu_supports("avx512vbmi2");
#endif
#if defined(__aarch64__)
    case TrellisIsa::Neon: return trellis_neon_fp16_available();
#endif
    default: return false;
  }
}

std::atomic<int> g_forced{-1};

}  // namespace

const TrellisKernels* trellis_kernels_scalar() { return &kScalar; }

const char* trellis_isa_name(TrellisIsa isa) {
  switch (isa) {
    case TrellisIsa::Scalar: return "scalar";
    case TrellisIsa::Avx2: return "avx2";
    case TrellisIsa::Avx512: return "avx512";
    case TrellisIsa::Avx512Fp16: return "avx512fp16";
    case TrellisIsa::Neon: return "neon-fp16";
  }
  return "?";
}

bool trellis_isa_supported(TrellisIsa isa) { return kernels_of(isa) != nullptr && cpu_has(isa); }

std::vector<TrellisIsa> trellis_supported_isas() {
  std::vector<TrellisIsa> v;
  for (TrellisIsa i : {TrellisIsa::Scalar, TrellisIsa::Avx2, TrellisIsa::Avx512, TrellisIsa::Avx512Fp16, TrellisIsa::Neon})
    if (trellis_isa_supported(i)) v.push_back(i);
  return v;
}

TrellisIsa trellis_active_isa() {
  const int f = g_forced.load(std::memory_order_relaxed);
  if (f >= 0) return TrellisIsa(f);
  static const TrellisIsa best = trellis_supported_isas().back();  // listed from slowest to fastest
  return best;
}

void trellis_force_isa(TrellisIsa isa) {
  TRELLM_ASSERT(trellis_isa_supported(isa), "trellis variant ", trellis_isa_name(isa), " is not supported here");
  g_forced.store(int(isa), std::memory_order_relaxed);
}

void permute_x(const float* x, int64_t ldx, int64_t m, int64_t tiles_k, float* xp) {
  for (int64_t r = 0; r < m; r++)
    for (int64_t tk = 0; tk < tiles_k; tk++) {
      const float* src = x + r * ldx + 16 * tk;
      float* dst = xp + (r * tiles_k + tk) * kChunk;
      for (int l = 0; l < kChunk; l++) dst[l] = src[trellis::walk_k(l)];
    }
}

void trellis_strips(TrellisIsa isa, const TrellisTiles& t, const float* xp, int64_t m, float* y, int64_t ldy, int64_t tn0,
                    int64_t tn1) {
  if (m <= 0 || tn1 <= tn0) return;
  kernels_of(isa)->strips(t, xp, m, y, ldy, tn0, tn1);
}

void trellis_strips_t(TrellisIsa isa, const TrellisTiles& t, const float* z, int64_t ldz, int64_t m, float* u, int64_t ldu,
                      int64_t tk0, int64_t tk1, int64_t tn0, int64_t tn1) {
  if (m <= 0 || tk1 <= tk0 || tn1 <= tn0) return;
  kernels_of(isa)->strips_t(t, z, ldz, m, u, ldu, tk0, tk1, tn0, tn1);
}

void trellis_decode_tile(TrellisIsa isa, const uint16_t* tile, int K, trellis::Codebook cb, float out[256]) {
  kernels_of(isa)->decode_tile(tile, K, cb, out);
}

void round_to_f16(TrellisIsa isa, float* x, int64_t n) { kernels_of(isa)->round_f16(x, n); }

int64_t trellis_strip_group(int64_t tiles_k, int64_t m) {
  if (m <= 2) return 16;  // decoded into registers: a block of 16 strips reads 16 consecutive tiles per row
  // Decoded strips of a group (tiles_k KB each) share L2 with a 64-row block of activations (tiles_k * 8 KB).
  return std::clamp<int64_t>((512 + tiles_k - 1) / tiles_k, 1, 8);
}

}  // namespace trellm::cpu
