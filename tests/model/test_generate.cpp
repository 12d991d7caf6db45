// The generation loop: the captured greedy step (device-side argmax, batched reads) gives exactly the tokens of
// the plain loop (host argmax after every step), stops at EOS, and respects the token limit.
#include <gtest/gtest.h>

#include "model/glm4_moe_lite.h"
#include "runtime/generate.h"

using namespace trellm;

TEST(Generate, CapturedGreedyStepEqualsHostLoop) {
  auto be = make_cpu_backend();
  auto m = Model::load(std::string(TRELLM_TEST_DATA) + "/hf/tiny_odd", *be);
  const std::vector<int32_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
  GenerateOptions plain;
  plain.max_tokens = 30;
  plain.sampling.temperature = 0;
  plain.stop_at_eos = false;
  plain.use_graph = false;
  Generator g0(*m, 64);
  auto want = g0.generate(prompt, plain);
  ASSERT_EQ(want.size(), 30u);
  for (int every : {1, 4, 7}) {
    GenerateOptions o = plain;
    o.use_graph = true;
    o.read_every = every;
    Generator g(*m, 64);
    EXPECT_EQ(g.generate(prompt, o), want) << "read_every " << every;
    EXPECT_EQ(g.generate(prompt, o), want) << "second call reuses the captured step";
  }
  // EOS: make the 5th generated token an EOS id by declaring it one; generation stops right after it.
  GenerateOptions o = plain;
  o.use_graph = true;
  o.stop_at_eos = true;
  o.read_every = 3;
  auto cfg = const_cast<Config*>(&m->config());  // the test edits the stop ids only
  cfg->eos_token_id = {want[4]};
  const size_t first_eos = std::find(want.begin(), want.end(), want[4]) - want.begin();
  Generator g(*m, 64);
  GenerateStats st;
  auto got = g.generate(prompt, o, nullptr, &st);
  EXPECT_EQ(got, std::vector<int32_t>(want.begin(), want.begin() + first_eos + 1));
  EXPECT_TRUE(st.hit_eos);
}

TEST(Generate, SeededSamplingSameOnCapturedAndPlainPaths) {
  auto be = make_cpu_backend();
  auto m = Model::load(std::string(TRELLM_TEST_DATA) + "/hf/tiny_a", *be);
  const std::vector<int32_t> prompt = {5, 6, 7};
  GenerateOptions o;
  o.max_tokens = 25;
  o.stop_at_eos = false;
  o.sampling.temperature = 1.2f;
  o.sampling.top_p = 0.9f;
  o.sampling.seed = 77;
  Generator g(*m, 40);
  o.use_graph = false;
  auto plain = g.generate(prompt, o);
  o.use_graph = true;
  o.read_every = 6;
  EXPECT_EQ(g.generate(prompt, o), plain);
  o.sampling.seed = 78;
  EXPECT_NE(g.generate(prompt, o), plain);
}
