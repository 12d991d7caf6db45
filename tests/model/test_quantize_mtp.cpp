// trellm quantize --mtp-bits: the MTP layer's Linears trellis-coded with LDLQ from a calibration pass through
// Model::forward_mtp. Checked against references: the captured MTP Hessians against XᵀX built here from
// transformers' own hidden states (tests/data/hf/tiny_mtp/reference.safetensors, scripts/make_mtp_reference.py)
// and the checkpoint's norms and embedding; the main model's files against a run without --mtp-bits (byte for
// byte: the MTP Linears come last in the plan); the quantized drafts against the unquantized model's (KL falls
// with K, and LDLQ beats plain Viterbi at the same K).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/half.h"
#include "core/rng.h"
#include "format/json_file.h"
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

const std::string kTinyMtp = std::string(TRELLM_TEST_DATA) + "/hf/tiny_mtp";
const std::string kTinyA = std::string(TRELLM_TEST_DATA) + "/hf/tiny_a";
const std::string kMtp = "model.layers.2.";  // tiny_mtp has 2 decoder layers

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// rms_norm(x) * w in double, as the model's rms_norm op defines it.
std::vector<double> rms_norm(const float* x, const TensorInfo& w, int64_t d, double eps) {
  double ss = 0;
  for (int64_t j = 0; j < d; j++) ss += double(x[j]) * double(x[j]);
  const double inv = 1.0 / std::sqrt(ss / double(d) + eps);
  std::vector<double> y(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; j++) y[size_t(j)] = double(x[j]) * inv * double(value(w, j));
  return y;
}

// max |a - b / rows| over max |b / rows|: a captured Hessian against sum x xᵀ accumulated here.
double rel_err(const std::vector<float>& a, const std::vector<double>& b, int64_t rows) {
  EXPECT_EQ(a.size(), b.size());
  double err = 0, big = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); i++) {
    err = std::max(err, std::abs(double(a[i]) - b[i] / double(rows)));
    big = std::max(big, std::abs(b[i] / double(rows)));
  }
  return err / big;
}

void add_outer(std::vector<double>& h, const std::vector<double>& x) {
  const size_t d = x.size();
  for (size_t i = 0; i < d; i++)
    for (size_t j = 0; j < d; j++) h[i * d + j] += x[i] * x[j];
}

// The MTP layer's draft logits (predicting t[p+2] at row p) over one row of tokens: the main forward, then
// forward_mtp on rows p < n-1 with t[p+1] and the main model's h_p, as `trellm perplexity --mtp` runs them.
std::vector<float> mtp_logits(const std::string& dir, const std::vector<int32_t>& ids) {
  auto be = make_cpu_backend();
  auto m = Model::load(dir, *be);
  const int n = int(ids.size()), rows = n - 1;
  RunState rs = m->make_run_state(n);
  m->add_mtp_state(rs);
  KvCache kv = m->make_kv_cache(n);
  KvCache mkv = m->make_mtp_kv_cache_blocks(kv.blocks);
  m->forward(rs, kv, ids.data(), n, 0, false);
  std::vector<int32_t> pos(static_cast<size_t>(rows)), seq(static_cast<size_t>(rows), 0), table(static_cast<size_t>(kv.blocks));
  for (int i = 0; i < rows; i++) pos[size_t(i)] = i;
  for (size_t b = 0; b < table.size(); b++) table[b] = int32_t(b);
  StepBatch b;
  b.tokens = {ids.data() + 1, size_t(rows)};
  b.pos = pos;
  b.seq = seq;
  b.tables = table;
  b.table_stride = int(table.size());
  b.logits = Logits::All;
  m->forward_mtp(rs, mkv, b, TensorView(rs.x.data, DType::F32, {rows, m->config().hidden_size}));
  const float* p = rs.logits.ptr<float>();
  return std::vector<float>(p, p + size_t(rows) * size_t(m->config().vocab_size));
}

nlohmann::json tensor_storage(const std::string& dir) { return read_json_file(dir + "/quantization_config.json")["tensor_storage"]; }

}  // namespace

