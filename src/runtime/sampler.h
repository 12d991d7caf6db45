// Token sampling on the host: greedy, or temperature → top-k → top-p → min-p (transformers' order), seeded.
#pragma once
#include <cstdint>
#include <vector>

#include "core/rng.h"

namespace trellm {

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  int top_k = 0;             // 0 = off
  float top_p = 1.0f;        // 1 = off
  float min_p = 0.0f;        // 0 = off
  uint64_t seed = 0;         // 0 = from the clock
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  // Picks a token from logits[0..n). Errors on a NaN/Inf-only distribution.
  int32_t sample(const float* logits, int64_t n);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> cand_;  // reused: (probability or logit, id)
};

int32_t argmax(const float* v, int64_t n);

}  // namespace trellm
