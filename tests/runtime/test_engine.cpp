// The batched engine on the CPU backend with the built-in model: a request's tokens do not depend on what else
// runs beside it — bit for bit, across chunked prefill, arrival times, preemptions (a cache too small for
// everyone) and prefix-cache hits — against each prompt run alone; cancellation frees blocks at once; oversize
// requests are refused with the numbers; the threaded loop gives the same tokens; no block leaks.
#include <gtest/gtest.h>

#include <map>
#include <thread>

#include "core/rng.h"

#include "backend/cpu/cpu_backend.h"
#include "model/glm4_moe_lite.h"
#include "runtime/engine.h"
#include "test_util.h"

using namespace trellm;

namespace {

Model& default_model() {
  static std::unique_ptr<Backend> be = make_cpu_backend();
  static std::unique_ptr<Model> m = Model::load(std::string(TRELLM_MODELS_DIR) + "/tiny-glm-3bit", *be);
  return *m;
}

struct Case {
  std::vector<int32_t> prompt;
  GenParams params;
};

// Prompts of lengths 1..300 (several sharing a 150-token head, so their full blocks hit the prefix cache), half
// greedy, half sampled with their own seeds and filters.
std::vector<Case> make_cases(int count, uint64_t seed) {
  const int32_t V = int32_t(default_model().config().vocab_size);
  Rng r(seed);
  std::vector<int32_t> head(150);
  for (auto& t : head) t = int32_t(r.next_u32() % uint32_t(V - 64));
  std::vector<Case> cases;
  const int lens[] = {1, 7, 64, 65, 150, 151, 211, 300, 33, 129, 5, 250};
  for (int i = 0; i < count; i++) {
    Case c;
    const int len = lens[i % 12];
    const bool shared = i % 3 != 0 && len > 150;
    for (int j = 0; j < len; j++) c.prompt.push_back(shared ? (j < 150 ? head[size_t(j)] : int32_t(r.next_u32() % 4000)) : int32_t(r.next_u32() % 4000));
    c.params.max_tokens = 10 + (i * 7) % 30;
    c.params.ignore_eos = true;  // fixed lengths, so every step of every request is compared
    if (i % 2 == 0) {
      c.params.sampling.temperature = 0;
    } else {
      c.params.sampling.temperature = 0.8f;
      c.params.sampling.top_k = i % 4 == 1 ? 40 : 0;
      c.params.sampling.top_p = 0.9f;
      c.params.sampling.seed = 100 + uint64_t(i);
    }
    cases.push_back(c);
  }
  return cases;
}

std::vector<int32_t> ids(const std::vector<GenToken>& t) {
  std::vector<int32_t> v;
  for (const auto& x : t) v.push_back(x.id);
  return v;
}

// Each case alone in a fresh engine with room for everything.
std::vector<std::vector<int32_t>> run_alone(const std::vector<Case>& cases) {
  std::vector<std::vector<int32_t>> out;
  for (const Case& c : cases) {
    EngineOptions o;
    o.max_seqs = 1;
    o.max_step_tokens = 512;
    o.context = 512;
    o.kv_blocks = 8;
    o.prefix_caching = false;
    Engine e(default_model(), o);
    auto r = e.submit(c.prompt, c.params);
    e.run_until_idle();
    FinishReason why;
    out.push_back(ids(r->wait_all(&why)));
    EXPECT_EQ(why, FinishReason::Length);
    EXPECT_EQ(out.back().size(), size_t(c.params.max_tokens));
  }
  return out;
}

}  // namespace

