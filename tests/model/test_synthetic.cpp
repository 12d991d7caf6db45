// Synthetic models (random weights built on the backend): shapes follow the config, every linear layer is
// trellis-coded with the requested K (or dense), and a forward pass gives finite, unit-scale logits.
#include <gtest/gtest.h>

#include <cmath>

#include "model/glm4_moe_lite.h"
#include "quant/trellis_weight.h"
#include "test_util.h"

using namespace trellm;

namespace {

Config tiny() { return Config::glm47_flash_tiny(); }

TEST(Synthetic, Glm47FlashConfigIsTheRelease) {
  Config c = Config::glm47_flash();
  EXPECT_EQ(c.vocab_size, 154880);
  EXPECT_EQ(c.num_hidden_layers, 47);
  EXPECT_EQ(c.mla().cache_width(), 576);
  EXPECT_FLOAT_EQ(c.mla().scale, 1.0f / 16.0f);
  EXPECT_EQ(std::count(c.mlp_sparse.begin(), c.mlp_sparse.end(), true), 46);
}

TEST(Synthetic, TrellisAndDenseModelsRun) {
  for (int bits : {0, 2, 3}) {
    auto be = make_cpu_backend();
    SyntheticSpec spec;
    spec.bits = bits;
    spec.head_bits = bits ? 6 : 0;
    auto m = Model::synthetic(tiny(), *be, spec);
    const Linear& up = m->weights().layers[2].experts[5].up;
    if (bits) {
      ASSERT_NE(up.exl3, nullptr);
      EXPECT_EQ(up.exl3->K, bits);
      EXPECT_EQ(up.exl3->in_padded, 128);
      EXPECT_EQ(m->weights().lm_head.exl3->K, 6);
      EXPECT_EQ(m->weights().lm_head.exl3->out_padded, 384);  // 300 padded to 128
    } else {
      EXPECT_EQ(up.weight.dtype, DType::BF16);
    }
    RunState rs = m->make_run_state(5);
    KvCache kv = m->make_kv_cache(8);
    const int32_t toks[5] = {1, 50, 299, 7, 7};
    m->forward(rs, kv, toks, 5, 0, true);
    double ss = 0;
    for (int64_t i = 0; i < 5 * 300; i++) {
      float v = rs.logits.ptr<float>()[i];
      ASSERT_TRUE(std::isfinite(v)) << "bits " << bits;
      ss += double(v) * v;
    }
    const double rms = std::sqrt(ss / 1500);
    EXPECT_GT(rms, 0.05) << "bits " << bits;
    EXPECT_LT(rms, 50.0) << "bits " << bits;
  }
}

}  // namespace

namespace {
// A model written by Model::save loads back (EXL3 tensors through the strict reader) and computes the same logits.
TEST(Synthetic, SaveThenLoadGivesTheSameModel) {
  trellm::testing::TempDir d;
  auto be = make_cpu_backend();
  SyntheticSpec spec;
  spec.bits = 3;
  spec.codebook = trellis::Codebook::Mul1;
  auto m = Model::synthetic(tiny(), *be, spec);
  m->save(d.str());
  auto r = Model::load(d.str(), *be);
  ASSERT_TRUE(r->config().exl3.has_value());
  EXPECT_EQ(r->weights().layers[1].experts[3].down.exl3->codebook, trellis::Codebook::Mul1);
  EXPECT_EQ(r->weights().lm_head.exl3->K, 6);
  const int32_t toks[4] = {3, 299, 0, 42};
  RunState a = m->make_run_state(4), b = r->make_run_state(4);
  KvCache ka = m->make_kv_cache(4), kb = r->make_kv_cache(4);
  m->forward(a, ka, toks, 4, 0, true);
  r->forward(b, kb, toks, 4, 0, true);
  for (int64_t i = 0; i < 4 * 300; i++) ASSERT_EQ(a.logits.ptr<float>()[i], b.logits.ptr<float>()[i]) << i;
}
}  // namespace
