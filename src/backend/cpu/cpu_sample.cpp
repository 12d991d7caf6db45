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

SampleFilter sample_filter(const float* l, int64_t n, const SamplingParams& p) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; i++)
    if (std::isfinite(l[i]) && (best < 0 || l[i] > l[best])) best = i;
  if (best < 0) fail("sampling: every logit is NaN or infinite");
  SampleFilter f;
  f.best = best;
  if (p.temperature == 0.0f) return f;
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
  f.threshold = thr;
  return f;
}

int32_t sample_token(const float* l, int64_t n, const SamplingParams& p, uint64_t step) {
  const SampleFilter f = sample_filter(l, n, p);
  if (p.temperature == 0.0f) return int32_t(f.best);
  const double T = p.temperature;
  int64_t pick = f.best;
  double top = -INFINITY;
  for (int64_t i = 0; i < n; i++) {
    if (!f.keeps(l[i])) continue;
    const double score = double(l[i]) / T - std::log(-std::log(sample_uniform(p.seed, step, uint64_t(i))));
    if (score > top) top = score, pick = i;
  }
  return int32_t(pick);
}

void sample_probs(const float* l, int64_t n, const SamplingParams& p, double* probs) {
  const SampleFilter f = sample_filter(l, n, p);
  std::fill(probs, probs + n, 0.0);
  if (p.temperature == 0.0f) {
    probs[f.best] = 1.0;
    return;
  }
  const double m = l[f.best], T = p.temperature;
  double z = 0;
  for (int64_t i = 0; i < n; i++)
    if (f.keeps(l[i])) z += probs[i] = std::exp((double(l[i]) - m) / T);
  for (int64_t i = 0; i < n; i++) probs[i] /= z;
}

void spec_verify_one(const float* target, const float* const* draft, const int32_t* drafts, int K, int64_t V,
                     const SamplingParams& p, uint64_t step, int32_t* out) {
  std::vector<double> pt(static_cast<size_t>(V)), qd(static_cast<size_t>(V));
  int a = 0;
  int32_t last = -1;
  for (; a < K; a++) {
    const float* row = target + int64_t(a) * V;
    const int32_t d = drafts[a];
    TRELLM_ASSERT(d >= 0 && d < V, "spec_verify: draft token ", d, " outside the vocabulary of ", V);
    if (p.temperature == 0.0f) {  // greedy: the draft must be the argmax; else the argmax is the correction
      const int32_t best = int32_t(sample_filter(row, V, p).best);
      if (d == best) continue;
      last = best;
      break;
    }
    sample_probs(row, V, p, pt.data());
    sample_probs(draft[a], V, p, qd.data());
    const double u = sample_uniform(p.seed, step + uint64_t(a), kSpecAcceptIndex);
    if (u * qd[size_t(d)] < pt[size_t(d)]) continue;
    // rejected: a draw from max(0, p - q) normalised, by Gumbel-max over log of the residual
    double top = -INFINITY;
    int64_t pick = -1;
    for (int64_t i = 0; i < V; i++) {
      const double r = pt[size_t(i)] - qd[size_t(i)];
      if (!(r > 0)) continue;
      const double score = std::log(r) - std::log(-std::log(sample_uniform(p.seed ^ kSpecResidualSalt, step + uint64_t(a), uint64_t(i))));
      if (score > top) top = score, pick = i;
    }
    last = pick >= 0 ? int32_t(pick) : sample_token(row, V, p, step + uint64_t(a));  // p == q: p itself
    break;
  }
  if (a == K) last = sample_token(target + int64_t(K) * V, V, p, step + uint64_t(K));  // every draft passed
  out[0] = a;
  for (int j = 0; j < a; j++) out[1 + j] = drafts[j];
  for (int j = a; j <= K; j++) out[1 + j] = last;
}

}  // namespace trellm::cpu
