#include "quant/block_ldl.h"

#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"

namespace trellm::trellis {

bool cholesky_lower(double* a, int64_t n) {
  // Crout order, row-major: C[i][j] = (a[i][j] - C[i][:j]·C[j][:j]) / C[j][j]; both dot products are
  // contiguous. Columns are sequential, rows below the pivot run in parallel: n^3/6 multiply-adds
  // (2048: 1.4 G, about a second on two cores).
  for (int64_t j = 0; j < n; j++) {
    double* rj = a + j * n;
    double d = rj[j];
    for (int64_t k = 0; k < j; k++) d -= rj[k] * rj[k];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double cjj = std::sqrt(d), inv = 1.0 / cjj;
    rj[j] = cjj;
    parallel_for(n - j - 1, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = j + 1 + i0; i < j + 1 + i1; i++) {
        double* ri = a + i * n;
        double s = ri[j];
        for (int64_t k = 0; k < j; k++) s -= ri[k] * rj[k];
        ri[j] = s * inv;
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
