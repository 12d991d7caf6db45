// The sampling reference against an independent statement of transformers' filters: empirical frequencies of
// many seeded draws match the filtered, renormalised softmax, for each filter alone and combined.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "backend/cpu/cpu_backend.h"

using namespace trellm;

namespace {

// transformers' order: logits / T, top-k (keep the k largest), top-p (sort descending, keep the shortest
// prefix whose probability mass reaches p), min-p (keep p_i >= min_p · p_max); then renormalise.
std::vector<double> expected(const std::vector<float>& l, const SamplingParams& p) {
  const size_t n = l.size();
  std::vector<double> z(n);
  for (size_t i = 0; i < n; i++) z[i] = l[i] / p.temperature;
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return z[a] > z[b]; });
  std::vector<bool> keep(n, true);
  if (p.top_k > 0)
    for (size_t r = size_t(p.top_k); r < n; r++) keep[order[r]] = false;
  auto probs = [&] {
    std::vector<double> q(n, 0.0);
    double s = 0;
    for (size_t i = 0; i < n; i++)
      if (keep[i]) s += (q[i] = std::exp(z[i] - z[order[0]]));
    for (auto& x : q) x /= s;
    return q;
  };
  if (p.top_p < 1) {
    auto q = probs();
    double cum = 0;
    bool done = false;
    for (size_t r = 0; r < n; r++) {
      if (!keep[order[r]]) continue;
      if (done) keep[order[r]] = false;
      cum += q[order[r]];
      if (cum >= p.top_p) done = true;
    }
  }
  if (p.min_p > 0) {
    auto q = probs();
    for (size_t i = 0; i < n; i++)
      if (q[i] < p.min_p * q[order[0]]) keep[i] = false;
  }
  return probs();
}

TEST(Sampling, FrequenciesMatchTheFilteredSoftmax) {
  const std::vector<float> l = {2.0f, 1.5f, 0.3f, -0.2f, 1.1f, -1.0f, 0.7f, 0.0f};
  std::vector<SamplingParams> cases(5);
  cases[0].temperature = 1.0f;
  cases[1].temperature = 0.6f, cases[1].top_k = 3;
  cases[2].temperature = 1.3f, cases[2].top_p = 0.8f;
  cases[3].temperature = 1.0f, cases[3].min_p = 0.25f;
  cases[4].temperature = 0.9f, cases[4].top_k = 5, cases[4].top_p = 0.9f, cases[4].min_p = 0.1f;
  const int draws = 40000;
  for (size_t c = 0; c < cases.size(); c++) {
    SamplingParams p = cases[c];
    p.seed = 1234 + c;
    std::vector<double> count(l.size(), 0.0);
    for (int s = 0; s < draws; s++) count[size_t(cpu::sample_token(l.data(), int64_t(l.size()), p, uint64_t(s)))] += 1;
    const auto want = expected(l, p);
    for (size_t i = 0; i < l.size(); i++) {
      const double f = count[i] / draws, sd = std::sqrt(want[i] * (1 - want[i]) / draws);
      if (want[i] == 0) EXPECT_EQ(count[i], 0) << "case " << c << " token " << i << " was filtered out";
      else EXPECT_NEAR(f, want[i], 5 * sd + 1e-4) << "case " << c << " token " << i;
    }
  }
}

TEST(Sampling, GreedyAndDeterminism) {
  const std::vector<float> l = {0.1f, 3.0f, 3.0f, -INFINITY, NAN, 2.0f};
  SamplingParams g;
  g.temperature = 0;
  EXPECT_EQ(cpu::sample_token(l.data(), 6, g, 0), 1) << "ties go to the lowest id; NaN/Inf never win";
  SamplingParams p;
  p.seed = 9;
  EXPECT_EQ(cpu::sample_token(l.data(), 6, p, 17), cpu::sample_token(l.data(), 6, p, 17));
  int differ = 0;
  for (uint64_t s = 0; s < 50; s++) differ += cpu::sample_token(l.data(), 6, p, s) != cpu::sample_token(l.data(), 6, p, s + 1);
  EXPECT_GT(differ, 5) << "the step must change the noise";
  for (uint64_t s = 0; s < 200; s++) {
    int32_t t = cpu::sample_token(l.data(), 6, p, s);
    EXPECT_TRUE(t == 0 || t == 1 || t == 2 || t == 5) << "a NaN or -inf logit was sampled";
  }
}

}  // namespace
