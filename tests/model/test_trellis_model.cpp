// An EXL3 (trellis-coded) checkpoint runs through the same model definition as a dense one: tiny_a with every
// linear layer replaced by random trellis codes (mixed K = 2..8 and all three codebooks, as a real mixed-bitrate
// EXL3 model has), against the dense checkpoint holding exactly the weights those codes decode to. The only
// difference left is the trellis product's fp16 rounding of the transformed activations.
#include <gtest/gtest.h>

#include <cmath>
#include <deque>
#include <filesystem>

#include "core/half.h"
#include "core/rng.h"
#include "format/json_file.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "quant/trellis_ref.h"
#include "exl3_fixture.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;
using trellm::testing::write_exl3_and_dense;

namespace {

TEST(TrellisModel, SameLogitsAsDequantizedDenseModel) {
  TempDir d;
  write_exl3_and_dense(d / "exl3", d / "dense");
  auto be = make_cpu_backend();
  auto mq = Model::load(d / "exl3", *be);
  auto md = Model::load(d / "dense", *be);
  ASSERT_TRUE(mq->config().exl3.has_value());
  EXPECT_NE(mq->weights().layers[1].experts[2].up.exl3, nullptr);
  EXPECT_EQ(md->weights().layers[1].experts[2].up.exl3, nullptr);

  const int64_t V = mq->config().vocab_size;
  std::vector<int32_t> prompt;
  Rng r(5);
  for (int i = 0; i < 20; i++) prompt.push_back(int32_t(r.next_u32() % V));
  // 20 rows: the expanded attention path; then 6 decode steps on the absorbed path (kv_b_proj trellis-coded).
  RunState rq = mq->make_run_state(20), rd = md->make_run_state(20);
  KvCache kq = mq->make_kv_cache(32), kd = md->make_kv_cache(32);
  double worst = 0;
  auto compare = [&](int rows) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < rows * V; i++) {
      double a = rq.logits.ptr<float>()[i], b = rd.logits.ptr<float>()[i];
      ASSERT_TRUE(std::isfinite(a));
      num += (a - b) * (a - b);
      den += b * b;
    }
    worst = std::max(worst, std::sqrt(num / den));
  };
  mq->forward(rq, kq, prompt.data(), 20, 0, true);
  md->forward(rd, kd, prompt.data(), 20, 0, true);
  compare(20);
  for (int s = 0; s < 6; s++) {
    int32_t tok = int32_t((s * 37 + 11) % V);
    mq->forward(rq, kq, &tok, 1, 20 + s, false);
    md->forward(rd, kd, &tok, 1, 20 + s, false);
    compare(1);
  }
  // fp16 rounding of the transformed activations (relative 2^-11 per element) through 2 layers: ~1e-3.
  EXPECT_LT(worst, 5e-3) << "relative logit error between the trellis model and its dense twin";
  EXPECT_GT(worst, 0.0) << "the two paths should not be bit-identical (one rounds activations to fp16)";
  std::printf("trellis vs dense twin: relative logit error %.3g\n", worst);
}

}  // namespace