TEST(Engine, TokensDoNotDependOnTheBatchChunkingPreemptionOrPrefixHits) {
  const std::vector<Case> cases = make_cases(12, 7);
  const auto want = run_alone(cases);
  // A cache of 10 blocks (640 tokens) for ~2,500 tokens of requests, 8 running at most, 160-token steps: chunked
  // prefill, decode rows beside prompt chunks, preemptions, and prefix hits on the shared heads.
  EngineOptions o;
  o.max_seqs = 8;
  o.max_step_tokens = 160;
  o.context = 512;
  o.kv_blocks = 10;
  // Both step kinds: decode-only steps as plain forwards, and as the captured step of their batch bucket with
  // padding rows (on the CPU a capture is a plain call, so this checks the bucketed layout, not CUDA graphs).
  for (bool graphs : {false, true}) {
    o.decode_graphs = graphs;
    Engine e(default_model(), o);
    std::vector<std::shared_ptr<Request>> reqs;
    for (size_t i = 0; i < cases.size(); i++) {
      reqs.push_back(e.submit(cases[i].prompt, cases[i].params));
      for (size_t s = 0; s < i % 3; s++) e.step();  // staggered arrivals
    }
    e.run_until_idle();
    for (size_t i = 0; i < cases.size(); i++) {
      FinishReason why;
      EXPECT_EQ(ids(reqs[i]->wait_all(&why)), want[i]) << "request " << i << " (prompt " << cases[i].prompt.size() << ")";
      EXPECT_EQ(why, FinishReason::Length);
    }
    const Engine::Stats st = e.stats();
    EXPECT_GT(st.preemptions, 0) << "the cache was meant to run out";
    EXPECT_GT(st.prefix_hit_tokens, 0) << "the shared heads were meant to hit the prefix cache";
    EXPECT_EQ(graphs, st.graph_steps > 0);
    EXPECT_EQ(st.running + st.waiting, 0);
    e.block_manager().check_invariants();
    EXPECT_EQ(e.block_manager().used_blocks(), 0) << "blocks leaked";
  }
}

TEST(Engine, SameTokensFromTheThreadedLoopWithConcurrentClients) {
  const std::vector<Case> cases = make_cases(8, 11);
  const auto want = run_alone(cases);
  EngineOptions o;
  o.max_seqs = 4;
  o.max_step_tokens = 128;
  o.context = 512;
  o.kv_blocks = 24;
  Engine e(default_model(), o);
  e.start();
  std::vector<std::vector<int32_t>> got(cases.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < cases.size(); i++)
    clients.emplace_back([&, i] {
      auto r = e.submit(cases[i].prompt, cases[i].params);
      got[i] = ids(r->wait_all());
    });
  for (auto& t : clients) t.join();
  e.stop();
  for (size_t i = 0; i < cases.size(); i++) EXPECT_EQ(got[i], want[i]) << "request " << i;
  EXPECT_EQ(e.stats().kv_blocks_used, 0);
}

TEST(Engine, CancellationFreesBlocksAtOnce) {
  EngineOptions o;
  o.max_seqs = 4;
  o.max_step_tokens = 32;
  o.context = 512;
  o.kv_blocks = 16;
  Engine e(default_model(), o);
  const std::vector<Case> cases = make_cases(3, 3);
  GenParams p = cases[0].params;
  p.max_tokens = 200;
  std::vector<int32_t> long_prompt(300, 17);
  auto decoding = e.submit(cases[2].prompt, p);   // 64 tokens: decodes after two steps
  auto prefilling = e.submit(long_prompt, p);     // 300 tokens at 32 per step: still prefilling for a while
  for (int s = 0; s < 4; s++) e.step();
  const int used = e.block_manager().used_blocks();
  ASSERT_GT(used, 0);
  decoding->cancel();
  prefilling->cancel();
  auto waiting = e.submit(long_prompt, p);
  waiting->cancel();  // before it ever ran
  e.step();
  EXPECT_EQ(e.block_manager().used_blocks(), 0);
  for (auto* r : {&decoding, &prefilling, &waiting}) {
    FinishReason why;
    (*r)->wait_all(&why);
    EXPECT_EQ(why, FinishReason::Cancelled);
  }
  e.block_manager().check_invariants();
}

