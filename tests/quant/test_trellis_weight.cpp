// Reader: TrellisWeight from the exllamav3 fixture, and every rejection path with an error naming the tensor;
// quantization_config parsing.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "format/safetensors.h"
#include "quant/trellis_weight.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// A synthetic checkpoint in memory: named tensors with owned storage.
struct FakeCkpt {
  std::map<std::string, std::vector<uint64_t>> store;
  std::map<std::string, TensorView> views;
  void add(const std::string& name, DType dt, std::initializer_list<int64_t> shape, uint64_t fill = 0) {
    TensorView t(nullptr, dt, shape);
    auto& buf = store[name];
    buf.assign((t.nbytes() + 7) / 8 + 1, fill);
    t.data = buf.data();
    views[name] = t;
  }
  void erase(const std::string& name) { views.erase(name); }
  TensorFinder finder() const {
    return [this](const std::string& n) -> std::optional<TensorView> {
      auto it = views.find(n);
      if (it == views.end()) return std::nullopt;
      return it->second;
    };
  }
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (auto& [k, t] : views) v.push_back(k);
    return v;
  }
};

// A valid MCG K=3 Linear with in = 200 (padded 256), out = 576 (padded 640).
FakeCkpt valid_linear(const std::string& key) {
  FakeCkpt c;
  c.add(key + ".trellis", DType::I16, {16, 40, 48});
  c.add(key + ".suh", DType::F16, {256}, 0x3C003C003C003C00ull);
  c.add(key + ".svh", DType::F16, {640}, 0x3C003C003C003C00ull);
  c.add(key + ".mcg", DType::I32, {}, 0xCBAC1FEDull);
  return c;
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(TrellisWeight, ReadsExllamaFixture) {
  const TensorStore st = TensorStore::open(TRELLM_TEST_DATA "/exl3/exl3_oracle_w384x128.safetensors");
  const TrellisReader reader(st);
  const TensorFinder find = reader.finder();
  // The fixture stores exllamav3's decode next to each Linear's tensors; the plain finder skips the strict
  // unknown-tensor check, TrellisReader::read applies it.
  for (int K : {2, 3, 4, 6})
    for (const char* cb : {"3inst", "mcg", "mul1"}) {
      const std::string key = "w384x128_k" + std::to_string(K) + "_" + cb;
      ASSERT_TRUE(reader.contains(key));
      ASSERT_TRUE(is_trellis_module(key, find));
      const TrellisWeight w = read_trellis_weight(key, find, 384, 128);
      EXPECT_EQ(w.K, K);
      EXPECT_STREQ(codebook_name(w.codebook), cb);
      EXPECT_EQ(w.in_padded, 384);
      EXPECT_EQ(w.out_padded, 128);
      EXPECT_EQ(w.tiles_k(), 24);
      EXPECT_EQ(w.tiles_n(), 8);
      EXPECT_EQ(w.trellis, st.get(key + ".trellis").data);
      EXPECT_EQ(w.suh, st.get(key + ".suh").data);
      EXPECT_EQ(w.tile(1, 2), w.trellis + (1 * 8 + 2) * 16 * K);
      EXPECT_EQ(w.trellis_bytes(), 384 * 128 * K / 8);
      EXPECT_FALSE(w.has_bias());
      expect_error([&] { reader.read(key, 384, 128); }, key + ".inner_fp16: unexpected tensor");
    }
  expect_error([&] { reader.read("w384x128_k2_mcg", 384, 128); }, "exl3_oracle_w384x128.safetensors: w384x128_k2_mcg.");
  expect_error([&] { read_trellis_weight("w384x128_k2_mcg", find, 384, 256); },
               "w384x128_k2_mcg.trellis: shape [24, 8, 32] does not match the Linear (in 384, out 256)");
}

TEST(TrellisWeight, PaddingAndValidLegacySigns) {
  const std::string key = "model.layers.0.self_attn.kv_a_proj_with_mqa";
  FakeCkpt c = valid_linear(key);
  TrellisWeight w = read_trellis_weight(key, c.finder(), 200, 576);
  EXPECT_EQ(w.K, 3);
  EXPECT_EQ(w.codebook, Codebook::Mcg);
  EXPECT_EQ(w.in, 200);
  EXPECT_EQ(w.out, 576);
  EXPECT_EQ(w.in_padded, 256);
  EXPECT_EQ(w.out_padded, 640);

  // legacy sign bitfields: element i = bit i%16 of word i/16, set => -1
  c.erase(key + ".suh");
  c.erase(key + ".svh");
  c.add(key + ".su", DType::I16, {16}, 0x0000000000000005ull);  // word 0 = 0x0005: elements 0 and 2 negative
  c.add(key + ".sv", DType::I16, {40}, 0x0000000080000000ull);  // word 1 = 0x8000: element 31 negative
  w = read_trellis_weight(key, c.finder(), 200, 576);
  ASSERT_TRUE(w.owned);
  EXPECT_EQ(w.suh[0], 0xBC00);
  EXPECT_EQ(w.suh[1], 0x3C00);
  EXPECT_EQ(w.suh[2], 0xBC00);
  EXPECT_EQ(w.suh[255], 0x3C00);
  EXPECT_EQ(w.svh[30], 0x3C00);
  EXPECT_EQ(w.svh[31], 0xBC00);
  EXPECT_EQ(w.svh[639], 0x3C00);
  const TrellisWeight copy = w;  // pointers stay valid through copies (shared ownership)
  EXPECT_EQ(copy.suh[2], 0xBC00);
}

TEST(TrellisWeight, RejectsBadTensorsNamingThem) {
  const std::string key = "m.layers.1.mlp.down_proj";
  const std::string tr = key + ".trellis";
  auto read = [&](FakeCkpt& c) { read_trellis_weight(key, c.finder(), 200, 576); };
  {
    FakeCkpt c = valid_linear(key);
    c.erase(tr);
    expect_error([&] { read(c); }, tr + ": missing");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(tr, DType::F16, {16, 40, 48});
    expect_error([&] { read(c); }, tr + ": dtype F16");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(tr, DType::I16, {16, 40, 40});  // 2.5 bits: newer exllamav3 half-integer rate
    expect_error([&] { read(c); }, "half-integer");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(tr, DType::I16, {16, 40, 144});  // K = 9
    expect_error([&] { read(c); }, "K = 9");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(tr, DType::I16, {16, 36, 48});  // out 576 unpadded: not what exllamav3 writes
    expect_error([&] { read(c); }, tr + ": shape [16, 36, 48] does not match");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".suh", DType::F16, {200});
    expect_error([&] { read(c); }, key + ".suh: shape");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".mcg", DType::I32, {}, 0x12345678);  // a pre-0f2da5d runtime multiplier
    expect_error([&] { read(c); }, key + ".mcg: codebook multiplier 0x12345678");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".mul1", DType::I32, {}, 0x83DCD12Dull);
    expect_error([&] { read(c); }, "both .mcg and .mul1");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".mcg", DType::I64, {}, 0xCBAC1FEDull);
    expect_error([&] { read(c); }, key + ".mcg: expected an I32 scalar");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".su", DType::I16, {16});
    expect_error([&] { read(c); }, "both .suh and legacy .su");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.erase(key + ".svh");
    expect_error([&] { read(c); }, "missing .svh");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".scale", DType::F16, {1});
    expect_error([&] { read(c); }, key + ".scale");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".tile_perm", DType::I16, {256});
    const auto names = c.names();
    expect_error([&] { read_trellis_weight(key, c.finder(), 200, 576, &names); }, key + ".tile_perm: unexpected tensor");
  }
  {
    FakeCkpt c = valid_linear(key);
    c.add(key + ".bias", DType::F16, {600});
    expect_error([&] { read(c); }, key + ".bias: shape [600]");
    c.add(key + ".bias", DType::F16, {576});
    EXPECT_NO_THROW(read(c));
    c.add(key + ".bias", DType::F16, {640});
    EXPECT_NO_THROW(read(c));
  }
}