// eh_proj's input at row p is concat(enorm(embed(t[p+1])), hnorm(h_p)) (zero embedding half at p = 0);
// shared_head.head's is shared_head.norm of the layer's output. Both are built here from transformers' h_p and
// MTP output (the fixture) and the checkpoint's tensors, and must give the captured Hessians; the calibration row
// is the fixture's prompt, so rows p = 0..P-2 (t[P] is not in the data). The main model's Hessians are the same
// with and without the MTP pass.
TEST(CalibrationMtp, HessiansAreXtXOfTheLayersInputsAsTransformersComputesThem) {
  const TensorStore ref = TensorStore::open(kTinyMtp + "/reference.safetensors");
  const TensorStore ck = TensorStore::open(kTinyMtp);
  const Config c = Config::from_json_file(kTinyMtp + "/config.json");
  const TensorInfo& ids_t = ref.get("prompt0_ids");
  const auto* ids = static_cast<const int32_t*>(ids_t.data);
  const int P = int(ids_t.numel()), rows = P - 1;
  const int64_t H = c.hidden_size;
  const auto* hidden = static_cast<const float*>(ref.get("prompt0_hidden").data);
  const auto* mtp_out = static_cast<const float*>(ref.get("prompt0_mtp_hidden").data);
  ASSERT_EQ(ref.get("prompt0_hidden").shape, (std::vector<int64_t>{P, H}));

  std::vector<double> want_eh(size_t(4 * H * H), 0.0), want_head(size_t(H * H), 0.0);
  const TensorInfo& emb = ck.get("model.embed_tokens.weight");
  for (int p = 0; p < rows; p++) {
    std::vector<float> e(static_cast<size_t>(H), 0.0f);
    for (int64_t j = 0; j < H; j++) e[size_t(j)] = value(emb, int64_t(ids[p + 1]) * H + j);
    std::vector<double> x = rms_norm(e.data(), ck.get(kMtp + "enorm.weight"), H, c.rms_norm_eps);
    if (p == 0) std::fill(x.begin(), x.end(), 0.0);
    const std::vector<double> hn = rms_norm(hidden + int64_t(p) * H, ck.get(kMtp + "hnorm.weight"), H, c.rms_norm_eps);
    x.insert(x.end(), hn.begin(), hn.end());
    add_outer(want_eh, x);
    add_outer(want_head, rms_norm(mtp_out + int64_t(p) * H, ck.get(kMtp + "shared_head.norm.weight"), H, c.rms_norm_eps));
  }

  HessianCapture::Options o;
  o.min_rows_factor = 0;
  o.mtp = true;
  const std::vector<std::vector<int32_t>> cal = {std::vector<int32_t>(ids, ids + P)};
  HessianCapture cap(kTinyMtp, cal, o);
  const std::vector<float> eh = cap.hessian(kMtp + "eh_proj"), head = cap.hessian(kMtp + "shared_head.head");
  EXPECT_EQ(cap.rows_seen(kMtp + "eh_proj"), rows);
  EXPECT_EQ(cap.rows_seen(kMtp + "shared_head.head"), rows);
  // both sides f32 forwards of the same weights (~1e-5 relative on the states, test_mtp.cpp)
  EXPECT_LT(rel_err(eh, want_eh, rows), 2e-4);
  EXPECT_LT(rel_err(head, want_head, rows), 2e-4);

  // The MTP decoder layer: every row reaches attention, kv_b and the shared expert once, the routed experts top_k times.
  EXPECT_EQ(cap.rows_seen(kMtp + "self_attn.kv_b_proj"), rows);
  EXPECT_EQ(cap.rows_seen(kMtp + "mlp.shared_experts.down_proj"), rows);
  int64_t routed = 0;
  for (int e = 0; e < c.n_routed_experts; e++) routed += cap.rows_seen(str_cat(kMtp, "mlp.experts.", e, ".up_proj"));
  EXPECT_EQ(routed, rows * c.num_experts_per_tok);
  EXPECT_EQ(cap.rows_seen("lm_head"), P);
  EXPECT_EQ(cap.passes(), 1);  // main layers, lm_head and the MTP layer in one window

  HessianCapture::Options plain = o;
  plain.mtp = false;
  HessianCapture main_only(kTinyMtp, cal, plain);
  for (const LinearSpec& s : linear_specs(c)) EXPECT_EQ(main_only.hessian(s.key), cap.hessian(s.key)) << s.key;
  EXPECT_ERROR_CONTAINS(main_only.hessian(kMtp + "eh_proj"), "eh_proj", "not a Linear");

  // Layer by layer with the unquantized layers' inputs: the same Hessians, the MTP layer's included, bit for bit.
  HessianCapture::Options lo = o;
  lo.inputs = HessianCapture::Options::Inputs::Original;
  LayerCapture layers(kTinyMtp, cal, {}, lo);
  for (const LinearSpec& s : linear_specs(c)) EXPECT_EQ(layers.hessian(s.key), cap.hessian(s.key)) << s.key;
  for (const LinearSpec& s : mtp_linear_specs(c)) {
    EXPECT_EQ(layers.hessian(s.key), cap.hessian(s.key)) << s.key;
    EXPECT_EQ(layers.rows_seen(s.key), cap.rows_seen(s.key)) << s.key;
  }
}

