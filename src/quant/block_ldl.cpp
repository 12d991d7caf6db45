#include "quant/block_ldl.h"

#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"

namespace trellm::trellis {

namespace {
// sum_k x[k]·y[k] over [0, n) with four independent accumulators: the plain loop is one dependent add chain
// (~4 cycles a term); four chains let the compiler overlap them. Cholesky on this 2-core Xeon: n = 1024
// 0.10 s -> 0.05 s, n = 2048 0.43 s (then memory-bound: row prefixes stream from L3).
double dot(const double* x, const double* y, int64_t n) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    a0 += x[k] * y[k];
    a1 += x[k + 1] * y[k + 1];
    a2 += x[k + 2] * y[k + 2];
    a3 += x[k + 3] * y[k + 3];
  }
  for (; k < n; k++) a0 += x[k] * y[k];
  return (a0 + a1) + (a2 + a3);
}
}  // namespace

bool cholesky_lower(double* a, int64_t n) {
  // Crout order, row-major: C[i][j] = (a[i][j] - C[i][:j]·C[j][:j]) / C[j][j]; both dot products are
  // contiguous. Columns are sequential, rows below the pivot run in parallel: n^3/6 multiply-adds
  // (2048: 1.4 G, about a second on two cores).
  for (int64_t j = 0; j < n; j++) {
    double* rj = a + j * n;
    const double d = rj[j] - dot(rj, rj, j);
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double cjj = std::sqrt(d), inv = 1.0 / cjj;
    rj[j] = cjj;
    parallel_for(n - j - 1, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = j + 1 + i0; i < j + 1 + i1; i++) {
        double* ri = a + i * n;
        ri[j] = (ri[j] - dot(ri, rj, j)) * inv;
      }
    });
  }
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = i + 1; j < n; j++) a[i * n + j] = 0.0;
  return true;
}

bool block_ldl(const std::vector<double>& h, int64_t n, float sigma, int retries, std::vector<float>& l) {
  TRELLM_ASSERT(n % 16 == 0 && int64_t(h.size()) == n * n);
  double mean_diag = 0;
  for (int64_t i = 0; i < n; i++) mean_diag += h[i * n + i];
  mean_diag /= double(n);
  std::vector<double> c;
  bool ok = false;
  for (int attempt = 0; attempt <= retries && !ok; attempt++) {
    c = h;
    for (int64_t i = 0; i < n; i++) c[i * n + i] += 2.0 * sigma * mean_diag * attempt;
    ok = cholesky_lower(c.data(), n);
  }
  if (!ok) return false;

  // L[:, block b] = C[:, block b] · C_bb^-1 (C_bb lower triangular: invert by forward substitution).
  const int64_t blocks = n / 16;
  l.assign(size_t(n * n), 0.0f);
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int64_t o = b * 16;
      double inv[16][16] = {};  // inverse of the lower-triangular diagonal block
      for (int col = 0; col < 16; col++) {
        for (int i = 0; i < 16; i++) {
          double s = i == col ? 1.0 : 0.0;
          for (int k = col; k < i; k++) s -= c[(o + i) * n + o + k] * inv[k][col];
          inv[i][col] = i < col ? 0.0 : s / c[(o + i) * n + o + i];
        }
      }
      // rows below the diagonal block (the diagonal block itself becomes I, then 0)
      for (int64_t r = o + 16; r < n; r++)
        for (int j = 0; j < 16; j++) {
          double s = 0;
          for (int k = j; k < 16; k++) s += c[r * n + o + k] * inv[k][j];
          l[r * n + o + j] = float(s);
        }
    }
  });
  return true;
}

}  // namespace trellm::trellis
