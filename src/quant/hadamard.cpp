#include "quant/hadamard.h"

#include <algorithm>

#include "core/error.h"
#include "core/thread_pool.h"
#include "quant/trellis_decode.h"

namespace trellm::trellis {

void fwht128(float* x) {
  // Stage h pairs i and i+h inside blocks of 2h: (a, b) -> (a + b, a - b). Natural (Sylvester) order
  // because bit log2(h) of the index selects the sign, matching (-1)^popcount(i & j).
  for (int h = 1; h < kHadamardDim; h <<= 1)
    for (int i = 0; i < kHadamardDim; i += 2 * h)
      for (int j = i; j < i + h; j++) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

void hadamard128(float* x) {
  fwht128(x);
  for (int i = 0; i < kHadamardDim; i++) x[i] *= kHadamardScale;
}

void hadamard_rows(float* a, int64_t rows, int64_t cols) {
  TRELLM_ASSERT(cols % kHadamardDim == 0, "hadamard_rows: cols ", cols, " not a multiple of 128");
  parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      for (int64_t c = 0; c < cols; c += kHadamardDim) hadamard128(a + r * cols + c);
  });
}

void hadamard_cols(float* a, int64_t rows, int64_t cols) {
  TRELLM_ASSERT(rows % kHadamardDim == 0, "hadamard_cols: rows ", rows, " not a multiple of 128");
  // Parallel over (row block, column chunk); each task does the 7 stages on a 128 x chunk panel.
  const int64_t chunk = 256, n_chunks = (cols + chunk - 1) / chunk, blocks = rows / kHadamardDim;
  parallel_for(blocks * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      float* blk = a + (t / n_chunks) * kHadamardDim * cols;
      const int64_t c0 = (t % n_chunks) * chunk, c1 = std::min(cols, c0 + chunk);
      for (int h = 1; h < kHadamardDim; h <<= 1)
        for (int i = 0; i < kHadamardDim; i += 2 * h)
          for (int j = i; j < i + h; j++) {
            float* x = blk + j * cols;
            float* y = blk + (j + h) * cols;
            for (int64_t c = c0; c < c1; c++) {
              const float u = x[c], v = y[c];
              x[c] = u + v;
              y[c] = u - v;
            }
          }
      for (int i = 0; i < kHadamardDim; i++)
        for (int64_t c = c0; c < c1; c++) blk[i * cols + c] *= kHadamardScale;
    }
  });
}

}  // namespace trellm::trellis