TEST(TrellisWeight, QuantizationConfig) {
  using nlohmann::json;
  json cfg = json::parse(R"({"model_type": "glm4_moe_lite", "quantization_config": {
      "quant_method": "exl3", "version": "0.0.18", "bits": 3.25, "head_bits": 6,
      "calibration": {"rows": 250, "cols": 2048}, "out_scales": "always", "codebook": "mul1"}})");
  auto q = exl3_config_from_model_config(cfg);
  ASSERT_TRUE(q);
  EXPECT_EQ(q->version, "0.0.18");
  EXPECT_DOUBLE_EQ(q->bits, 3.25);
  EXPECT_EQ(q->head_bits, 6);
  EXPECT_EQ(q->calibration_rows, 250);
  EXPECT_EQ(q->calibration_cols, 2048);
  EXPECT_EQ(q->out_scales, "always");
  EXPECT_EQ(q->codebook, Codebook::Mul1);

  EXPECT_FALSE(exl3_config_from_model_config(json::parse(R"({"model_type": "x"})")));

  auto bad = [&](const char* qjson, const std::string& needle) {
    json c = json::parse(R"({"quantization_config": )" + std::string(qjson) + "}");
    expect_error([&] { exl3_config_from_model_config(c, "m/config.json"); }, needle);
  };
  bad(R"({"quant_method": "gptq", "bits": 4})", "quant_method is \"gptq\"");
  bad(R"({"bits": 4})", "quant_method is missing");
  bad(R"({"quant_method": "exl3", "bits": 4, "tile_order": "sm70_colmajor"})", "tile_order");
  bad(R"({"quant_method": "exl3", "bits": 4, "shared_h": true})", "m/config.json: quantization_config.shared_h: unknown key");
  bad(R"({"quant_method": "exl3", "bits": "4"})", ".bits = \"4\"");
  bad(R"({"quant_method": "exl3", "head_bits": 40})", ".head_bits = 40");
}

// The top-level codebook is informational (the per-tensor markers decide, TRELLIS.md): an unknown value is a
// warning naming it, and the config still loads.
TEST(Exl3Config, UnknownTopLevelCodebookIsAWarning) {
  for (const char* v : {R"("e8p")", "7"}) {
    nlohmann::json c = nlohmann::json::parse(std::string(R"({"quantization_config": {"quant_method": "exl3", "bits": 4, "codebook": )") + v + "}}");
    ::testing::internal::CaptureStderr();
    const auto q = exl3_config_from_model_config(c, "m/config.json");
    const std::string err = ::testing::internal::GetCapturedStderr();
    ASSERT_TRUE(q.has_value());
    EXPECT_EQ(q->bits, 4);
    EXPECT_NE(err.find(std::string("m/config.json: quantization_config.codebook = ") + v + " is not one trellm knows"),
              std::string::npos) << err;
  }
}
