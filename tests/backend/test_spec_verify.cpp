// The speculative accept / resample rule (Backend::spec_verify, CPU reference) against its exact formula: over
// many noise counters, draft d is accepted with probability min(1, p(d) / q(d)), a rejection emits x with
// probability (1 - min(1, p(d)/q(d))) * max(0, p(x) - q(x)) / sum(max(0, p - q)), and when every draft passes the
// bonus token follows the last target row; drafts drawn from q make the first emitted token follow p exactly.
// Chi-squared tests with fixed seeds (deterministic), thresholds at p = 1e-4 of the chi-squared distribution.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"

using namespace trellm;

namespace {

// Chi-squared statistic of counts against expected probabilities (bins with probability 0 must have count 0).
double chi2(const std::vector<double>& expected_p, const std::vector<int64_t>& counts, int64_t n, int* dof) {
  double x = 0;
  int bins = 0;
  for (size_t i = 0; i < counts.size(); i++) {
    if (expected_p[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "bin " << i << " has probability 0";
      continue;
    }
    const double e = expected_p[i] * double(n);
    x += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
    bins++;
  }
  *dof = bins - 1;
  return x;
}
// Upper 1e-4 quantile of chi-squared with k degrees of freedom (Wilson-Hilferty), z = 3.719.
double chi2_limit(int k) {
  const double z = 3.719, a = 2.0 / (9.0 * k);
  return k * std::pow(1 - a + z * std::sqrt(a), 3);
}

std::vector<float> random_logits(Rng& r, int V, float scale) {
  std::vector<float> l(static_cast<size_t>(V));
  for (auto& x : l) x = (r.uniform() * 2 - 1) * scale;
  return l;
}

}  // namespace

TEST(SpecVerify, AcceptAndResampleFollowTheExactFormula) {
  const int V = 7;
  Rng r(11);
  for (int trial = 0; trial < 4; trial++) {
    const std::vector<float> lt = random_logits(r, V * 2, 2.5f);  // target rows 0 and 1
    const std::vector<float> lq = random_logits(r, V, 2.5f);      // draft row 0
    SamplingParams sp;
    sp.temperature = trial % 2 ? 0.7f : 1.0f;
    sp.top_k = trial == 2 ? 5 : 0;
    sp.top_p = trial == 3 ? 0.9f : 1.0f;
    sp.seed = 1234 + uint64_t(trial);
    std::vector<double> p0(V), p1(V), q(V);
    cpu::sample_probs(lt.data(), V, sp, p0.data());
    cpu::sample_probs(lt.data() + V, V, sp, p1.data());
    cpu::sample_probs(lq.data(), V, sp, q.data());
    int32_t d = 0;  // a draft q can propose
    while (q[size_t(d)] == 0) d++;
    const double acc = std::min(1.0, p0[size_t(d)] / q[size_t(d)]);
    double rz = 0;
    for (int x = 0; x < V; x++) rz += std::max(0.0, p0[size_t(x)] - q[size_t(x)]);
    // bins: (accepted, bonus y) for y < V, then (rejected, x) for x < V
    std::vector<double> want(2 * V, 0.0);
    for (int y = 0; y < V; y++) want[size_t(y)] = acc * p1[size_t(y)];
    for (int x = 0; x < V; x++) want[size_t(V + x)] = rz > 0 ? (1 - acc) * std::max(0.0, p0[size_t(x)] - q[size_t(x)]) / rz : 0.0;
    const int64_t N = 40000;
    std::vector<int64_t> got(2 * V, 0);
    const float* drow = lq.data();
    for (int64_t step = 0; step < N; step++) {
      int32_t out[3] = {-1, -1, -1};
      cpu::spec_verify_one(lt.data(), &drow, &d, 1, V, sp, uint64_t(step) * 7, out);
      ASSERT_TRUE(out[0] == 0 || out[0] == 1);
      ASSERT_GE(out[1], 0);
      ASSERT_LT(out[2], V);
      if (out[0] == 1) {
        ASSERT_EQ(out[1], d);
        got[size_t(out[2])]++;
      } else {
        ASSERT_EQ(out[1], out[2]) << "the emitted token repeated past the correction";
        got[size_t(V + out[1])]++;
      }
    }
    int dof = 0;
    const double x = chi2(want, got, N, &dof);
    EXPECT_LT(x, chi2_limit(dof)) << "trial " << trial << ": chi2 " << x << " with " << dof << " dof";
  }
}

TEST(SpecVerify, DraftsFromQGiveTheTargetDistribution) {
  // Two drafts drawn from q rows by sample_token (the draft stream), then verified: the first emitted token follows
  // p0, and after an accepted first draft the second follows p1 (here the target rows do not depend on the tokens).
  const int V = 6, K = 2;
  Rng r(5);
  const std::vector<float> lt = random_logits(r, V * (K + 1), 2.0f);
  const std::vector<float> lq = random_logits(r, V * K, 2.0f);
  SamplingParams sp;
  sp.temperature = 0.9f;
  sp.seed = 77;
  std::vector<double> p0(V), p1(V);
  cpu::sample_probs(lt.data(), V, sp, p0.data());
  cpu::sample_probs(lt.data() + V, V, sp, p1.data());
  SamplingParams dp = sp;
  dp.seed ^= kSpecDraftSalt;
  const int64_t N = 60000;
  std::vector<int64_t> first(V, 0), second(V, 0);
  int64_t accepted = 0, n_second = 0;
  for (int64_t step = 0; step < N; step++) {
    const uint64_t s = uint64_t(step) * (K + 1);
    int32_t drafts[K];
    const float* rows[K];
    for (int j = 0; j < K; j++) {
      rows[j] = lq.data() + j * V;
      drafts[j] = cpu::sample_token(rows[j], V, dp, s + uint64_t(j));
    }
    int32_t out[K + 2];
    cpu::spec_verify_one(lt.data(), rows, drafts, K, V, sp, s, out);
    accepted += out[0];
    first[size_t(out[1])]++;
    if (out[0] >= 1) second[size_t(out[2])]++, n_second++;
  }
  int dof = 0;
  double x = chi2(p0, first, N, &dof);
  EXPECT_LT(x, chi2_limit(dof)) << "first token: chi2 " << x << " with " << dof << " dof";
  x = chi2(p1, second, n_second, &dof);
  EXPECT_LT(x, chi2_limit(dof)) << "second token: chi2 " << x << " with " << dof << " dof";
  EXPECT_GT(n_second, N / 10);
  EXPECT_LT(accepted, N * K) << "some drafts were meant to be rejected";
}

TEST(SpecVerify, GreedyAcceptsThePrefixOfArgmaxesAndCorrects) {
  const int V = 5, K = 3;
  // target argmaxes 2, 4, 1, 0
  std::vector<float> lt(size_t(V * (K + 1)), 0.0f);
  const int best[K + 1] = {2, 4, 1, 0};
  for (int j = 0; j <= K; j++) lt[size_t(j * V + best[j])] = 3.0f;
  std::vector<float> lq(size_t(V * K), 0.0f);
  const float* rows[K] = {lq.data(), lq.data() + V, lq.data() + 2 * V};
  SamplingParams sp;
  sp.temperature = 0;
  struct Case {
    int32_t drafts[K];
    int32_t want[K + 2];
  };
  const Case cases[] = {
      {{2, 4, 1}, {3, 2, 4, 1, 0}},  // all accepted, bonus = argmax of row 3
      {{2, 4, 3}, {2, 2, 4, 1, 1}},  // third rejected: corrected to 1, repeated
      {{0, 4, 1}, {0, 2, 2, 2, 2}},  // first rejected
  };
  for (const Case& c : cases) {
    int32_t out[K + 2];
    cpu::spec_verify_one(lt.data(), rows, c.drafts, K, V, sp, 9, out);
    for (int j = 0; j < K + 2; j++) EXPECT_EQ(out[j], c.want[j]) << "index " << j;
  }
}

TEST(SpecVerify, BackendOpMatchesTheOneSequenceRuleAndPrepareTheDraftRows) {
  auto be = make_cpu_backend();
  const int m = 3, K = 2, V = 9, S = 4;
  Rng r(3);
  std::vector<float> target = random_logits(r, m * (K + 1) * V, 2.0f), draft = random_logits(r, K * S * V, 2.0f);
  std::vector<int32_t> src = {2, 0, 3}, tokens(size_t(m * (K + 1))), steps = {5, 0, 17}, out(size_t(m * (K + 2)), -7);
  for (auto& t : tokens) t = int32_t(r.next_u32() % V);
  std::vector<SamplingParams> params(m);
  params[0].temperature = 0;
  params[1].temperature = 1.0f, params[1].seed = 3;
  params[2].temperature = 0.5f, params[2].top_k = 3, params[2].seed = 9;
  SpecVerify v;
  v.K = K;
  v.target = TensorView(target.data(), DType::F32, {m * (K + 1), V});
  v.draft = TensorView(draft.data(), DType::F32, {K * S, V});
  v.draft_stride = S;
  v.src = TensorView(src.data(), DType::I32, {m});
  v.tokens = TensorView(tokens.data(), DType::I32, {m * (K + 1)});
  v.params = TensorView(params.data(), DType::U8, {int64_t(sizeof(SamplingParams)) * m});
  v.steps = TensorView(steps.data(), DType::I32, {m});
  v.out = TensorView(out.data(), DType::I32, {m * (K + 2)});
  be->spec_verify(v);
  for (int i = 0; i < m; i++) {
    const float* rows[K];
    for (int j = 0; j < K; j++) rows[j] = draft.data() + (j * S + src[size_t(i)]) * V;
    int32_t want[K + 2];
    cpu::spec_verify_one(target.data() + i * (K + 1) * V, rows, &tokens[size_t(i * (K + 1) + 1)], K, V, params[size_t(i)],
                         uint64_t(steps[size_t(i)]), want);
    for (int j = 0; j < K + 2; j++) EXPECT_EQ(out[size_t(i * (K + 2) + j)], want[j]) << "sequence " << i << " index " << j;
  }
  // spec_prepare, step 0 then step 1
  std::vector<int32_t> pos(size_t(m * (K + 1))), base(m, -1), drafts = {4, 5, 6}, seq(size_t(m * (K + 1)), -1),
      logit_idx(m, -1), steps_out(m, -1), toks(size_t(m * (K + 1)), -1);
  for (int i = 0; i < m * (K + 1); i++) pos[size_t(i)] = 100 * (i / (K + 1)) + 10 + i % (K + 1);
  auto I = [](std::vector<int32_t>& x) { return TensorView(x.data(), DType::I32, {int64_t(x.size())}); };
  SpecPrepare p;
  p.K = K;
  p.j = 0;
  p.result = v.out;
  p.steps = v.steps;
  p.base = I(base);
  p.tokens = I(toks);
  p.pos = I(pos);
  p.logit_idx = I(logit_idx);
  p.steps_out = I(steps_out);
  be->spec_prepare(p);
  for (int i = 0; i < m; i++) {
    const int a = out[size_t(i * (K + 2))];
    EXPECT_EQ(logit_idx[size_t(i)], i * (K + 1) + a);
    EXPECT_EQ(base[size_t(i)], 100 * i + 10 + a);
    EXPECT_EQ(steps_out[size_t(i)], steps[size_t(i)] + a + 1);
    for (int rr = 0; rr <= K; rr++) EXPECT_EQ(toks[size_t(i * (K + 1) + rr)], out[size_t(i * (K + 2) + 1 + rr)]);
  }
  p.j = 1;
  p.drafts = I(drafts);
  p.seq = I(seq);
  p.logit_idx = TensorView();
  be->spec_prepare(p);
  for (int i = 0; i < m; i++) {
    const int a = out[size_t(i * (K + 2))];
    EXPECT_EQ(toks[size_t(i)], drafts[size_t(i)]);
    EXPECT_EQ(pos[size_t(i)], 100 * i + 10 + a + 1);
    EXPECT_EQ(seq[size_t(i)], i);
    EXPECT_EQ(steps_out[size_t(i)], steps[size_t(i)] + a + 2);
  }
}
