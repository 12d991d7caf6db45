#include "backend/cpu/cpu_kernels.h"

#include "core/error.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TRELLM_AVX2 1
#endif

namespace trellm::cpu {

void to_f32(float* dst, const void* src, DType t, int64_t n) {
  int64_t i = 0;
  if (t == DType::F32) {
    const float* s = static_cast<const float*>(src);
    for (; i < n; i++) dst[i] = s[i];
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (t == DType::BF16) {
#ifdef TRELLM_AVX2
    for (; i + 8 <= n; i += 8) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16);
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
    }
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    return;
  }
  if (t == DType::F16) {
#if defined(TRELLM_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; i++) dst[i] = f16_to_f32(s[i]);
    return;
  }
  TRELLM_ASSERT(false, "to_f32: unsupported dtype ", dtype_name(t));
}

float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef TRELLM_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  sum = _mm_cvtss_f32(s4);
#endif
  for (; i < n; i++) sum += a[i] * b[i];
  return sum;
}

void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t i = 0;
#ifdef TRELLM_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; i++) y[i] += a * x[i];
}

}  // namespace trellm::cpu
