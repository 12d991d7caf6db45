// Host-side sampling for the plain (uncaptured) decode loop: the same function every backend's sample_step
// computes (backend.h SamplingParams; cpu::sample_token), with the step counter kept here.
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace trellm {

// A seed of 0 becomes one from the clock; anything else is kept.
uint64_t resolve_seed(uint64_t seed);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);  // validates the parameters (an Error names the bad one)
  // Picks a token from logits[0..n); step k uses noise counter k (the device path counts the same way).
  int32_t sample(const float* logits, int64_t n);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  uint64_t step_ = 0;
};

void validate_sampling(const SamplingParams& p);

int32_t argmax(const float* v, int64_t n);

}  // namespace trellm
