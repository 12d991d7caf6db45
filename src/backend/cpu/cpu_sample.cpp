// The sampling reference: transformers' filter order (temperature, top-k, top-p, min-p) expressed as one logit
// threshold, then an exact draw by Gumbel-max (argmax of l/T + G_i, G_i = -log(-log(u_i))), which samples
// from softmax(l/T) restricted to the survivors without normalising or sorting. The CUDA kernel computes the
// same thresholds by radix selection and the same noise, so both pick the same token.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace trellm::cpu {

namespace {
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
}  // namespace

double sample_uniform(uint64_t seed, uint64_t step, uint64_t i) {
  uint64_t z = mix64(seed + 0x9E3779B97F4A7C15ull * (step + 1));
  z = mix64(z ^ (i * 0xD1B54A32D192ED03ull));
  return (double(z >> 11) + 0.5) * (1.0 / 9007199254740992.0);  // (0, 1): never 0 or 1
}

int32_t sample_token(const float* l, int64_t n, const SamplingParams& p, uint64_t step) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; i++)
    if (std::isfinite(l[i]) && (best < 0 || l[i] > l[best])) best = i;
  if (best < 0) fail("sampling: every logit is NaN or infinite");
  if (p.temperature == 0.0f) return int32_t(best);
  const float m = l[best];
  const double T = p.temperature;
  std::vector<float> v;
  v.reserve(size_t(n));
  for (int64_t i = 0; i < n; i++)
    if (std::isfinite(l[i])) v.push_back(l[i]);
  std::sort(v.begin(), v.end(), std::greater<float>());
  float thr = -INFINITY;
  if (p.top_k > 0 && size_t(p.top_k) < v.size()) thr = v[size_t(p.top_k) - 1];  // keep everything >= the k-th
  if (p.top_p < 1.0f) {  // smallest prefix of the top-k survivors holding top_p of their mass
    double z = 0;
    for (float x : v) {
      if (x < thr) break;
      z += std::exp(double(x - m) / T);
    }
    double cum = 0;
    for (float x : v) {
      if (x < thr) break;
      cum += std::exp(double(x - m) / T);
      if (cum >= double(p.top_p) * z) {
        thr = std::max(thr, x);
        break;
      }
    }
  }
  if (p.min_p > 0.0f) thr = std::max(thr, float(double(m) + T * std::log(double(p.min_p))));
  int64_t pick = best;
  double top = -INFINITY;
  for (int64_t i = 0; i < n; i++) {
    if (!std::isfinite(l[i]) || l[i] < thr) continue;
    const double score = double(l[i]) / T - std::log(-std::log(sample_uniform(p.seed, step, uint64_t(i))));
    if (score > top) top = score, pick = i;
  }
  return int32_t(pick);
}

}  // namespace trellm::cpu