// quantize_model with mtp_bits: the MTP Linears are planned after lm_head at mtp_bits (shared_head.head at
// head_bits), get LDLQ, and everything else in the file is what a run without them writes, with either calibration
// inputs (the default, layer by layer from the quantized layers, and the unquantized model's).
class QuantizeMtpInputs : public ::testing::TestWithParam<HessianCapture::Options::Inputs> {};
INSTANTIATE_TEST_SUITE_P(Inputs, QuantizeMtpInputs,
                         ::testing::Values(HessianCapture::Options::Inputs::Auto, HessianCapture::Options::Inputs::Original),
                         [](const auto& info) {
                           return std::string(info.param == HessianCapture::Options::Inputs::Auto ? "LayerByLayer"
                                                                                                 : "Original");
                         });
TEST_P(QuantizeMtpInputs, MtpLinearsAreCodedAfterAnUnchangedMainModel) {
  TempDir tmp;
  const Config c = Config::from_json_file(kTinyMtp + "/config.json");
  QuantizeModelResult r[2];
  for (int with : {0, 1}) {
    QuantizeModelOptions o;
    o.out_dir = tmp / (with ? "mtp" : "main");
    o.bits = 3;
    o.head_bits = 4;
    o.mtp_bits = with ? 2 : 16;
    o.scale_search = false;
    o.calibration = random_rows(6, 96, c.vocab_size, 21);
    o.calibration_cols = 96;
    o.capture.inputs = GetParam();
    // a few main Linears keep it fast (the MTP ones are chosen by mtp_bits; `select` sees them too)
    o.select = [](const LinearSpec& s) {
      return s.key == "lm_head" || s.key == "model.layers.1.self_attn.o_proj" || s.key == "model.layers.0.mlp.up_proj" ||
             starts_with(s.key, kMtp);
    };
    r[with] = quantize_model(kTinyMtp, o);
  }
  const int n_mtp = 1 + 5 + 3 * int(c.n_routed_experts) + 3 + 1;  // eh_proj, attention, experts, shared, head
  EXPECT_EQ(r[0].mtp, 0);
  EXPECT_EQ(r[1].mtp, n_mtp);
  ASSERT_EQ(r[1].plan.entries.size(), r[0].plan.entries.size() + size_t(n_mtp));
  for (size_t i = 0; i < r[0].plan.entries.size(); i++) EXPECT_EQ(r[1].plan.entries[i].key, r[0].plan.entries[i].key);
  EXPECT_EQ(r[1].plan.decoder_bits, r[0].plan.decoder_bits);
  // every Linear has a Hessian from these rows (eh_proj, attention, shared expert and head at least among the MTP's)
  EXPECT_EQ(r[1].ldlq + r[1].plain, int64_t(r[1].plan.entries.size()));
  EXPECT_EQ(r[0].ldlq, 3);
  EXPECT_GE(r[1].ldlq - r[0].ldlq, 10);

  const nlohmann::json st = tensor_storage(tmp / "mtp"), st0 = tensor_storage(tmp / "main");
  for (const LinearSpec& s : mtp_linear_specs(c)) {
    ASSERT_TRUE(st.contains(s.key)) << s.key;
    EXPECT_EQ(st[s.key]["bits_per_weight"], is_mtp_head(s) ? 4 : 2) << s.key;
    EXPECT_FALSE(st0.contains(s.key)) << s.key;
  }
  EXPECT_TRUE(is_mtp_head(mtp_linear_specs(c).back()));

  // Outside the MTP layer the two files hold the same tensors, byte for byte; inside it, norms and the router are
  // copies of the source, the Linears trellis-coded.
  const TensorStore a = TensorStore::open(tmp / "main"), b = TensorStore::open(tmp / "mtp"), src = TensorStore::open(kTinyMtp);
  int same = 0;
  for (const std::string& name : a.names()) {
    if (starts_with(name, kMtp)) continue;
    const TensorInfo* t = b.find(name);
    ASSERT_NE(t, nullptr) << name;
    ASSERT_EQ(t->nbytes, a.get(name).nbytes) << name;
    EXPECT_EQ(0, std::memcmp(t->data, a.get(name).data, t->nbytes)) << name;
    same++;
  }
  EXPECT_GE(same, 40);
  EXPECT_TRUE(b.contains("model.layers.1.self_attn.o_proj.trellis") && b.contains("lm_head.trellis"));
  for (const char* kept : {"enorm.weight", "hnorm.weight", "shared_head.norm.weight", "mlp.gate.weight"}) {
    const TensorInfo& t = b.get(kMtp + kept);
    EXPECT_EQ(0, std::memcmp(t.data, src.get(kMtp + kept).data, t.nbytes)) << kept;
  }
  EXPECT_TRUE(b.contains(kMtp + "eh_proj.trellis") && !b.contains(kMtp + "eh_proj.weight"));
  EXPECT_EQ(b.get(kMtp + "shared_head.head.trellis").shape.back(), 16 * 4);
  EXPECT_EQ(b.get(kMtp + "mlp.experts.1.down_proj.trellis").shape.back(), 16 * 2);

  auto be = make_cpu_backend();
  auto m = Model::load(tmp / "mtp", *be);
  ASSERT_EQ(m->weights().mtp.size(), 1u);
  EXPECT_NE(m->weights().mtp[0].eh_proj.exl3, nullptr);
  EXPECT_NE(m->weights().mtp[0].layer.experts[0].gate.exl3, nullptr);
}

