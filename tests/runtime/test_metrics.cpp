// The perplexity / KL math on hand-computable cases (the end-to-end checks against transformers' logits are in
// tests/py/test_perplexity.py).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "runtime/metrics.h"

using trellm::kl_divergence;
using trellm::token_nll;

TEST(Metrics, NllOfUniformIsLogVocab) {
  std::vector<float> l(7, 0.25f);
  for (int t = 0; t < 7; t++) EXPECT_NEAR(token_nll(l.data(), 7, t), std::log(7.0), 1e-12);
}

TEST(Metrics, NllTwoClasses) {
  const float l[2] = {0.0f, float(std::log(3.0))};  // p = (1/4, 3/4)
  EXPECT_NEAR(token_nll(l, 2, 1), -std::log(0.75), 1e-7);
  EXPECT_NEAR(token_nll(l, 2, 0), -std::log(0.25), 1e-7);
}

TEST(Metrics, NllIsShiftInvariantAndStableForHugeLogits) {
  const float a[3] = {1.0f, 2.0f, 3.0f}, b[3] = {1001.0f, 1002.0f, 1003.0f};
  for (int t = 0; t < 3; t++) EXPECT_NEAR(token_nll(a, 3, t), token_nll(b, 3, t), 1e-9);
  EXPECT_TRUE(std::isfinite(token_nll(b, 3, 0)));
}

TEST(Metrics, KlOfIdenticalIsZero) {
  const float l[4] = {0.3f, -1.0f, 2.5f, 0.0f}, shifted[4] = {10.3f, 9.0f, 12.5f, 10.0f};
  EXPECT_NEAR(kl_divergence(l, l, 4), 0.0, 1e-12);
  EXPECT_NEAR(kl_divergence(l, shifted, 4), 0.0, 1e-9);
}

TEST(Metrics, KlTwoClassesByHand) {
  const float p[2] = {0.0f, 0.0f};                        // (1/2, 1/2)
  const float q[2] = {0.0f, float(std::log(3.0))};        // (1/4, 3/4)
  const double want = 0.5 * std::log(0.5 / 0.25) + 0.5 * std::log(0.5 / 0.75);
  EXPECT_NEAR(kl_divergence(p, q, 2), want, 1e-7);
  // Not symmetric: KL(Q || P) = 1/4 log(1/2) + 3/4 log(3/2).
  EXPECT_NEAR(kl_divergence(q, p, 2), 0.25 * std::log(0.5) + 0.75 * std::log(1.5), 1e-7);
}

TEST(Metrics, KlIgnoresTokensTheReferenceRulesOut) {
  // p = (1, 0, 0) up to exp(-200): KL = -log q_0.
  const float p[3] = {0.0f, -200.0f, -200.0f}, q[3] = {0.0f, 0.0f, 0.0f};
  EXPECT_NEAR(kl_divergence(p, q, 3), std::log(3.0), 1e-9);
}
