#include "runtime/metrics.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace trellm {

namespace {
// log-softmax of one row, in double.
void log_softmax(const float* x, int64_t n, std::vector<double>& out, const char* which) {
  out.resize(size_t(n));
  double mx = -INFINITY;
  for (int64_t i = 0; i < n; i++) {
    if (!std::isfinite(x[i])) fail("kl_divergence: ", which, " logit ", i, " is not finite (", x[i], ")");
    mx = std::max(mx, double(x[i]));
  }
  double sum = 0;
  for (int64_t i = 0; i < n; i++) sum += std::exp(double(x[i]) - mx);
  const double lse = mx + std::log(sum);
  for (int64_t i = 0; i < n; i++) out[size_t(i)] = double(x[i]) - lse;
}
}  // namespace

double kl_divergence(const float* ref, const float* test, int64_t n) {
  if (n <= 0) fail("kl_divergence: empty distribution");
  std::vector<double> lp, lq;
  log_softmax(ref, n, lp, "reference");
  log_softmax(test, n, lq, "test");
  double kl = 0;
  for (int64_t i = 0; i < n; i++) kl += std::exp(lp[size_t(i)]) * (lp[size_t(i)] - lq[size_t(i)]);
  return std::max(kl, 0.0);  // rounding can leave -1e-17 for identical rows
}

double mean_kl_divergence(const float* ref, const float* test, int64_t rows, int64_t n) {
  if (rows <= 0) fail("mean_kl_divergence: no rows");
  double s = 0;
  for (int64_t r = 0; r < rows; r++) s += kl_divergence(ref + r * n, test + r * n, n);
  return s / double(rows);
}

}  // namespace trellm
