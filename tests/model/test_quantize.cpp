// trellm quantize's model side: the Linear table (checked against the checkpoint's own tensors), bit allocation,
// calibration Hessians (checked against XᵀX computed here from the checkpoint for the first layer's input, and
// against invariants of routing for the rest), input errors, and the quality gate on the tiny fixture: KL of the
// next-token distribution falls as K grows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/half.h"
#include "core/rng.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "model/quant_test_util.h"
#include "model/glm4_moe_lite_quantize.h"
#include "runtime/metrics.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;
namespace fs = std::filesystem;

using trellm::testing::random_rows;
using trellm::testing::value;

namespace {

const std::string kData = std::string(TRELLM_TEST_DATA) + "/hf/";

Config config_of(const std::string& name) { return Config::from_json_file(kData + name + "/config.json"); }

std::vector<float> logits(const std::string& dir, const std::vector<int32_t>& ids) {
  return trellm::testing::model_logits(dir, ids);
}

}  // namespace

// Every 2-D ".weight" of the checkpoint except the embedding and the router is one Linear of the table, with
// the shape the table says; nothing else is.
TEST(QuantizePlan, LinearTableMatchesCheckpointTensors) {
  for (const char* name : {"tiny_a", "tiny_b", "tiny_odd", "tiny_groups"}) {
    SCOPED_TRACE(name);
    const Config c = config_of(name);
    const TensorStore store = TensorStore::open(kData + name);
    std::map<std::string, std::vector<int64_t>> want;
    for (const std::string& n : store.names()) {
      const TensorInfo& t = store.get(n);
      if (t.shape.size() != 2 || n == "model.embed_tokens.weight" || n.find(".mlp.gate.weight") != std::string::npos) continue;
      ASSERT_EQ(n.substr(n.size() - 7), ".weight") << n;
      want[n.substr(0, n.size() - 7)] = t.shape;
    }
    const std::vector<LinearSpec> specs = linear_specs(c);
    std::set<std::string> groups;
    for (const LinearSpec& s : specs) {
      ASSERT_TRUE(want.count(s.key)) << s.key;
      EXPECT_EQ(want[s.key], (std::vector<int64_t>{s.out, s.in})) << s.key;
      groups.insert(s.input_group);
    }
    EXPECT_EQ(specs.size(), want.size());
    EXPECT_EQ(specs.back().key, c.tie_word_embeddings ? specs.back().key : "lm_head");
  }
}

TEST(QuantizePlan, FractionalBitsPromoteAttentionAndSharedFirst) {
  const Config c = config_of("tiny_b");  // 4 layers: 2 dense, 2 MoE
  const std::vector<LinearSpec> specs = linear_specs(c);
  // Just enough budget above 3 bits for every attention and shared-expert Linear (priority 2) to get a 4th bit.
  double hi = 0, all = 0;
  for (const LinearSpec& s : specs) {
    if (s.part == LinearPart::Head) continue;
    const double n = double(trellis::round_up_128(s.in) * trellis::round_up_128(s.out));
    all += n;
    if (s.part == LinearPart::Attention || s.part == LinearPart::SharedExpert) hi += n;
  }
  const double bits = 3 + hi / all + 1e-9;
  const BitPlan p = plan_bits(specs, bits, 6, trellis::Codebook::Mul1);
  ASSERT_EQ(p.entries.size(), specs.size());
  std::map<std::string, int> K;
  for (const auto& e : p.entries) {
    K[e.key] = e.K;
    EXPECT_EQ(e.codebook, trellis::Codebook::Mul1);
  }
  EXPECT_EQ(K["lm_head"], 6);
  EXPECT_LE(p.decoder_bits, bits);
  EXPECT_NEAR(p.decoder_bits, 3 + hi / all, 1e-9);
  for (const LinearSpec& s : specs) {
    if (s.part == LinearPart::Head) continue;
    const bool first = s.part == LinearPart::Attention || s.part == LinearPart::SharedExpert;
    EXPECT_EQ(K[s.key], first ? 4 : 3) << s.key;
  }
  // A little less: the attention of the middle layers (1, 2) waits, the end layers (0, 3) go first.
  const BitPlan q = plan_bits(specs, 3 + 0.6 * hi / all, 6, trellis::Codebook::Mul1);
  std::map<std::string, int> Kq;
  for (const auto& e : q.entries) Kq[e.key] = e.K;
  EXPECT_EQ(Kq["model.layers.0.self_attn.q_a_proj"], 4);
  EXPECT_EQ(Kq["model.layers.3.self_attn.q_a_proj"], 4);
  EXPECT_EQ(Kq["model.layers.3.self_attn.o_proj"], 4);  // a group moves together
  EXPECT_TRUE(Kq["model.layers.1.self_attn.q_a_proj"] == 3 || Kq["model.layers.2.self_attn.q_a_proj"] == 3);
  // Routed experts of one layer move together.
  EXPECT_EQ(K["model.layers.2.mlp.experts.0.up_proj"], K["model.layers.2.mlp.experts.5.down_proj"]);
  // The recorded average is the padded-numel-weighted mean of K.
  double num = 0, den = 0;
  for (const LinearSpec& s : specs)
    if (s.part != LinearPart::Head) {
      const double n = double(trellis::round_up_128(s.in) * trellis::round_up_128(s.out));
      num += n * K[s.key], den += n;
    }
  EXPECT_NEAR(p.decoder_bits, num / den, 1e-12);
  // Integer bits: every decoder Linear at exactly that K; head_bits 16 keeps lm_head out of the plan.
  const BitPlan r = plan_bits(specs, 5, 16, trellis::Codebook::Mcg);
  EXPECT_EQ(r.entries.size(), specs.size() - 1);
  for (const auto& e : r.entries) EXPECT_EQ(e.K, 5);
}

