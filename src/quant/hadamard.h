// The EXL3 incoherence transform: the normalised 128x128 Sylvester Hadamard matrix in natural order,
// H[i][j] = (-1)^popcount(i & j) / sqrt(128), applied blockwise to each contiguous run of 128 features
// (TRELLIS.md §3). H is symmetric and orthogonal, so x·H = H·x and H = H^-1.
// Read from exllamav3 (not copied): exllamav3/util/hadamard.py, ext/quant/hadamard_inner.cuh.
#pragma once
#include <cstdint>

namespace trellm::trellis {

constexpr float kHadamardScale = 0.08838834764831845f;  // 1/sqrt(128)

// Unnormalised in-place fast Walsh-Hadamard transform of 128 values (7 butterfly stages, natural order):
// x <- H' x with H'[i][j] = (-1)^popcount(i&j). Multiply by kHadamardScale for the normalised H.
void fwht128(float* x);

// Normalised transform of one 128-run: x <- H x (= x·H).
void hadamard128(float* x);

// Right-multiply each row of a row-major (rows x cols) matrix by Hblk: every 128-run of every row.
// cols must be a multiple of 128. Multi-threaded over rows.
void hadamard_rows(float* a, int64_t rows, int64_t cols);

// Left-multiply a row-major (rows x cols) matrix by Hblk: the transform runs down each column in
// 128-row blocks (butterflies on whole rows, so it vectorises). rows must be a multiple of 128.
void hadamard_cols(float* a, int64_t rows, int64_t cols);

}  // namespace trellm::trellis
