// Quality metrics of a language model on a text: perplexity over non-overlapping windows, and the KL divergence
// of its next-token distributions from a reference model's (how much a quantized model drifts from bf16).
#pragma once
#include <cstdint>
#include <vector>

#include "model/glm4_moe_lite.h"
#include "runtime/sampler.h"  // argmax

namespace trellm {

// -log softmax(logits)[target], in nats, computed in double with the max subtracted.
double token_nll(const float* logits, int64_t vocab, int32_t target);

// KL(P || Q) = sum_i p_i (log p_i - log q_i) in nats, P = softmax(ref_logits) (the reference), Q = softmax(logits).
double kl_divergence(const float* ref_logits, const float* logits, int64_t vocab);
// Mean of kl_divergence over `rows` consecutive rows of `vocab` logits each.
double mean_kl_divergence(const float* ref_logits, const float* logits, int64_t rows, int64_t vocab);

struct PerplexityOptions {
  int ctx = 1024;  // window length: tokens [k*ctx, (k+1)*ctx) form window k, each window starts with an empty cache
  int chunk = 0;   // rows per forward (0: min(ctx, 512, what keeps a chunk's logits near 256 MB))
};

struct PerplexityResult {
  int64_t windows = 0;
  int64_t predicted = 0;   // tokens scored: every token of a window but its first
  double mean_nll = 0;     // nats per predicted token
  double perplexity = 0;   // exp(mean_nll)
  bool has_ref = false;
  double mean_kl = 0;      // mean KL(ref || model) per predicted position, nats
  double max_kl = 0;
  double top1_agree = 0;   // fraction of positions where model and reference have the same most likely token
  double ref_perplexity = 0;
  double seconds = 0;
};

// Scores `ids` with `model` (and `ref`, when given, on the same windows; both must have the same vocabulary).
// Windows shorter than 2 tokens (a 1-token tail) are skipped.
PerplexityResult evaluate_perplexity(Model& model, Model* ref, const std::vector<int32_t>& ids,
                                     const PerplexityOptions& opt);

// The MTP layer as a drafter (speculative decoding's acceptance in one number): over the same windows, at every
// position p with p + 2 inside the window, the MTP layer's most likely token given (t[p+1], h_p) against the
// model's own greedy token at p+1 (what a one-token draft must equal to be accepted), and against the text's t[p+2].
struct MtpAgreement {
  int64_t positions = 0;
  double agreement = 0;  // fraction where the draft equals the model's greedy next-next token
  double accuracy = 0;   // fraction where it equals the text's token
  double seconds = 0;
};
MtpAgreement evaluate_mtp(Model& model, const std::vector<int32_t>& ids, const PerplexityOptions& opt, int layer = 0);

}  // namespace trellm