// The first layer's attention input is rms_norm(embedding) * input_layernorm: its Hessian is computed here from
// the checkpoint tensors alone and must equal the captured one (q_a_proj and kv_a_proj_with_mqa share it).
TEST(Calibration, FirstLayerHessianIsXtXOfNormedEmbeddings) {
  const auto rows = random_rows(3, 48, 320, 5);  // 144 rows >= 2 x in
  HessianCapture cap(kData + "tiny_a", rows, {});
  const std::vector<float> h = cap.hessian("model.layers.0.self_attn.q_a_proj");
  const TensorStore store = TensorStore::open(kData + "tiny_a");
  const TensorInfo& emb = store.get("model.embed_tokens.weight");
  const TensorInfo& ln = store.get("model.layers.0.input_layernorm.weight");
  const int64_t d = 64;
  std::vector<double> want(size_t(d * d), 0.0);
  int64_t n = 0;
  for (const auto& r : rows)
    for (int32_t t : r) {
      std::vector<double> x(static_cast<size_t>(d));
      double ss = 0;
      for (int64_t j = 0; j < d; j++) ss += std::pow(double(value(emb, t * d + j)), 2);
      const double inv = 1.0 / std::sqrt(ss / double(d) + 1e-5);
      for (int64_t j = 0; j < d; j++) x[j] = value(emb, t * d + j) * inv * value(ln, j);
      for (int64_t i = 0; i < d; i++)
        for (int64_t j = 0; j < d; j++) want[i * d + j] += x[i] * x[j];
      n++;
    }
  ASSERT_EQ(h.size(), want.size());
  double max_err = 0, max_v = 0;
  for (size_t i = 0; i < h.size(); i++) {
    max_err = std::max(max_err, std::abs(h[i] - want[i] / double(n)));
    max_v = std::max(max_v, std::abs(want[i] / double(n)));
  }
  EXPECT_LT(max_err, 1e-5 * max_v);
  EXPECT_EQ(cap.rows_seen("model.layers.0.self_attn.kv_a_proj_with_mqa"), n);
  EXPECT_EQ(cap.hessian("model.layers.0.self_attn.kv_a_proj_with_mqa"), h);
  EXPECT_EQ(cap.passes(), 1);
}

