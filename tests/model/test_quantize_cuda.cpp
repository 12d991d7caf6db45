// trellm quantize with the Viterbi on the GPU writes the same directory, byte for byte, as on the CPU: the
// device reaches the encoder through QuantizeModelOptions -> CheckpointQuantizeOptions -> EncodeOptions, and is
// not part of the recorded metadata (a resume may switch devices). Calibrated (LDLQ) and plain Linears, the scale
// search on, a 6-bit lm_head.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "core/rng.h"
#include "model/glm4_moe_lite_quantize.h"
#include "quant/trellis_viterbi.h"
#include "../quant/viterbi_cuda_env.h"
#include "quant_test_util.h"
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

// Calibration on the GPU (HessianCapture::Options::device) against the CPU capture of tiny_b (2 dense layers, 2 MoE
// layers of 16 experts, top 4): every Linear sees the same number of rows, and its Hessian agrees within the
// rounding of the GPU's forward (bf16 activations in products of more than 64 rows, a bf16 latent cache). Capture
// windows on the GPU (one layer each) give the one-window Hessians bit for bit.
TEST(QuantizeModelCuda, GpuCalibrationMatchesTheCpuCapture) {
  if (!trellis::cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  const std::string src = std::string(TRELLM_TEST_DATA) + "/hf/tiny_b";
  const auto rows = trellm::testing::random_rows(2, 100, 384, 9);
  const int64_t tokens = 200;
  HessianCapture::Options oc, og, ow;
  oc.chunk = og.chunk = ow.chunk = 100;
  oc.min_rows_factor = og.min_rows_factor = ow.min_rows_factor = 0;
  og.device = ow.device = trellis::EncodeDevice::Cuda;
  ow.memory_budget = 1;
  HessianCapture cpu(src, rows, oc), gpu(src, rows, og), win(src, rows, ow);
  const Config c = Config::from_json_file(src + "/config.json");
  double worst = 0;
  std::string worst_key;
  std::map<int64_t, int64_t> routed;
  for (const LinearSpec& s : linear_specs(c)) {  // forward order: one pass per window
    SCOPED_TRACE(s.key);
    const std::vector<float> hc = cpu.hessian(s.key), hg = gpu.hessian(s.key), hw = win.hessian(s.key);
    ASSERT_EQ(gpu.rows_seen(s.key), cpu.rows_seen(s.key));
    EXPECT_EQ(hw, hg) << "windows on the GPU";
    if (s.part == LinearPart::RoutedExpert && s.key.find(".gate_proj") != std::string::npos)
      routed[s.layer] += gpu.rows_seen(s.key);
    if (s.part != LinearPart::RoutedExpert) {
      EXPECT_EQ(gpu.rows_seen(s.key), tokens);
    }
    if (hc.empty()) continue;
    double num = 0, den = 0;
    for (size_t i = 0; i < hc.size(); i++)
      num += (double(hg[i]) - hc[i]) * (double(hg[i]) - hc[i]), den += double(hc[i]) * hc[i];
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    if (rel > worst) worst = rel, worst_key = s.key;
    EXPECT_LT(rel, 2e-2);
  }
  for (auto [layer, n] : routed) EXPECT_EQ(n, tokens * c.num_experts_per_tok) << "layer " << layer;
  EXPECT_EQ(routed.size(), 2u);
  EXPECT_EQ(gpu.passes(), 1);
  EXPECT_EQ(win.passes(), c.num_hidden_layers + 1);
  std::printf("GPU against CPU Hessians, tiny_b: worst relative Frobenius difference %.3g (%s)\n", worst, worst_key.c_str());
}

// `trellm quantize` with the capture on the GPU (layer by layer, the default): a complete model with LDLQ, and the
// capture device is part of what a resume matches: Linears a GPU-captured run left in OUT.partial
// are redone by a CPU-captured resume, which then writes the CPU's files byte for byte; a GPU-captured resume
// reuses them.
TEST(QuantizeModelCuda, QuantizesWithTheGpuCapture) {
  if (!trellis::cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  const std::string src = std::string(TRELLM_TEST_DATA) + "/hf/tiny_a";
  TempDir tmp;
  auto options = [&](const std::string& out, bool gpu_capture, int64_t stop_after) {
    QuantizeModelOptions o;
    o.out_dir = tmp / out;
    o.bits = 3;
    o.head_bits = 6;
    o.device = trellis::EncodeDevice::Cuda;
    o.capture.device = gpu_capture ? trellis::EncodeDevice::Cuda : trellis::EncodeDevice::Cpu;
    o.calibration = trellm::testing::random_rows(2, 128, 320, 11);
    o.calibration_cols = 128;
    o.stop_after = stop_after;
    return o;
  };
  const QuantizeModelResult cpu = quantize_model(src, options("cpu", false, 0));
  const QuantizeModelResult gpu = quantize_model(src, options("gpu", true, 0));
  EXPECT_GT(gpu.ldlq, 0);
  EXPECT_EQ(gpu.ldlq + gpu.plain, cpu.ldlq + cpu.plain);
  EXPECT_TRUE(fs::exists(tmp / "gpu/model.safetensors"));

  EXPECT_TRUE(quantize_model(src, options("mixed", true, 3)).stopped);
  const QuantizeModelResult mixed = quantize_model(src, options("mixed", false, 0));
  EXPECT_EQ(mixed.reused, 0) << "GPU-captured Linears reused by a CPU-captured resume";
  for (const auto& f : fs::directory_iterator(tmp / "cpu")) {
    const std::string n = f.path().filename().string();
    EXPECT_TRUE(trellm::testing::read_file(f.path()) == trellm::testing::read_file(fs::path(tmp / "mixed") / n)) << n << " differs";
  }
  EXPECT_TRUE(quantize_model(src, options("again", true, 3)).stopped);
  EXPECT_EQ(quantize_model(src, options("again", true, 0)).reused, 3);
}

// Layer by layer on the GPU (LayerCapture): with the unquantized layers' outputs as inputs it gives the GPU's
// whole-model Hessians (the same kernels; only the final norm of each layer runs unfused), and with the quantized
// layers' outputs a conversion on the GPU writes a complete model.
TEST(QuantizeModelCuda, LayerCaptureOnTheGpu) {
  if (!trellis::cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  const std::string src = std::string(TRELLM_TEST_DATA) + "/hf/tiny_b";
  const auto rows = trellm::testing::random_rows(2, 100, 384, 9);
  HessianCapture::Options o;
  o.chunk = 100;
  o.min_rows_factor = 0;
  o.device = trellis::EncodeDevice::Cuda;
  HessianCapture whole(src, rows, o);
  o.inputs = HessianCapture::Options::Inputs::Original;
  LayerCapture layers(src, rows, {}, o);
  const Config c = Config::from_json_file(src + "/config.json");
  double worst = 0;
  for (const LinearSpec& s : linear_specs(c)) {
    SCOPED_TRACE(s.key);
    const std::vector<float> hw = whole.hessian(s.key), hl = layers.hessian(s.key);
    ASSERT_EQ(layers.rows_seen(s.key), whole.rows_seen(s.key));
    if (hw.empty()) continue;
    double num = 0, den = 0;
    for (size_t i = 0; i < hw.size(); i++) num += (double(hl[i]) - hw[i]) * (double(hl[i]) - hw[i]), den += double(hw[i]) * hw[i];
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-300)));
  }
  std::printf("GPU layer by layer against the GPU whole model, tiny_b: worst relative difference %.3g\n", worst);
  EXPECT_LT(worst, 1e-3);

  TempDir tmp;
  QuantizeModelResult res[2];
  for (int gpu : {0, 1}) {
    QuantizeModelOptions q;
    q.out_dir = tmp / str_cat("q", gpu);
    q.bits = 3;
    q.head_bits = 6;
    q.device = trellis::EncodeDevice::Cuda;
    q.capture.device = gpu ? trellis::EncodeDevice::Cuda : trellis::EncodeDevice::Cpu;
    q.capture.inputs = HessianCapture::Options::Inputs::Quantized;
    q.calibration = trellm::testing::random_rows(2, 128, 384, 11);
    q.calibration_cols = 128;
    res[gpu] = quantize_model(src, q);
    EXPECT_TRUE(fs::exists(fs::path(q.out_dir) / "model.safetensors"));
  }
  // The two captures' quantized layers differ slightly, so a rare expert's row count may land on the other side of
  // the LDLQ threshold: only the totals are compared.
  EXPECT_GT(res[1].ldlq, 0);
  EXPECT_EQ(res[1].ldlq + res[1].plain, res[0].ldlq + res[0].plain);
}
