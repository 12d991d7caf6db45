#include "runtime/sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"

namespace trellm {

int32_t argmax(const float* v, int64_t n) {
  int64_t b = 0;
  for (int64_t i = 1; i < n; i++)
    if (v[i] > v[b]) b = i;
  return int32_t(b);
}

static uint64_t seed_or_clock(uint64_t s) {
  return s ? s : uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(seed_or_clock(p.seed)) {
  if (!(p.temperature >= 0)) fail("temperature must be >= 0 (got ", p.temperature, ")");
  if (p.top_k < 0) fail("top_k must be >= 0 (got ", p.top_k, ")");
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("top_p must be in (0, 1] (got ", p.top_p, ")");
  if (!(p.min_p >= 0 && p.min_p <= 1)) fail("min_p must be in [0, 1] (got ", p.min_p, ")");
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (p_.temperature == 0.0f) return argmax(logits, n);
  cand_.clear();
  const float inv_t = 1.0f / p_.temperature;
  for (int64_t i = 0; i < n; i++)
    if (std::isfinite(logits[i])) cand_.emplace_back(logits[i] * inv_t, int32_t(i));
  if (cand_.empty()) fail("sampling: every logit is NaN or infinite");
  auto desc = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = cand_.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < keep) {
    std::partial_sort(cand_.begin(), cand_.begin() + p_.top_k, cand_.end(), desc);
    keep = size_t(p_.top_k);
  } else {
    std::sort(cand_.begin(), cand_.end(), desc);
  }
  cand_.resize(keep);
  // Softmax over the survivors (sorted, so cand_[0] holds the maximum).
  const float mx = cand_[0].first;
  double sum = 0;
  for (auto& c : cand_) sum += (c.first = std::exp(c.first - mx));
  for (auto& c : cand_) c.first = float(c.first / sum);
  if (p_.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p (at least one token)
    double cum = 0;
    size_t k = 0;
    while (k < cand_.size()) {
      cum += cand_[k++].first;
      if (cum >= p_.top_p) break;
    }
    cand_.resize(k);
  }
  if (p_.min_p > 0.0f) {  // drop tokens below min_p × the top probability
    const float floor = p_.min_p * cand_[0].first;
    size_t k = 1;
    while (k < cand_.size() && cand_[k].first >= floor) k++;
    cand_.resize(k);
  }
  double total = 0;
  for (auto& c : cand_) total += c.first;
  double u = double(rng_.uniform()) * total;
  for (auto& c : cand_) {
    u -= c.first;
    if (u < 0) return c.second;
  }
  return cand_.back().second;
}

}  // namespace trellm