// Routing invariants: the routed experts of a layer see tokens x top_k rows in all; the shared expert, kv_b_proj
// and lm_head see every token once. The absorbed (short steps) and expanded (long steps) attention forms report
// the same kv_b_proj inputs, and several capture windows give the same Hessians as one.
TEST(Calibration, RowCountsAndWindowsAndAttentionForms) {
  const auto rows = random_rows(2, 48, 384, 9);
  const int64_t tokens = 96;
  HessianCapture::Options small_steps;
  small_steps.chunk = 8;  // absorbed attention (<= 16 rows per step)
  HessianCapture::Options windows;
  windows.chunk = 48;     // expanded attention
  windows.memory_budget = 1;  // one layer per window
  windows.min_rows_factor = 0;
  HessianCapture a(kData + "tiny_b", rows, small_steps), b(kData + "tiny_b", rows, windows);
  const Config c = config_of("tiny_b");
  for (const LinearSpec& s : linear_specs(c)) {  // forward order: one pass per window
    SCOPED_TRACE(s.key);
    const std::vector<float> ha = a.hessian(s.key), hb = b.hessian(s.key);
    EXPECT_EQ(a.rows_seen(s.key), b.rows_seen(s.key));
    EXPECT_EQ(ha.empty(), a.rows_seen(s.key) < 2 * s.in);  // too few rows: plain Viterbi
    EXPECT_FALSE(hb.empty());
    if (ha.empty()) continue;
    ASSERT_EQ(ha.size(), hb.size());
    double max_err = 0, max_v = 0;
    for (size_t i = 0; i < ha.size(); i++)
      max_err = std::max(max_err, double(std::abs(ha[i] - hb[i]))), max_v = std::max(max_v, double(std::abs(ha[i])));
    EXPECT_LE(max_err, 1e-4 * max_v);  // the attention forms round differently
  }
  EXPECT_EQ(a.passes(), 1);
  EXPECT_EQ(b.passes(), c.num_hidden_layers + 1);  // + lm_head
  for (int layer : {2, 3}) {
    int64_t routed = 0;
    for (int e = 0; e < c.n_routed_experts; e++)
      routed += a.rows_seen(str_cat("model.layers.", layer, ".mlp.experts.", e, ".gate_proj"));
    EXPECT_EQ(routed, tokens * c.num_experts_per_tok);
    EXPECT_EQ(a.rows_seen(str_cat("model.layers.", layer, ".mlp.shared_experts.down_proj")), tokens);
    EXPECT_EQ(a.rows_seen(str_cat("model.layers.", layer, ".self_attn.kv_b_proj")), tokens);
  }
  EXPECT_EQ(a.rows_seen("lm_head"), tokens);
}

// The Hessian cache: a second capture with the same model, rows and chunk reads every Hessian back (no forward
// pass) bit for bit; other rows, or a damaged file, are misses that capture again.
TEST(Calibration, CacheReusesHessiansOfTheSameModelAndRows) {
  TempDir tmp;
  const auto rows = random_rows(2, 48, 384, 9);
  HessianCapture::Options o;
  o.cache_dir = tmp / "hessians";
  const Config c = config_of("tiny_b");
  HessianCapture a(kData + "tiny_b", rows, o), b(kData + "tiny_b", rows, o);
  for (const LinearSpec& s : linear_specs(c)) a.hessian(s.key);
  EXPECT_EQ(a.passes(), 1);
  for (const LinearSpec& s : linear_specs(c)) {
    SCOPED_TRACE(s.key);
    EXPECT_EQ(b.hessian(s.key), a.hessian(s.key));
    EXPECT_EQ(b.rows_seen(s.key), a.rows_seen(s.key));
  }
  EXPECT_EQ(b.passes(), 0);
  EXPECT_GT(b.cache_hits(), 0);

  HessianCapture other(kData + "tiny_b", random_rows(2, 48, 384, 10), o);  // other rows: every file is a miss
  other.hessian("model.layers.0.self_attn.q_a_proj");
  EXPECT_EQ(other.passes(), 1);
  EXPECT_EQ(other.cache_hits(), 0);

  // `other` rewrote the files for its rows; damage one of them: a miss, captured again, then the same Hessian.
  HessianCapture first(kData + "tiny_b", random_rows(2, 48, 384, 10), o);
  const std::string f = o.cache_dir + "/model.layers.1.self_attn.in.safetensors";
  ASSERT_TRUE(fs::exists(f));
  fs::resize_file(f, fs::file_size(f) / 2);
  const std::vector<float> h = first.hessian("model.layers.1.self_attn.q_a_proj");
  EXPECT_EQ(first.passes(), 1);
  EXPECT_EQ(h, other.hessian("model.layers.1.self_attn.q_a_proj"));
}

