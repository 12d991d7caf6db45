// quantize_checkpoint: a tiny source directory becomes an EXL3 directory that TensorStore / TrellisReader
// read back; interrupted runs leave only "<out>.partial" and resume reusing finished Linears.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/half.h"
#include "core/rng.h"
#include "format/safetensors.h"
#include "quant/exl3_checkpoint.h"
#include "quant/trellis_ref.h"

using namespace trellm;
using namespace trellm::trellis;
namespace fs = std::filesystem;

namespace {

struct Source {
  std::vector<uint16_t> embed, up;  // bf16
  std::vector<float> down, down_bias, norm;
};

Source make_source(const fs::path& dir) {
  fs::create_directories(dir);
  Rng rng(2);
  Source s;
  s.embed.resize(50 * 64);
  s.up.resize(96 * 64);
  s.down.resize(64 * 96);
  s.down_bias.resize(64);
  s.norm.resize(64);
  for (auto& v : s.embed) v = f32_to_bf16(rng.normal());
  for (auto& v : s.up) v = f32_to_bf16(rng.normal() * 0.05f);
  for (auto& v : s.down) v = rng.normal() * 0.05f;
  for (auto& v : s.down_bias) v = rng.normal();
  for (auto& v : s.norm) v = 1.0f + rng.normal() * 0.1f;
  write_safetensors((dir / "model.safetensors").string(),
                    {{"model.embed_tokens.weight", DType::BF16, {50, 64}, s.embed.data(), s.embed.size() * 2},
                     {"model.layers.0.mlp.up_proj.weight", DType::BF16, {96, 64}, s.up.data(), s.up.size() * 2},
                     {"model.layers.0.mlp.down_proj.weight", DType::F32, {64, 96}, s.down.data(), s.down.size() * 4},
                     {"model.layers.0.mlp.down_proj.bias", DType::F32, {64}, s.down_bias.data(), 64 * 4},
                     {"model.norm.weight", DType::F32, {64}, s.norm.data(), 64 * 4}});
  std::ofstream(dir / "config.json") << R"({"model_type": "tiny", "hidden_size": 64, "tie_word_embeddings": false})";
  std::ofstream(dir / "tokenizer.json") << R"({"model": {}})";
  std::ofstream(dir / "pytorch_model.bin") << "not copied";
  return s;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); i++) num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / den);
}

}  // namespace

