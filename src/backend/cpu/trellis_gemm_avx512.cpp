// The AVX-512 (F/BW/DQ/VL) variant of the fused trellis product (trellis_gemm_x86_512.inc).
#include "backend/cpu/trellis_gemm_impl.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

// Everything below is compiled for AVX-512; the headers above were compiled for the baseline (their inline
// functions may be shared with the rest of the program). The drivers come from trellis_gemm_impl.h.
#if defined(__clang__)  // clang has no GCC target pragma: the same target as an attribute on every function below
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#endif
// GCC 12 reports the _mm512_undefined_* inside its own intrinsics (cvtph2ps, extracts) as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#ifndef __clang__
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")
#endif
#include "backend/cpu/trellis_gemm_drivers.inc"
#define TRELLM_X86_FP16 0
#include "backend/cpu/trellis_gemm_x86_512.inc"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace trellm::cpu {
const TrellisKernels* trellis_kernels_avx512() { return &kKernels512; }
}  // namespace trellm::cpu
#else
namespace trellm::cpu {
const TrellisKernels* trellis_kernels_avx512() { return nullptr; }
}  // namespace trellm::cpu
#endif
