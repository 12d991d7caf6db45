// trellm quantize with the Viterbi on the GPU writes the same directory, byte for byte, as on the CPU: the
// device reaches the encoder through QuantizeModelOptions -> CheckpointQuantizeOptions -> EncodeOptions, and is
// not part of the recorded metadata (a resume may switch devices). Calibrated (LDLQ) and plain Linears, the scale
// search on, a 6-bit lm_head.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "core/rng.h"
#include "model/glm4_moe_lite_quantize.h"
#include "quant/trellis_viterbi.h"
#include "../quant/viterbi_cuda_env.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;
namespace fs = std::filesystem;

TEST(QuantizeModelCuda, SameFilesAsCpu) {
  if (!trellis::cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  const std::string src = std::string(TRELLM_TEST_DATA) + "/hf/tiny_a";
  Rng r(11);
  std::vector<std::vector<int32_t>> rows(2, std::vector<int32_t>(128));
  for (auto& row : rows)
    for (auto& t : row) t = int32_t(r.next_u32() % 320u);  // tiny_a's vocabulary
  TempDir tmp;
  for (bool calibrated : {true, false}) {
    std::set<std::string> names;
    for (trellis::EncodeDevice dev : {trellis::EncodeDevice::Cpu, trellis::EncodeDevice::Cuda}) {
      QuantizeModelOptions o;
      o.out_dir = tmp / str_cat(calibrated ? "cal_" : "plain_", trellis::encode_device_name(dev));
      o.bits = 3;
      o.head_bits = 6;
      o.device = dev;
      if (calibrated) o.calibration = rows, o.calibration_cols = 128;
      // Layer 0 (attention + dense MLP), one routed expert of layer 1 and lm_head keep the CPU side short.
      o.select = [](const LinearSpec& s) {
        return s.layer == 0 || s.key.rfind("model.layers.1.mlp.experts.0.", 0) == 0 || s.key == "lm_head";
      };
      const QuantizeModelResult res = quantize_model(src, o);
      EXPECT_EQ(res.ldlq > 0, calibrated);
      for (const auto& f : fs::directory_iterator(o.out_dir)) names.insert(f.path().filename().string());
    }
    EXPECT_TRUE(names.count("model.safetensors"));
    for (const std::string& n : names) {
      const std::string a = tmp / str_cat(calibrated ? "cal_" : "plain_", "cpu/", n);
      const std::string b = tmp / str_cat(calibrated ? "cal_" : "plain_", "cuda/", n);
      ASSERT_TRUE(fs::exists(a) && fs::exists(b)) << n;
      EXPECT_TRUE(trellm::testing::read_file(a) == trellm::testing::read_file(b)) << n << " differs";
    }
  }
}
