// End to end on the GPU: the tiny transformers fixtures give the same greedy tokens on CUDA as on the CPU for
// 40 steps, and CUDA logits match transformers' (prefill and teacher-forced decode) within the CPU's tolerance.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/backend.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "runtime/generate.h"

using namespace trellm;

namespace {

class CudaModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaModel, GreedyTokensMatchCpuAndLogitsMatchTransformers) {
  const std::string dir = std::string(TRELLM_TEST_DATA) + "/hf/" + GetParam();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  auto mc = Model::load(dir, *cpu);
  auto mg = Model::load(dir, *gpu);
  TensorStore ref = TensorStore::open(dir + "/reference.safetensors");
  const TensorInfo& prompt_t = ref.get("prompt_ids");
  std::vector<int32_t> prompt(static_cast<const int32_t*>(prompt_t.data),
                              static_cast<const int32_t*>(prompt_t.data) + prompt_t.numel());
  const int P = int(prompt.size());
  const int64_t V = mg->config().vocab_size;

  // Prefill logits of every row against transformers.
  RunState rs = mg->make_run_state(P);
  KvCache kv = mg->make_kv_cache(P + 64);
  mg->forward(rs, kv, prompt.data(), P, 0, true);
  std::vector<float> logits(size_t(P * V));
  gpu->to_host(logits.data(), rs.logits.data, logits.size() * 4);
  const float* want = static_cast<const float*>(ref.get("prefill_logits").data);
  double max_abs = 0, max_ref = 0;
  for (size_t i = 0; i < logits.size(); i++) {
    ASSERT_TRUE(std::isfinite(logits[i]));
    max_abs = std::max(max_abs, double(std::fabs(logits[i] - want[i])));
    max_ref = std::max(max_ref, double(std::fabs(want[i])));
  }
  // The GPU keeps the latent cache in bf16 (2^-9 relative per value): 1e-2 of the largest logit.
  EXPECT_LT(max_abs / std::max(1.0, max_ref), 1e-2) << "prefill vs transformers, max|Δ| " << max_abs;
  std::printf("[ %s ] CUDA prefill vs transformers: max|Δ| %.3g of max|logit| %.3g\n", GetParam().c_str(), max_abs, max_ref);

  // 40 greedy steps on each backend, the CPU keeping the same bf16 latent cache as the GPU (so both compute
  // the same function; with its default f32 cache the CPU matches transformers instead).
  GenerateOptions opt;
  opt.max_tokens = 40;
  opt.sampling.temperature = 0;
  opt.stop_at_eos = false;
  Generator gc(*mc, P + 41, 512, DType::BF16), gg(*mg, P + 41);
  auto tc = gc.generate(prompt, opt);
  auto tg = gg.generate(prompt, opt);
  EXPECT_EQ(tc, tg);
  // The captured CUDA-graph step (device argmax, reads every 5 steps) equals the plain per-step loop.
  GenerateOptions plain = opt;
  plain.use_graph = false;
  Generator gp(*mg, P + 41);
  EXPECT_EQ(gp.generate(prompt, plain), tg);
  GenerateOptions batched = opt;
  batched.read_every = 5;
  EXPECT_EQ(gg.generate(prompt, batched), tg);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModel, ::testing::Values("tiny_a", "tiny_a_fused", "tiny_b", "tiny_odd", "tiny_groups"));

}  // namespace
