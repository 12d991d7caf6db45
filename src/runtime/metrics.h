// Quality metrics over next-token distributions (quantized vs reference model).
#pragma once
#include <cstdint>

namespace trellm {

// KL(P || Q) in nats of the softmax distributions of two logit rows of n values: P from `ref` (the reference,
// e.g. the unquantized model), Q from `test`. Softmax in double with the max subtracted, so large logits are
// fine; non-finite logits are an Error.
double kl_divergence(const float* ref, const float* test, int64_t n);

// Mean of kl_divergence over `rows` consecutive rows of n logits each.
double mean_kl_divergence(const float* ref, const float* test, int64_t rows, int64_t n);

}  // namespace trellm
