// Scalar/AVX2 building blocks of the CPU backend.
#pragma once
#include <cstdint>

#include "core/dtype.h"
#include "core/half.h"

namespace trellm::cpu {

// Converts n elements of a float tensor (F32 / F16 / BF16) to f32.
void to_f32(float* dst, const void* src, DType t, int64_t n);
// Dot product of two f32 vectors (AVX2+FMA when built with it; 8-wide partial sums).
float dot(const float* a, const float* b, int64_t n);
// y += a * x
void axpy(float* y, float a, const float* x, int64_t n);

inline float load_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return 0.0f;
  }
}

}  // namespace trellm::cpu