TEST(Engine, RefusesWhatCanNeverRunWithTheNumbers) {
  EngineOptions o;
  o.max_seqs = 2;
  o.context = 1024;
  o.kv_blocks = 4;  // 256 tokens
  Engine e(default_model(), o);
  GenParams p;
  p.max_tokens = 100;
  trellm::testing::expect_error([&] { e.submit(std::vector<int32_t>(200, 5), p); }, "256 tokens");
  trellm::testing::expect_error([&] { e.submit({}, p); }, "empty");
  trellm::testing::expect_error([&] { e.submit({1, 999999}, p); }, "outside the vocabulary");
  p.max_tokens = 0;
  trellm::testing::expect_error([&] { e.submit({1, 2}, p); }, "max_tokens");
  p.max_tokens = 4;
  p.sampling.top_p = 1.5f;
  trellm::testing::expect_error([&] { e.submit({1, 2}, p); }, "top_p");
}

TEST(Engine, LogprobsOfGreedyTokensAreTheTopOnes) {
  EngineOptions o;
  o.max_seqs = 2;
  o.context = 256;
  o.kv_blocks = 8;
  Engine e(default_model(), o);
  GenParams p;
  p.sampling.temperature = 0;
  p.max_tokens = 5;
  p.logprobs = 3;
  p.ignore_eos = true;
  auto r = e.submit({10, 20, 30, 40}, p);
  e.run_until_idle();
  const auto toks = r->wait_all();
  ASSERT_EQ(toks.size(), 5u);
  for (const GenToken& t : toks) {
    ASSERT_EQ(t.top.size(), 3u);
    EXPECT_EQ(t.top[0].token, t.id);
    EXPECT_FLOAT_EQ(t.top[0].logprob, t.logprob);
    EXPECT_LT(t.logprob, 0.0f);
    EXPECT_GE(t.top[0].logprob, t.top[1].logprob);
    EXPECT_GE(t.top[1].logprob, t.top[2].logprob);
  }
}

// ---- speculative decoding with the MTP layer ----

TEST(EngineSpeculative, GreedyTokensEqualPlainDecodingForEveryDraftCount) {
  std::vector<Case> cases = make_cases(12, 21);
  for (Case& c : cases) c.params.sampling.temperature = 0;
  const auto want = run_alone(cases);
  // As above: a cache too small for everyone (preemptions), shared heads (prefix hits), chunked prefill; 6 running
  // at most and speculation only while at most 4 run or wait, so it switches off and on again.
  EngineOptions o;
  o.max_seqs = 6;
  o.spec_max_seqs = 4;
  o.max_step_tokens = 160;
  o.context = 512;
  o.kv_blocks = 10;
  for (int k = 1; k <= 4; k++) {
    for (bool graphs : {false, true}) {
      o.draft_tokens = k;
      o.decode_graphs = graphs;
      Engine e(default_model(), o);
      std::vector<std::shared_ptr<Request>> reqs;
      for (size_t i = 0; i < cases.size(); i++) {
        reqs.push_back(e.submit(cases[i].prompt, cases[i].params));
        for (size_t s = 0; s < i % 3; s++) e.step();
      }
      e.run_until_idle();
      for (size_t i = 0; i < cases.size(); i++)
        EXPECT_EQ(ids(reqs[i]->wait_all()), want[i]) << "K " << k << (graphs ? " graphs" : "") << ", request " << i;
      const Engine::Stats st = e.stats();
      EXPECT_GT(st.preemptions, 0);
      EXPECT_GT(st.prefix_hit_tokens, 0);
      EXPECT_GT(st.spec_draft_tokens, 0);
      EXPECT_GT(st.spec_accepted_tokens, 0) << "the trained MTP layer agrees with the model ~60 % of the time";
      EXPECT_LT(st.spec_accepted_tokens, st.spec_draft_tokens);
      if (graphs) EXPECT_GT(st.graph_steps, 0);
      e.block_manager().check_invariants();
      EXPECT_EQ(e.block_manager().used_blocks(), 0) << "blocks leaked";
    }
  }
}

