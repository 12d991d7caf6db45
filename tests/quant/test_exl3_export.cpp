// Writing EXL3: encoded Linears written with the project's safetensors writer read back through TrellisReader
// unchanged; quantization_config / tensor_storage JSON; bit allocation for fractional bitrates.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/rng.h"
#include "quant/bit_allocation.h"
#include "quant/exl3_export.h"
#include "quant/trellis_ref.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Exl3Export, WrittenTensorsReadBackIdentically) {
  Rng rng(4);
  const int64_t in = 120, out = 100;  // padded to 128 x 128: 64 tiles
  std::vector<float> hf(out * in), bias(out);
  for (auto& v : hf) v = rng.normal() * 0.03f;
  for (auto& v : bias) v = rng.normal();
  const std::string dir = ::testing::TempDir() + "/trellm_exl3_export";
  std::filesystem::create_directories(dir);
  for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1}) {
    EncodeOptions o;
    o.K = cb == Codebook::Mul1 ? 2 : 3;
    o.codebook = cb;
    o.scale_search = false;
    EncodedLinear enc = quantize_linear(hf.data(), out, in, nullptr, o);
    enc.bias = padded_bias_f16(bias.data(), out, enc.out_padded);
    const std::string key = std::string("model.layers.0.mlp.") + codebook_name(cb) + "_proj";
    const std::string path = dir + "/" + codebook_name(cb) + ".safetensors";
    write_safetensors(path, exl3_tensors(key, enc));

    const TensorStore st = TensorStore::open(path);
    const TrellisReader reader(st);
    ASSERT_TRUE(reader.contains(key));
    const TrellisWeight w = reader.read(key, in, out);  // strict: exactly the tensors exllamav3 writes
    EXPECT_EQ(w.K, o.K);
    EXPECT_EQ(w.codebook, cb);
    EXPECT_EQ(st.contains(key + ".mcg"), cb == Codebook::Mcg);
    EXPECT_EQ(st.contains(key + ".mul1"), cb == Codebook::Mul1);
    ASSERT_TRUE(w.has_bias());
    EXPECT_EQ(st.get(key + ".trellis").shape, (std::vector<int64_t>{8, 8, 16 * o.K}));
    std::vector<float> a(out * in), b(out * in, NAN);
    dequantize_hf_f32(enc.view(), a.data());
    dequantize_hf_f32(w, b.data());
    EXPECT_EQ(a, b);
    // y = x·W + b through the read-back descriptor equals the dense product with the bias
    std::vector<float> x(in), y(out, NAN);
    for (auto& v : x) v = rng.normal();
    trellis_matmul_ref(w, x.data(), 1, y.data());
    for (int64_t j = 0; j < out; j++) {
      double s = f16_to_f32(f32_to_f16(bias[j]));
      for (int64_t i = 0; i < in; i++) s += double(x[i]) * a[j * in + i];
      ASSERT_NEAR(y[j], s, 2e-3 * (1 + std::abs(s))) << j;
    }
    const nlohmann::json e = tensor_storage_entry(key, enc);
    EXPECT_EQ(e["bits_per_weight"], o.K);
    EXPECT_EQ(e["quant_format"], "exl3");
    EXPECT_EQ(e["stored_tensors"][key + ".trellis"]["shape"], nlohmann::json({8, 8, 16 * o.K}));
    EXPECT_EQ(e["stored_tensors"][key + ".trellis"]["n_bytes"], 128 * 128 * o.K / 8);
    EXPECT_EQ(e.contains("mcg_multiplier"), cb == Codebook::Mcg);
    if (cb == Codebook::Mul1) {
      EXPECT_EQ(e["mul1_multiplier"], 0x83DCD12Du);
    }
  }
}

TEST(Exl3Export, QuantizationConfigRoundTrip) {
  Exl3QuantConfig q;
  q.bits = 3.25;
  q.head_bits = 6;
  q.codebook = Codebook::Mul1;
  q.out_scales = "always";
  q.calibration_rows = 250;
  q.calibration_cols = 2048;
  nlohmann::json cfg = {{"model_type", "glm4_moe_lite"}, {"tie_word_embeddings", true},
                        {"quantization_config", {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}}}};
  apply_exl3_config(cfg, q);
  EXPECT_EQ(cfg["tie_word_embeddings"], true);  // untouched: the same tensors as the source
  EXPECT_EQ(cfg["quantization_config"]["original_quantization_config"]["quant_method"], "fp8");
  const auto back = exl3_config_from_model_config(cfg);
  ASSERT_TRUE(back);
  EXPECT_DOUBLE_EQ(back->bits, 3.25);
  EXPECT_EQ(back->head_bits, 6);
  EXPECT_EQ(back->codebook, Codebook::Mul1);
  EXPECT_EQ(back->out_scales, "always");
  EXPECT_EQ(back->calibration_rows, 250);
  EXPECT_EQ(back->calibration_cols, 2048);
  EXPECT_TRUE(back->has_original_quantization_config);
  expect_error([&] { apply_exl3_config(cfg, q); }, "already EXL3");
}

