// Block LDL decomposition of a Hessian for LDLQ (TRELLIS.md §4.2), CPU, double precision.
// H = L·D·Lᵀ with L unit lower block-triangular in 16x16 blocks: Cholesky H = C·Cᵀ, then
// L = C·blockdiag(C_ii)^-1. The diagonal blocks (identities) are set to zero, as LDLQ wants them.
// Read from exllamav3 (not copied): exllamav3/modules/quant/exl3_lib/quantize.py (block_ldl, finalize_capture_H).
#pragma once
#include <cstdint>
#include <vector>

namespace trellm::trellis {

// In-place Cholesky of the symmetric positive definite n x n matrix a (row-major, lower triangle read):
// on success the lower triangle holds C with a = C·Cᵀ and the strict upper triangle is zeroed.
// Returns false (a partially overwritten) when a pivot is not positive.
bool cholesky_lower(double* a, int64_t n);

// L (n x n, row-major, f32) from H (n x n, f64, n % 16 == 0). Damping as exllamav3: if the Cholesky fails,
// retry up to `retries` times adding 2·sigma·mean(diag) to the diagonal each time. Returns false if it still fails.
bool block_ldl(const std::vector<double>& h, int64_t n, float sigma, int retries, std::vector<float>& l);

}  // namespace trellm::trellis
