// The CPU forward pass against Hugging Face transformers' Glm4MoeLiteForCausalLM on tiny random checkpoints
// (tests/data/hf, made by scripts/make_hf_reference.py): prefill logits, teacher-forced decode logits through
// the latent KV cache, and free-running greedy tokens.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "backend/backend.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"

using namespace trellm;

namespace {

// Both sides compute in f32 on the same stored weights; they differ only in summation order.
// Observed max |Δ| / max |logit| is ~1e-6; 1e-4 leaves room for other CPUs and thread counts.
constexpr double kRelTol = 1e-4;

struct Err {
  double max_abs = 0, max_ref = 0;
  double rel() const { return max_abs / std::max(1.0, max_ref); }
};

void accumulate(Err& e, const float* got, const float* want, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    e.max_abs = std::max(e.max_abs, double(std::fabs(got[i] - want[i])));
    e.max_ref = std::max(e.max_ref, double(std::fabs(want[i])));
    ASSERT_TRUE(std::isfinite(got[i])) << "non-finite logit at " << i;
  }
}

int argmax(const float* v, int64_t n) {
  int64_t b = 0;
  for (int64_t i = 1; i < n; i++)
    if (v[i] > v[b]) b = i;
  return int(b);
}

class HfReference : public ::testing::TestWithParam<std::string> {};

TEST_P(HfReference, LogitsAndGreedyTokensMatchTransformers) {
  const std::string dir = std::string(TRELLM_TEST_DATA) + "/hf/" + GetParam();
  auto backend = make_cpu_backend();
  auto model = Model::load(dir, *backend);
  TensorStore ref = TensorStore::open(dir + "/reference.safetensors");
  const TensorInfo& prompt = ref.get("prompt_ids");
  const TensorInfo& prefill = ref.get("prefill_logits");
  const TensorInfo& dec_tokens = ref.get("decode_tokens");
  const TensorInfo& dec_logits = ref.get("decode_logits");
  const int P = int(prompt.numel()), S = int(dec_tokens.numel());
  const int64_t V = model->config().vocab_size;
  ASSERT_EQ(prefill.shape, (std::vector<int64_t>{P, V}));

  const int32_t* ids = static_cast<const int32_t*>(prompt.data);
  const int32_t* hf_toks = static_cast<const int32_t*>(dec_tokens.data);

  // 1) prefill: every prompt row (expanded attention when P > 16, absorbed otherwise)
  RunState rs = model->make_run_state(P);
  KvCache kv = model->make_kv_cache(P + S + 1);
  model->forward(rs, kv, ids, P, 0, /*all_logits=*/true);
  Err pre;
  accumulate(pre, rs.logits.ptr<float>(), static_cast<const float*>(prefill.data), P * V);
  EXPECT_LT(pre.rel(), kRelTol) << "prefill max|Δ| " << pre.max_abs << " max|ref| " << pre.max_ref;
  int next = argmax(rs.logits.ptr<float>() + (P - 1) * V, V);

  // 2) decode one token at a time through the latent cache (absorbed attention), teacher-forced with HF's
  //    tokens; our greedy choice must equal HF's at every step.
  Err dec;
  for (int s = 0; s < S; s++) {
    ASSERT_EQ(next, hf_toks[s]) << "greedy token differs at decode step " << s;
    model->forward(rs, kv, &hf_toks[s], 1, P + s, false);
    accumulate(dec, rs.logits.ptr<float>(), static_cast<const float*>(dec_logits.data) + int64_t(s) * V, V);
    next = argmax(rs.logits.ptr<float>(), V);
  }
  EXPECT_LT(dec.rel(), kRelTol) << "decode max|Δ| " << dec.max_abs << " max|ref| " << dec.max_ref;
  std::printf("[ %s ] prefill %d rows: max|Δ| %.3g (max|logit| %.3g); decode %d steps: max|Δ| %.3g\n",
              GetParam().c_str(), P, pre.max_abs, pre.max_ref, S, dec.max_abs);

  // 3) the same prompt through a chunked prefill (two chunks, second one at an offset) gives the same last row
  KvCache kv2 = model->make_kv_cache(P + 1);
  const int split = P / 2;
  model->forward(rs, kv2, ids, split, 0, false);
  model->forward(rs, kv2, ids + split, P - split, split, false);
  Err chunk;
  accumulate(chunk, rs.logits.ptr<float>(), static_cast<const float*>(prefill.data) + int64_t(P - 1) * V, V);
  EXPECT_LT(chunk.rel(), kRelTol) << "chunked prefill max|Δ| " << chunk.max_abs;
}

std::vector<std::string> fixtures() {
  std::vector<std::string> out;
  // *_mtp fixtures (scripts/make_mtp_reference.py) hold per-prompt MTP references instead: test_mtp.cpp.
  for (auto& e : std::filesystem::directory_iterator(std::string(TRELLM_TEST_DATA) + "/hf")) {
    const std::string name = e.path().filename().string();
    const bool mtp = name.size() > 4 && name.compare(name.size() - 4, 4, "_mtp") == 0;
    if (!mtp && std::filesystem::exists(e.path() / "reference.safetensors")) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfReference, ::testing::ValuesIn(fixtures()),
                         [](const auto& info) { return info.param; });

TEST(HfReference, AllFixturesPresent) {
  // Guards against an empty parameter list silently passing.
  auto f = fixtures();
  for (const char* name : {"tiny_a", "tiny_a_fused", "tiny_b", "tiny_odd", "tiny_groups"})
    EXPECT_NE(std::find(f.begin(), f.end(), name), f.end()) << name;
}

}  // namespace

namespace {
// The CPU can keep the latent cache in bf16 like the GPU: logits stay within bf16 rounding of transformers'.
TEST(HfReference, Bf16LatentCacheStaysClose) {
  const std::string dir = std::string(TRELLM_TEST_DATA) + "/hf/tiny_b";
  auto backend = make_cpu_backend();
  auto model = Model::load(dir, *backend);
  TensorStore ref = TensorStore::open(dir + "/reference.safetensors");
  const TensorInfo& prompt = ref.get("prompt_ids");
  const int P = int(prompt.numel());
  const int64_t V = model->config().vocab_size;
  RunState rs = model->make_run_state(P);
  KvCache kv = model->make_kv_cache(P + 1, DType::BF16);
  ASSERT_EQ(kv.layers[0].dtype, DType::BF16);
  model->forward(rs, kv, static_cast<const int32_t*>(prompt.data), P, 0, true);
  Err e;
  accumulate(e, rs.logits.ptr<float>(), static_cast<const float*>(ref.get("prefill_logits").data), P * V);
  EXPECT_LT(e.rel(), 1e-2);
  EXPECT_GT(e.max_abs, 1e-6) << "a bf16 cache should not be bit-identical to the f32 computation";
}
}  // namespace