TEST(BitAllocation, IntegerTargetKeepsEveryTensorAtK) {
  std::vector<AllocTarget> t;
  for (int l = 0; l < 4; l++) t.push_back({"model.layers." + std::to_string(l) + ".mlp.down_proj", 1000, "model.layers." + std::to_string(l) + ".mlp"});
  const Allocation a = allocate_bits(t, 4.0);
  for (auto& [k, K] : a.K) EXPECT_EQ(K, 4) << k;
  EXPECT_DOUBLE_EQ(a.average_bits, 4.0);
}

TEST(BitAllocation, FractionalSpendsOnTheEndsOfTheStackFirst) {
  // 10 equal layers at 3.5 bpw: base 3, budget for 5 layer promotions, taken in order of distance to the
  // nearer end (ties: lower layer first): 0, 9, 1, 8, 2.
  std::vector<AllocTarget> t;
  for (int l = 0; l < 10; l++) {
    const std::string g = "model.layers." + std::to_string(l) + ".mlp";
    t.push_back({g + ".gate_proj", 500, g});
    t.push_back({g + ".up_proj", 500, g});
  }
  const Allocation a = allocate_bits(t, 3.5);
  const int want[10] = {4, 4, 4, 3, 3, 3, 3, 3, 4, 4};
  for (int l = 0; l < 10; l++) {
    const std::string g = "model.layers." + std::to_string(l) + ".mlp";
    EXPECT_EQ(a.K.at(g + ".gate_proj"), want[l]) << l;
    EXPECT_EQ(a.K.at(g + ".up_proj"), want[l]) << l;  // a group moves together
  }
  EXPECT_DOUBLE_EQ(a.average_bits, 3.5);
}

TEST(BitAllocation, PriorityHqAndBudget) {
  // Attention (priority 1) is promoted before MLPs; the average never exceeds the target.
  std::vector<AllocTarget> t;
  for (int l = 0; l < 3; l++) {
    const std::string p = "model.layers." + std::to_string(l);
    t.push_back({p + ".self_attn.q_proj", 100, p + ".self_attn", 1, 2});
    t.push_back({p + ".mlp.down_proj", 1000, p + ".mlp", 0, 0});
  }
  // base 2: 6600 bits, budget floor(2.2 * 3300) = 7260. Sweep 1 promotes the three attention groups (+300),
  // no MLP (+1000) fits; sweep 2 promotes attention again (7200); sweep 3 would need 7300: stop.
  const Allocation a = allocate_bits(t, 2.2);
  for (int l = 0; l < 3; l++) {
    EXPECT_EQ(a.K.at("model.layers." + std::to_string(l) + ".self_attn.q_proj"), 4) << l;
    EXPECT_EQ(a.K.at("model.layers." + std::to_string(l) + ".mlp.down_proj"), 2) << l;
  }
  EXPECT_NEAR(a.average_bits, (300.0 * 4 + 3000.0 * 2) / 3300, 1e-12);
  EXPECT_LE(a.average_bits, 2.2);
  // hq: attention floor base + 2 = 4 even when the budget is exact
  const Allocation h = allocate_bits(t, 2.0, true);
  EXPECT_EQ(h.K.at("model.layers.1.self_attn.q_proj"), 4);
  EXPECT_EQ(h.K.at("model.layers.1.mlp.down_proj"), 2);
  // K never exceeds 8
  const Allocation top = allocate_bits(t, 8.0);
  for (auto& [k, K] : top.K) EXPECT_EQ(K, 8);
  expect_error([&] { allocate_bits(t, 0.5); }, "outside 1..8");
  t.push_back(t[0]);
  expect_error([&] { allocate_bits(t, 3.0); }, "duplicate key model.layers.0.self_attn.q_proj");
}
