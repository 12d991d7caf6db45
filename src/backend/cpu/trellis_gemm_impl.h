// Internals of the fused trellis product (trellis_gemm.h): the kernel table each variant exports. The variants'
// shared code (lane geometry, driver loops) is trellis_gemm_drivers.inc, which each variant includes after its
// `#pragma GCC target`.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/trellis_gemm.h"
#include "quant/trellis_decode.h"

namespace trellm::cpu {

struct TrellisKernels {
  void (*strips)(const TrellisTiles& t, const float* xp, int64_t m, float* y, int64_t ldy, int64_t tn0, int64_t tn1);
  void (*strips_t)(const TrellisTiles& t, const float* z, int64_t ldz, int64_t m, float* u, int64_t ldu, int64_t tk0,
                   int64_t tk1, int64_t tn0, int64_t tn1);
  void (*decode_tile)(const uint16_t* tile, int K, trellis::Codebook cb, float out[256]);
  void (*round_f16)(float* x, int64_t n);
};

// Each returns nullptr when the variant is not compiled into this binary (other architecture).
const TrellisKernels* trellis_kernels_avx2();
const TrellisKernels* trellis_kernels_avx512();
const TrellisKernels* trellis_kernels_avx512fp16();
const TrellisKernels* trellis_kernels_neon();
const TrellisKernels* trellis_kernels_scalar();


}  // namespace trellm::cpu