// quantize_model with o.capture.cache_dir: the second run reads the Hessians and writes the same files.
TEST(QuantizeModel, HessianCacheGivesTheSameFiles) {
  TempDir tmp;
  for (const char* run : {"a", "b"}) {
    QuantizeModelOptions o;
    o.out_dir = tmp / run;
    o.bits = 3;
    o.head_bits = 16;
    o.scale_search = false;
    o.calibration = random_rows(2, 64, 320, 4);
    o.calibration_cols = 64;
    o.capture.cache_dir = tmp / "hessians";
    o.select = [](const LinearSpec& s) { return s.layer == 0; };
    std::vector<std::string> notes;
    o.on_note = [&](const std::string& n) { notes.push_back(n); };
    const QuantizeModelResult r = quantize_model(kData + "tiny_a", o);
    EXPECT_GT(r.ldlq, 0);
    bool from_cache = false;
    for (const std::string& n : notes) from_cache |= n.find("Hessians from the cache") != std::string::npos;
    EXPECT_EQ(from_cache, run[0] == 'b');
  }
  EXPECT_TRUE(trellm::testing::read_file(tmp / "a/model.safetensors") ==
              trellm::testing::read_file(tmp / "b/model.safetensors"));
}

TEST(Calibration, RejectsTokensOutsideTheVocabulary) {
  EXPECT_ERROR_CONTAINS(HessianCapture(kData + "tiny_a", {{1, 2, 320}}, {}), "320", "vocabulary");
}

TEST(QuantizeModel, BadInputsAreClearErrors) {
  TempDir tmp;
  QuantizeModelOptions o;
  o.out_dir = tmp / "out";
  o.bits = 9;
  EXPECT_ERROR_CONTAINS(quantize_model(kData + "tiny_a", o), "--bits", "between 1 and 8");
  o.bits = 4;
  o.head_bits = 0;
  EXPECT_ERROR_CONTAINS(quantize_model(kData + "tiny_a", o), "--head-bits");
  o.head_bits = 6;
  EXPECT_ERROR_CONTAINS(quantize_model(kData + "tiny_a_fused", o), "tiny_a_fused", "experts are stored fused");
  EXPECT_ERROR_CONTAINS(quantize_model(tmp / "nothing", o), "nothing", "not a model directory");

  // Unknown model_type; already quantized; a missing tensor.
  const std::string src = tmp / "src";
  fs::copy(kData + "tiny_a", src);
  std::string cfg = trellm::testing::read_file(src + "/config.json");
  const size_t at = cfg.find("glm4_moe_lite");
  trellm::testing::write_file(src + "/config.json", cfg.substr(0, at) + "llama" + cfg.substr(at + 13));
  EXPECT_ERROR_CONTAINS(quantize_model(src, o), "model_type", "glm4_moe_lite");
  trellm::testing::write_file(src + "/config.json", "{\"quantization_config\": {\"quant_method\": \"exl3\"}," + cfg.substr(1));
  EXPECT_ERROR_CONTAINS(quantize_model(src, o), "already quantized", "exl3");
  trellm::testing::write_file(src + "/config.json", cfg);
  {
    auto f = SafetensorsFile::open(src + "/model.safetensors");
    std::vector<TensorToWrite> keep;
    for (const TensorInfo& t : f->tensors())
      if (t.name != "model.layers.1.mlp.experts.2.down_proj.weight") keep.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
    write_safetensors(src + "/model2.safetensors", keep);
  }
  fs::rename(src + "/model2.safetensors", src + "/model.safetensors");
  EXPECT_ERROR_CONTAINS(quantize_model(src, o), "model.layers.1.mlp.experts.2.down_proj.weight");
  EXPECT_FALSE(fs::exists(o.out_dir + ".partial"));  // nothing started

  // An output directory that is not a model is never touched, even with force.
  fs::create_directories(o.out_dir);
  trellm::testing::write_file(o.out_dir + "/notes.txt", "mine");
  o.force = true;
  EXPECT_ERROR_CONTAINS(quantize_model(kData + "tiny_a", o), "not a model directory", "refusing");
  EXPECT_TRUE(fs::exists(o.out_dir + "/notes.txt"));
}