TEST(Exl3Checkpoint, QuantizesResumesAndReadsBack) {
  const fs::path root = fs::path(::testing::TempDir()) / "trellm_exl3_checkpoint";
  fs::remove_all(root);
  const fs::path src = root / "src", out = root / "out";
  const Source s = make_source(src);
  const std::vector<QuantizePlanEntry> plan = {{"model.layers.0.mlp.down_proj", 96, 64, 4, Codebook::Mul1},
                                               {"model.layers.0.mlp.up_proj", 64, 96, 3, Codebook::Mcg}};
  Exl3QuantConfig q;
  q.head_bits = 6;
  q.codebook = Codebook::Mcg;
  CheckpointQuantizeOptions opt;
  opt.out_dir = out.string();
  opt.seed = 7;
  opt.shard_bytes = 8000;  // force several shards
  opt.encode.scale_search = false;

  // Run 1 is interrupted after the first Linear.
  opt.on_progress = [](const QuantizeProgress& p) {
    if (p.done == 1) throw std::runtime_error("interrupted");
  };
  EXPECT_THROW(quantize_checkpoint(src.string(), plan, q, opt), std::runtime_error);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(fs::exists(fs::path(out.string() + ".partial") / "qtensors" / "model.layers.0.mlp.down_proj.safetensors"));

  // Run 2 resumes: the first Linear is reused, the second is quantized.
  std::vector<bool> reused;
  opt.on_progress = [&](const QuantizeProgress& p) {
    reused.push_back(p.reused);
    EXPECT_EQ(p.total, 2);
    EXPECT_EQ(p.weights_total, 2 * 96 * 64);
  };
  quantize_checkpoint(src.string(), plan, q, opt);
  EXPECT_EQ(reused, (std::vector<bool>{true, false}));
  EXPECT_TRUE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(out / "tokenizer.json"));
  EXPECT_FALSE(fs::exists(out / "pytorch_model.bin"));

  const TensorStore st = TensorStore::open(out.string());
  EXPECT_GT(st.files().size(), 1u);
  EXPECT_FALSE(st.contains("model.layers.0.mlp.up_proj.weight"));
  EXPECT_FALSE(st.contains("model.layers.0.mlp.down_proj.weight"));
  // unquantized tensors byte for byte
  EXPECT_EQ(std::memcmp(st.get("model.embed_tokens.weight").data, s.embed.data(), s.embed.size() * 2), 0);
  EXPECT_EQ(std::memcmp(st.get("model.norm.weight").data, s.norm.data(), 64 * 4), 0);

  const TrellisReader reader(st);
  const TrellisWeight up = reader.read("model.layers.0.mlp.up_proj", 64, 96);
  const TrellisWeight down = reader.read("model.layers.0.mlp.down_proj", 96, 64);
  EXPECT_EQ(up.K, 3);
  EXPECT_EQ(up.codebook, Codebook::Mcg);
  EXPECT_EQ(down.K, 4);
  EXPECT_EQ(down.codebook, Codebook::Mul1);
  ASSERT_TRUE(down.has_bias());
  EXPECT_EQ(down.bias.ptr<uint16_t>()[5], f32_to_f16(s.down_bias[5]));
  std::vector<float> up_f(96 * 64), up_q(96 * 64), down_q(64 * 96);
  for (size_t i = 0; i < up_f.size(); i++) up_f[i] = bf16_to_f32(s.up[i]);
  dequantize_hf_f32(up, up_q.data());
  dequantize_hf_f32(down, down_q.data());
  EXPECT_LT(rel_err(up_q, up_f), 0.16);    // K = 3: ~0.13 on Gaussian weights
  EXPECT_LT(rel_err(down_q, s.down), 0.09);  // K = 4: ~0.07

  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(out / "config.json"));
  EXPECT_EQ(cfg["quantization_config"]["quant_method"], "exl3");
  EXPECT_DOUBLE_EQ(cfg["quantization_config"]["bits"].get<double>(), 3.5);  // 128x128 padded, K = 3 and 4
  EXPECT_EQ(cfg["tie_word_embeddings"], false);
  ASSERT_TRUE(exl3_config_from_model_config(cfg));
  nlohmann::json qc = nlohmann::json::parse(std::ifstream(out / "quantization_config.json"));
  EXPECT_EQ(qc["tensor_storage"]["model.layers.0.mlp.up_proj"]["bits_per_weight"], 3);
  EXPECT_EQ(qc["tensor_storage"]["model.layers.0.mlp.down_proj"]["mul1_multiplier"], 0x83DCD12Du);

  // never into an existing directory
  try {
    quantize_checkpoint(src.string(), plan, q, opt);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
  }
  fs::remove_all(root);
}

TEST(Exl3Checkpoint, RejectsAPlanThatDisagreesWithTheCheckpoint) {
  const fs::path root = fs::path(::testing::TempDir()) / "trellm_exl3_checkpoint_bad";
  fs::remove_all(root);
  make_source(root / "src");
  CheckpointQuantizeOptions opt;
  opt.out_dir = (root / "out").string();
  auto expect = [&](const std::vector<QuantizePlanEntry>& plan, const std::string& needle) {
    try {
      quantize_checkpoint((root / "src").string(), plan, {}, opt);
      ADD_FAILURE() << "expected an error mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect({{"model.layers.0.mlp.up_proj", 96, 64, 3, Codebook::Mcg}}, "model.layers.0.mlp.up_proj.weight\" has shape");
  expect({{"model.layers.0.mlp.gate_proj", 64, 96, 3, Codebook::Mcg}}, "model.layers.0.mlp.gate_proj.weight\" is missing");
  expect({{"model.layers.0.mlp.up_proj", 64, 96, 9, Codebook::Mcg}}, "K = 9");
  expect({{"model.layers.0.mlp.up_proj", 64, 96, 3, Codebook::Mcg}, {"model.layers.0.mlp.up_proj", 64, 96, 3, Codebook::Mcg}},
         "appears twice");
  EXPECT_FALSE(fs::exists(root / "out.partial"));  // nothing is created for a plan that cannot run
  fs::remove_all(root);
}