// The drafts of an MTP layer quantized alone (the main model stays bf16, so only the MTP layer differs; its routed
// experts too, to keep the test fast) against the unquantized model's on rows it was not calibrated on: KL falls
// with K, and at K = 2 LDLQ beats plain Viterbi. Bound at K = 4: 3x the value measured when the test was written.
TEST(QuantizeMtp, DraftKlFallsWithKAndLdlqBeatsPlain) {
  TempDir tmp;
  const Config c = Config::from_json_file(kTinyMtp + "/config.json");
  const int64_t V = c.vocab_size;
  const std::vector<int32_t> eval = random_rows(1, 48, V, 99)[0];
  const std::vector<float> ref = mtp_logits(kTinyMtp, eval);
  const int64_t rows = int64_t(eval.size()) - 1;
  auto kl_of = [&](int K, bool calibrated) {
    QuantizeModelOptions o;
    o.out_dir = tmp / str_cat("k", K, calibrated ? "" : "_plain");
    o.bits = 4;
    o.head_bits = 16;
    o.mtp_bits = K;
    o.scale_search = false;
    if (calibrated) {
      o.calibration = random_rows(8, 96, V, 5);
      o.calibration_cols = 96;
    }
    o.select = [](const LinearSpec& s) { return starts_with(s.key, kMtp) && s.part != LinearPart::RoutedExpert; };
    const QuantizeModelResult r = quantize_model(kTinyMtp, o);
    EXPECT_EQ(r.mtp, 1 + 5 + 3);  // eh_proj, attention, shared expert; shared_head.head stays with head_bits 16
    EXPECT_EQ(r.plan.entries.size(), size_t(r.mtp));
    EXPECT_EQ(r.ldlq, calibrated ? 9 : 0);
    const std::vector<float> q = mtp_logits(o.out_dir, eval);
    const double kl = mean_kl_divergence(ref.data(), q.data(), rows, V);
    std::printf("MTP layer at K = %d (%s): mean draft KL %.4g\n", K, calibrated ? "LDLQ" : "plain Viterbi", kl);
    return kl;
  };
  const double k2 = kl_of(2, true), k2_plain = kl_of(2, false), k4 = kl_of(4, true);
  EXPECT_LT(k2, k2_plain);
  EXPECT_LT(k4, k2);
  EXPECT_LT(k4, 0.037);  // measured 0.0122 (2026-12-02, this CPU)
}

TEST(QuantizeMtp, BadOptionsAreClearErrors) {
  TempDir tmp;
  QuantizeModelOptions o;
  o.out_dir = tmp / "out";
  o.bits = 3;
  o.mtp_bits = 0;
  EXPECT_ERROR_CONTAINS(quantize_model(kTinyMtp, o), "--mtp-bits 0", "1..8");
  o.mtp_bits = 9;
  EXPECT_ERROR_CONTAINS(quantize_model(kTinyMtp, o), "--mtp-bits 9");
  o.mtp_bits = 3;
  EXPECT_ERROR_CONTAINS(quantize_model(kTinyA, o), "--mtp-bits 3", "has no MTP layer");
  EXPECT_FALSE(fs::exists(o.out_dir + ".partial"));
  HessianCapture::Options co;
  co.mtp = true;
  EXPECT_ERROR_CONTAINS(HessianCapture(kTinyA, {{1, 2, 3}}, co), "MTP layer", "has none");
}