// An existing model at the output is refused, and replaced with force (only once the new one is complete).
TEST(QuantizeModel, ExistingOutputNeedsForce) {
  TempDir tmp;
  QuantizeModelOptions o;
  o.out_dir = tmp / "out";
  o.bits = 3;
  o.head_bits = 16;
  o.scale_search = false;
  o.select = [](const LinearSpec& s) { return s.key == "model.layers.0.self_attn.q_a_proj"; };
  quantize_model(kData + "tiny_a", o);
  ASSERT_TRUE(fs::exists(o.out_dir + "/config.json"));
  EXPECT_ERROR_CONTAINS(quantize_model(kData + "tiny_a", o), "already holds a model", "--force");
  o.force = true;
  o.bits = 5;
  quantize_model(kData + "tiny_a", o);
  const TensorStore st = TensorStore::open(o.out_dir);
  EXPECT_EQ(st.get("model.layers.0.self_attn.q_a_proj.trellis").shape, (std::vector<int64_t>{8, 8, 80}));
  EXPECT_TRUE(st.contains("model.layers.0.self_attn.q_b_proj.weight"));  // not selected: stays dense
  EXPECT_FALSE(fs::exists(o.out_dir + ".partial"));
}

// A sharded source (index + two files) quantizes into a sharded EXL3 directory that loads and runs.
TEST(QuantizeModel, ShardedInAndOut) {
  TempDir tmp;
  const std::string src = tmp / "sharded";
  fs::create_directories(src);
  for (const char* f : {"config.json", "generation_config.json"}) fs::copy(kData + "tiny_a/" + f, src + "/" + f);
  {
    auto f = SafetensorsFile::open(kData + "tiny_a/model.safetensors");
    std::vector<TensorToWrite> a, b;
    std::string index = R"({"metadata": {}, "weight_map": {)";
    for (const TensorInfo& t : f->tensors()) {
      const bool first = t.name.find("layers.1.") == std::string::npos;
      (first ? a : b).push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
      index += str_cat(a.size() + b.size() > 1 ? ", " : "", "\"", t.name, "\": \"",
                       first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors", "\"");
    }
    write_safetensors(src + "/model-00001-of-00002.safetensors", a);
    write_safetensors(src + "/model-00002-of-00002.safetensors", b);
    trellm::testing::write_file(src + "/model.safetensors.index.json", index + "}}");
  }
  QuantizeModelOptions o;
  o.out_dir = tmp / "out";
  o.bits = 4;
  o.head_bits = 16;
  o.scale_search = false;
  o.shard_bytes = 100000;
  o.select = [](const LinearSpec& s) { return s.key == "model.layers.1.mlp.experts.3.down_proj"; };
  quantize_model(src, o);
  EXPECT_TRUE(fs::exists(o.out_dir + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/model-00001-of-00004.safetensors"));
  const TensorStore st = TensorStore::open(o.out_dir);
  EXPECT_EQ(st.get("model.layers.1.mlp.experts.3.down_proj.trellis").shape, (std::vector<int64_t>{8, 8, 64}));
  const std::vector<int32_t> ids = {1, 2, 3};
  const std::vector<float> a = logits(o.out_dir, ids), b = logits(kData + "tiny_a", ids);
  EXPECT_LT(mean_kl_divergence(b.data(), a.data(), 3, 320), 1e-3);
}

TEST(Metrics, KlDivergence) {
  const float a[3] = {0.0f, 0.0f, 0.0f};
  const float b[3] = {std::log(0.5f), std::log(0.25f), std::log(0.25f)};
  EXPECT_DOUBLE_EQ(kl_divergence(a, a, 3), 0.0);
  // KL(uniform || (1/2, 1/4, 1/4)) = (1/3) (ln(2/3) + 2 ln(4/3))
  EXPECT_NEAR(kl_divergence(a, b, 3), (std::log(2.0 / 3) + 2 * std::log(4.0 / 3)) / 3, 1e-7);
  const float shifted[3] = {100.0f, 100.0f, 100.0f};  // softmax is shift-invariant
  EXPECT_NEAR(kl_divergence(shifted, a, 3), 0.0, 1e-12);
  const float ab[6] = {0, 0, 0, b[0], b[1], b[2]}, ba[6] = {b[0], b[1], b[2], 0, 0, 0};
  EXPECT_NEAR(mean_kl_divergence(ab, ba, 2, 3), (kl_divergence(a, b, 3) + kl_divergence(b, a, 3)) / 2, 1e-12);
  const float bad[3] = {0.0f, NAN, 0.0f};
  EXPECT_ERROR_CONTAINS(kl_divergence(a, bad, 3), "not finite");
}

// The quality gate, on a subset that keeps it fast: tiny_a's layer-0 MLP (3 Linears, 192 tiles) quantized with
// calibration at K = 2, 3, 4, 6, 8 (no scale search), KL of the next-token distributions vs the unquantized
// model over 32 positions. Bound at K = 8: 3x the value measured when the test was written (see
// bench/results/quantize_fixtures.md, which also has the whole-model numbers).
TEST(QuantizeQuality, KlFallsAsKGrows) {
  TempDir tmp;
  const std::vector<int32_t> eval = random_rows(1, 32, 320, 77)[0];
  const std::vector<float> ref = logits(kData + "tiny_a", eval);
  double prev = INFINITY;
  for (int K : {2, 3, 4, 6, 8}) {
    QuantizeModelOptions o;
    o.out_dir = tmp / str_cat("k", K);
    o.bits = K;
    o.head_bits = 16;
    o.scale_search = false;
    o.calibration = random_rows(2, 128, 320, 3);
    o.calibration_cols = 128;
    o.select = [](const LinearSpec& s) { return s.key.rfind("model.layers.0.mlp.", 0) == 0; };
    const QuantizeModelResult r = quantize_model(kData + "tiny_a", o);
    EXPECT_EQ(r.ldlq, 3);
    const std::vector<float> q = logits(o.out_dir, eval);
    const double kl = mean_kl_divergence(ref.data(), q.data(), int64_t(eval.size()), 320);
    std::printf("K = %d: mean KL %.4g\n", K, kl);
    EXPECT_LT(kl, prev) << "K = " << K;
    prev = kl;
  }
  EXPECT_LT(prev, 2.2e-5);  // measured 7.1e-6 (2026-11-25, this CPU)
}

// Working ahead (later groups' rotations and scale search on a thread of their own while the main thread adds the
// Hessians of earlier ones: the GPU path's default, forced here on the CPU) writes the files the plain order writes;
// a budget smaller than any group makes the thread wait for every take. The MLP of one MoE layer of tiny_a (its
// experts' gate/up, their down projections, the shared expert); no scale search (on the CPU it would be most of the
// test's time, and rotate_linears runs it the same way on either thread).
TEST(QuantizeModel, WorkingAheadGivesTheSameFiles) {
  TempDir tmp;
  const std::vector<std::pair<std::string, uint64_t>> runs = {{"none", 0}, {"tight", 1}, {"wide", uint64_t(1) << 30}};
  for (const auto& [name, bytes] : runs) {
    QuantizeModelOptions o;
    o.out_dir = tmp / name;
    o.bits = 3;
    o.head_bits = 16;
    o.scale_search = false;
    o.calibration = random_rows(2, 64, 320, 9);
    o.calibration_cols = 64;
    o.ahead_bytes = bytes;
    o.select = [](const LinearSpec& s) { return s.key.rfind("model.layers.1.mlp.", 0) == 0; };  // 3 groups
    const QuantizeModelResult r = quantize_model(kData + "tiny_a", o);
    EXPECT_GT(r.ldlq, 0) << name;
  }
  const auto none = trellm::testing::read_file(tmp / "none/model.safetensors");
  EXPECT_TRUE(none == trellm::testing::read_file(tmp / "tight/model.safetensors"));
  EXPECT_TRUE(none == trellm::testing::read_file(tmp / "wide/model.safetensors"));
}

// Grouped encoding (a layer's Linears of one shape and K through one batched LDLQ) writes the files one Linear at a
// time writes: in each of tiny_a's MoE layers the 4 experts' and the shared expert's gate/up projections (and any
// other Linear of their shape, 48 x 64) make one group, their down projections another.
TEST(QuantizeModel, GroupedEncodingGivesTheSameFiles) {
  TempDir tmp;
  for (int group : {1, 64}) {
    QuantizeModelOptions o;
    o.out_dir = tmp / (group == 1 ? "g1" : "g64");
    o.bits = 3;
    o.head_bits = 16;
    o.scale_search = false;
    o.calibration = random_rows(2, 64, 320, 5);
    o.calibration_cols = 64;
    o.group_linears = group;
    int64_t largest = 0;
    o.on_progress = [&](const trellis::QuantizeProgress& p) { largest = std::max(largest, p.group); };
    const QuantizeModelResult r = quantize_model(kData + "tiny_a", o);
    EXPECT_GT(r.ldlq, 0);
    if (group == 1) EXPECT_EQ(largest, 1);
    else EXPECT_GE(largest, 10);
  }
  EXPECT_TRUE(trellm::testing::read_file(tmp / "g1/model.safetensors") ==
              trellm::testing::read_file(tmp / "g64/model.safetensors"));
}
