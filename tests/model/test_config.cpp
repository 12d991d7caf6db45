// config.json and weight-table errors: each bad value or tensor gives an error naming the field or tensor.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "format/json_file.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;

namespace {

const std::string kFixture = std::string(TRELLM_TEST_DATA) + "/hf/tiny_a";

// A copy of tiny_a with config.json edited by `edit`.
void copy_with_config(const TempDir& d, const std::function<void(json&)>& edit) {
  std::filesystem::copy_file(kFixture + "/model.safetensors", d / "model.safetensors");
  json c = read_json_file(kFixture + "/config.json");
  edit(c);
  trellm::testing::write_file(d / "config.json", c.dump(1));
}

// A copy of tiny_a whose tensors pass through `edit` (which may change, drop or add entries).
void copy_with_tensors(const TempDir& d, const std::function<void(std::vector<TensorToWrite>&)>& edit) {
  std::filesystem::copy_file(kFixture + "/config.json", d / "config.json");
  auto f = SafetensorsFile::open(kFixture + "/model.safetensors");
  std::vector<TensorToWrite> ts;
  for (auto& t : f->tensors()) ts.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
  edit(ts);
  write_safetensors(d / "model.safetensors", ts);
}

Config load_config(const TempDir& d) { return Config::from_json_file(d / "config.json"); }

TEST(Config, ReleaseStyleFieldsParse) {
  Config c = Config::from_json_file(kFixture + "/config.json");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.q_lora_rank, 32);
  EXPECT_EQ(c.mlp_sparse, (std::vector<bool>{false, true}));
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.eos_token_id, (std::vector<int64_t>{318, 319}));
  EXPECT_FLOAT_EQ(c.mla().scale, 1.0f / std::sqrt(40.0f));
}

TEST(Config, FirstKDenseReplaceWithoutLayerTypes) {
  TempDir d;
  copy_with_config(d, [](json& c) {
    c.erase("mlp_layer_types");
    c["first_k_dense_replace"] = 2;
  });
  EXPECT_EQ(load_config(d).mlp_sparse, (std::vector<bool>{false, false}));
}

TEST(Config, LegacyTopLevelRopeTheta) {
  TempDir d;
  copy_with_config(d, [](json& c) {
    c.erase("rope_parameters");
    c["rope_theta"] = 5e5;
  });
  EXPECT_DOUBLE_EQ(load_config(d).rope_theta, 5e5);
}

struct BadValue {
  const char* field;
  std::function<void(json&)> edit;
};

TEST(Config, UnsupportedValuesNameTheField) {
  std::vector<BadValue> cases = {
      {"model_type", [](json& c) { c["model_type"] = "llama"; }},
      {"hidden_act", [](json& c) { c["hidden_act"] = "gelu"; }},
      {"hidden_size", [](json& c) { c["hidden_size"] = -64; }},
      {"hidden_size", [](json& c) { c["hidden_size"] = "64"; }},
      {"vocab_size", [](json& c) { c.erase("vocab_size"); }},
      {"n_group", [](json& c) { c["n_group"] = 3; }},
      {"topk_group", [](json& c) { c["topk_group"] = 2; }},
      {"num_experts_per_tok", [](json& c) { c["num_experts_per_tok"] = 9; }},
      {"rope_parameters.rope_type", [](json& c) { c["rope_parameters"]["rope_type"] = "yarn"; }},
      {"mlp_layer_types", [](json& c) { c["mlp_layer_types"] = {"dense"}; }},
      {"mlp_layer_types", [](json& c) { c["mlp_layer_types"] = {"dense", "moe"}; }},
      {"quantization_config.quant_method is \"gptq\"", [](json& c) { c["quantization_config"] = {{"quant_method", "gptq"}}; }},
      {"q_lora_rank", [](json& c) { c.erase("q_lora_rank"); }},
      {"rope_interleave", [](json& c) { c["rope_interleave"] = false; }},
      {"eos_token_id", [](json& c) { c["eos_token_id"] = {5, 100000}; }},
      {"topk_method", [](json& c) { c["topk_method"] = "greedy"; }},
  };
  for (auto& bc : cases) {
    TempDir d;
    copy_with_config(d, bc.edit);
    // Field names are quoted in config errors; the EXL3 reader writes the key path bare.
    std::string f = bc.field;
    std::string want = f.find(' ') == std::string::npos ? "\"" + f + "\"" : f;
    EXPECT_ERROR_CONTAINS(load_config(d), "config.json", want.c_str());
  }
}

TEST(Weights, WrongDtype) {
  TempDir d;
  copy_with_tensors(d, [](auto& ts) {
    for (auto& t : ts)
      if (t.name == "model.layers.0.self_attn.o_proj.weight") t.dtype = DType::I16;  // same byte size as BF16
  });
  auto be = make_cpu_backend();
  EXPECT_ERROR_CONTAINS(Model::load(d.str(), *be), "\"model.layers.0.self_attn.o_proj.weight\"", "dtype I16",
                        "expected BF16, F16 or F32");
}

TEST(Weights, WrongShape) {
  TempDir d;
  copy_with_tensors(d, [](auto& ts) {
    for (auto& t : ts)
      if (t.name == "model.layers.1.mlp.experts.2.up_proj.weight") std::swap(t.shape[0], t.shape[1]);
  });
  auto be = make_cpu_backend();
  EXPECT_ERROR_CONTAINS(Model::load(d.str(), *be), "\"model.layers.1.mlp.experts.2.up_proj.weight\"",
                        "has shape [64, 48]", "the config implies [48, 64]");
}

TEST(Weights, MissingTensor) {
  TempDir d;
  copy_with_tensors(d, [](auto& ts) {
    std::erase_if(ts, [](auto& t) { return t.name == "model.layers.1.mlp.gate.e_score_correction_bias"; });
  });
  auto be = make_cpu_backend();
  EXPECT_ERROR_CONTAINS(Model::load(d.str(), *be), "\"model.layers.1.mlp.gate.e_score_correction_bias\"", "missing");
}

TEST(Weights, ConfigDisagreesWithTensors) {
  TempDir d;
  copy_with_config(d, [](json& c) { c["hidden_size"] = 96; });
  auto be = make_cpu_backend();
  EXPECT_ERROR_CONTAINS(Model::load(d.str(), *be), "model.embed_tokens.weight", "the config implies [320, 96]");
}

TEST(Weights, NotADirectory) {
  auto be = make_cpu_backend();
  EXPECT_ERROR_CONTAINS(Model::load("/nonexistent_model_dir", *be), "/nonexistent_model_dir", "not a model directory");
}

}  // namespace
