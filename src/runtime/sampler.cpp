#include "runtime/sampler.h"

#include <chrono>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace trellm {

int32_t argmax(const float* v, int64_t n) {
  int64_t b = 0;
  for (int64_t i = 1; i < n; i++)
    if (v[i] > v[b]) b = i;
  return int32_t(b);
}

uint64_t resolve_seed(uint64_t seed) {
  if (seed) return seed;
  uint64_t s = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  return s ? s : 1;
}

void validate_sampling(const SamplingParams& p) {
  if (!(p.temperature >= 0)) fail("temperature must be >= 0 (got ", p.temperature, ")");
  if (p.top_k < 0) fail("top_k must be >= 0 (got ", p.top_k, ")");
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("top_p must be in (0, 1] (got ", p.top_p, ")");
  if (!(p.min_p >= 0 && p.min_p <= 1)) fail("min_p must be in [0, 1] (got ", p.min_p, ")");
}

Sampler::Sampler(const SamplingParams& p) : p_(p) {
  validate_sampling(p);
  p_.seed = resolve_seed(p.seed);
}

int32_t Sampler::sample(const float* logits, int64_t n) { return cpu::sample_token(logits, n, p_, step_++); }

}  // namespace trellm