TEST(EngineSpeculative, SampledTokensFollowTheModelsDistribution) {
  // The default model (its trained MTP layer proposes the target's likely tokens, so acceptance and rejection
  // both happen often), three tokens sampled at temperature 1 among the top 3 (a vocabulary of 3 per step), with
  // 2 drafts per step, against the model's exact joint distribution by teacher forcing. Chi-squared over the 27
  // outcomes with fixed seeds, threshold at p = 1e-4.
  Model* m = &default_model();
  const int64_t V = m->config().vocab_size;
  const std::vector<int32_t> prompt = {5, 17, 42, 99};
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.top_k = 3;
  RunState rs = m->make_run_state(16);
  KvCache kv = m->make_kv_cache(16);
  auto probs_after = [&](const std::vector<int32_t>& t) {
    m->forward(rs, kv, t.data(), int(t.size()), 0, false);
    std::vector<double> p(static_cast<size_t>(V));
    cpu::sample_probs(rs.logits.ptr<float>(), V, sp, p.data());
    return p;
  };
  std::map<std::vector<int32_t>, double> want;
  const auto p1 = probs_after(prompt);
  for (int32_t a = 0; a < V; a++) {
    if (p1[size_t(a)] == 0) continue;
    std::vector<int32_t> t1 = prompt;
    t1.push_back(a);
    const auto p2 = probs_after(t1);
    for (int32_t b = 0; b < V; b++) {
      if (p2[size_t(b)] == 0) continue;
      std::vector<int32_t> t2 = t1;
      t2.push_back(b);
      const auto p3 = probs_after(t2);
      for (int32_t c = 0; c < V; c++)
        if (p3[size_t(c)] > 0) want[{a, b, c}] = p1[size_t(a)] * p2[size_t(b)] * p3[size_t(c)];
    }
  }
  ASSERT_EQ(want.size(), 27u);
  EngineOptions o;
  o.max_seqs = 8;
  o.spec_max_seqs = 8;
  o.context = 64;
  o.kv_blocks = 16;
  o.draft_tokens = 2;
  Engine e(*m, o);
  std::map<std::vector<int32_t>, int64_t> got;
  const int N = 2400;
  for (int i = 0; i < N; i += 8) {
    std::vector<std::shared_ptr<Request>> reqs;
    for (int j = 0; j < 8; j++) {
      GenParams p;
      p.sampling = sp;
      p.sampling.seed = uint64_t(1 + i + j);
      p.max_tokens = 3;
      p.ignore_eos = true;
      reqs.push_back(e.submit(prompt, p));
    }
    e.run_until_idle();
    for (auto& r : reqs) got[ids(r->wait_all())]++;
  }
  double chi2 = 0;
  for (const auto& [seq, p] : want) {
    const double ex = p * N, n = double(got.count(seq) ? got[seq] : 0);
    chi2 += (n - ex) * (n - ex) / ex;
  }
  int64_t outside = N;
  for (const auto& [seq, n] : want) outside -= got.count(seq) ? got[seq] : 0;
  EXPECT_EQ(outside, 0) << "outcomes the model gives probability 0";
  EXPECT_LT(chi2, 56.4) << "chi-squared with 26 degrees of freedom";  // upper 1e-4 quantile
  const Engine::Stats st = e.stats();
  EXPECT_GT(st.spec_accepted_tokens, 0);
  EXPECT_LT(st.spec_accepted_tokens, st.spec_draft_tokens);
}

TEST(EngineSpeculative, NeedsAnMtpLayer) {
  auto be = make_cpu_backend();
  auto m = Model::load(std::string(TRELLM_TEST_DATA) + "/hf/tiny_a", *be);
  EngineOptions o;
  o.kv_blocks = 4;
  o.draft_tokens = 2;
  trellm::testing::expect_error([&] { Engine e(*m, o); }, "MTP layer");
  o.draft_tokens = kMaxDraftTokens + 1;
  trellm::testing::expect_error([&] { Engine e(default_model(), o); }, "draft tokens");
}
