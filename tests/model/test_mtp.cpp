// The MTP layer (model.layers.<num_hidden_layers>.*, GLM-4.7-Flash / DeepSeek-V3 multi-token prediction):
// loading it through the decoder layers' name table (present, absent, malformed; bf16 and EXL3), writing it back
// with Model::save. Fixtures: tests/data/hf/tiny_mtp and tiny_glm_mtp, made by scripts/make_mtp_reference.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>

#include "backend/backend.h"
#include "core/half.h"
#include "core/rng.h"
#include "format/json_file.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "quant/trellis_ref.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;

namespace {

const std::string kTinyMtp = std::string(TRELLM_TEST_DATA) + "/hf/tiny_mtp";
const std::string kMtp = "model.layers.2.";  // tiny_mtp has 2 decoder layers

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// A copy of tiny_mtp with its tensors edited: `edit` gets every tensor and may drop it (return false) or change it.
struct Variant {
  TempDir dir;
  std::deque<std::vector<uint8_t>> bufs;
  std::vector<TensorToWrite> extra;  // tensors `edit` adds
  Variant(const std::function<bool(TensorToWrite&, Variant&)>& edit, const std::function<void(json&)>& cfg_edit = {}) {
    auto src = SafetensorsFile::open(kTinyMtp + "/model.safetensors");
    std::vector<TensorToWrite> out;
    for (const TensorInfo& t : src->tensors()) {
      TensorToWrite w{t.name, t.dtype, t.shape, t.data, t.nbytes};
      if (edit(w, *this)) out.push_back(w);
    }
    out.insert(out.end(), extra.begin(), extra.end());
    write_safetensors(dir / "model.safetensors", out);
    json cfg = read_json_file(kTinyMtp + "/config.json");
    if (cfg_edit) cfg_edit(cfg);
    trellm::testing::write_file(dir / "config.json", cfg.dump(1));
  }
  void* buffer(size_t n) { return bufs.emplace_back(n).data(); }
};

const uint16_t* bf16(const TensorView& v) { return static_cast<const uint16_t*>(v.data); }

TEST(MtpLoad, PresentLayerLoadsThroughTheNameTable) {
  auto be = make_cpu_backend();
  auto m = Model::load(kTinyMtp, *be);
  const Config& c = m->config();
  ASSERT_EQ(c.num_nextn_predict_layers, 1);
  ASSERT_EQ(m->weights().mtp.size(), 1u);
  const MtpWeights& w = m->weights().mtp[0];
  const int64_t H = c.hidden_size;
  EXPECT_TRUE(w.sparse);
  EXPECT_EQ(w.enorm.numel(), H);
  EXPECT_EQ(w.hnorm.numel(), H);
  EXPECT_EQ(w.shared_head_norm.numel(), H);
  EXPECT_EQ(w.eh_proj.out, H);
  EXPECT_EQ(w.eh_proj.in, 2 * H);
  EXPECT_EQ(w.shared_head.out, c.vocab_size);
  EXPECT_EQ(w.shared_head.in, H);
  EXPECT_TRUE(w.embed_tokens.empty());  // not repeated in the checkpoint: the main embedding serves
  ASSERT_EQ(w.layer.experts.size(), size_t(c.n_routed_experts));
  EXPECT_EQ(w.layer.gate.shape[0], c.n_routed_experts);
  EXPECT_EQ(w.layer.e_score_correction_bias.dtype, DType::F32);
  EXPECT_TRUE(w.layer.shared.down.present());
  EXPECT_TRUE(w.layer.kv_b_proj.present());

  // The tensors are the checkpoint's own (bf16 matrices in place; norms converted to f32).
  TensorStore st = TensorStore::open(kTinyMtp);
  const TensorInfo& eh = st.get(kMtp + "eh_proj.weight");
  EXPECT_EQ(0, std::memcmp(w.eh_proj.weight.data, eh.data, eh.nbytes));
  const TensorInfo& e3 = st.get(kMtp + "mlp.experts.3.down_proj.weight");
  EXPECT_EQ(0, std::memcmp(w.layer.experts[3].down.weight.data, e3.data, e3.nbytes));
  const TensorInfo& hn = st.get(kMtp + "hnorm.weight");
  for (int64_t i = 0; i < H; i++) EXPECT_EQ(w.hnorm.ptr<float>()[i], bf16_to_f32(bf16(hn.view())[i])) << i;
  // Its own weights, not the last decoder layer's.
  EXPECT_NE(w.layer.o_proj.weight.data, m->weights().layers[1].o_proj.weight.data);
}

TEST(MtpLoad, AbsentTensorsRunWithout) {
  // config says 1 MTP layer, the checkpoint has none: the model loads without it and computes what it did.
  Variant v([](TensorToWrite& t, Variant&) { return !starts_with(t.name, kMtp); });
  auto be = make_cpu_backend();
  auto m = Model::load(v.dir.str(), *be);
  EXPECT_EQ(m->config().num_nextn_predict_layers, 1);
  EXPECT_TRUE(m->weights().mtp.empty());

  auto full = Model::load(kTinyMtp, *be);
  TensorStore ref = TensorStore::open(kTinyMtp + "/reference.safetensors");
  const TensorInfo& ids = ref.get("prompt0_ids");
  const int P = int(ids.numel());
  const int64_t V = m->config().vocab_size;
  for (Model* model : {m.get(), full.get()}) {
    RunState rs = model->make_run_state(P);
    KvCache kv = model->make_kv_cache(P);
    model->forward(rs, kv, static_cast<const int32_t*>(ids.data), P, 0, true);
    const float* want = static_cast<const float*>(ref.get("prompt0_prefill_logits").data);
    double err = 0;
    for (int64_t i = 0; i < P * V; i++) err = std::max(err, double(std::fabs(rs.logits.ptr<float>()[i] - want[i])));
    EXPECT_LT(err, 1e-4) << "main-model logits against transformers";
  }
}

TEST(MtpLoad, NotAnnouncedIsNotLoaded) {
  Variant v([](TensorToWrite&, Variant&) { return true; }, [](json& c) { c["num_nextn_predict_layers"] = 0; });
  auto be = make_cpu_backend();
  auto m = Model::load(v.dir.str(), *be);
  EXPECT_TRUE(m->weights().mtp.empty());
}

TEST(MtpLoad, MalformedLayerIsAnErrorNamingTheTensor) {
  auto be = make_cpu_backend();
  {  // one tensor missing
    Variant v([](TensorToWrite& t, Variant&) { return t.name != kMtp + "shared_head.head.weight"; });
    EXPECT_ERROR_CONTAINS(Model::load(v.dir.str(), *be), "model.layers.2.shared_head.head.weight", "missing");
  }
  {  // an expert missing (the decoder-layer table checks the MTP layer too)
    Variant v([](TensorToWrite& t, Variant&) { return t.name != kMtp + "mlp.experts.2.up_proj.weight"; });
    EXPECT_ERROR_CONTAINS(Model::load(v.dir.str(), *be), "model.layers.2.mlp.experts.2.up_proj.weight");
  }
  {  // eh_proj with the halves' order lost: [hidden, hidden]
    Variant v([](TensorToWrite& t, Variant&) {
      if (t.name == kMtp + "eh_proj.weight") t.shape = {t.shape[0], t.shape[1] / 2}, t.nbytes /= 2;
      return true;
    });
    EXPECT_ERROR_CONTAINS(Model::load(v.dir.str(), *be), "model.layers.2.eh_proj.weight", "shape", "[64, 128]");
  }
  {  // a norm of the wrong size
    Variant v([](TensorToWrite& t, Variant&) {
      if (t.name == kMtp + "enorm.weight") t.shape = {32}, t.nbytes = 64;
      return true;
    });
    EXPECT_ERROR_CONTAINS(Model::load(v.dir.str(), *be), "model.layers.2.enorm.weight", "shape");
  }
  {  // an integer tensor where a matrix belongs
    Variant v([](TensorToWrite& t, Variant&) {
      if (t.name == kMtp + "eh_proj.weight") t.dtype = DType::I16;
      return true;
    });
    EXPECT_ERROR_CONTAINS(Model::load(v.dir.str(), *be), "model.layers.2.eh_proj.weight", "dtype");
  }
  {  // two MTP layers announced, one stored
    Variant v([](TensorToWrite&, Variant&) { return true; }, [](json& c) { c["num_nextn_predict_layers"] = 2; });
    EXPECT_ERROR_CONTAINS(Model::load(v.dir.str(), *be), "num_nextn_predict_layers", "model.layers.3.");
  }
}

TEST(MtpLoad, TrellisCodedLinearsLoad) {
  // Every Linear of the MTP layer as EXL3 (random codes, K = 3, 3INST): loaded like any decoder Linear.
  Rng rng(14);
  int coded = 0;
  Variant v([&](TensorToWrite& t, Variant& self) {
    const bool linear = starts_with(t.name, kMtp) && t.shape.size() == 2 && t.name != kMtp + "mlp.gate.weight";
    if (!linear) return true;
    const std::string key = t.name.substr(0, t.name.size() - 7);  // drop ".weight"
    const int64_t inp = trellis::round_up_128(t.shape[1]), outp = trellis::round_up_128(t.shape[0]);
    const int K = 3;
    const size_t n = size_t(inp / 16 * outp / 16 * 16 * K);
    auto* codes = static_cast<uint16_t*>(self.buffer(n * 2));
    for (size_t i = 0; i < n; i++) codes[i] = uint16_t(rng.next_u32());
    auto* suh = static_cast<uint16_t*>(self.buffer(size_t(inp) * 2));
    auto* svh = static_cast<uint16_t*>(self.buffer(size_t(outp) * 2));
    for (int64_t i = 0; i < inp; i++) suh[i] = f32_to_f16(0.1f);
    for (int64_t i = 0; i < outp; i++) svh[i] = f32_to_f16(1.0f);
    // the .weight entry becomes .trellis; .suh / .svh are written after it
    t = {key + ".trellis", DType::I16, {inp / 16, outp / 16, 16 * K}, codes, n * 2};
    self.extra.push_back({key + ".suh", DType::F16, {inp}, suh, size_t(inp) * 2});
    self.extra.push_back({key + ".svh", DType::F16, {outp}, svh, size_t(outp) * 2});
    coded++;
    return true;
  });
  const Config c = Config::from_json_file(kTinyMtp + "/config.json");
  // eh_proj, 5 attention projections, 3 per routed expert, the shared expert's 3, shared_head.head
  EXPECT_EQ(coded, 1 + 5 + 3 * int(c.n_routed_experts) + 3 + 1);
  auto be = make_cpu_backend();
  auto m = Model::load(v.dir.str(), *be);
  ASSERT_EQ(m->weights().mtp.size(), 1u);
  const MtpWeights& w = m->weights().mtp[0];
  std::vector<const Linear*> lin = {&w.eh_proj, &w.shared_head, &w.layer.q_a_proj, &w.layer.q_b_proj,
                                    &w.layer.kv_a_proj_with_mqa, &w.layer.kv_b_proj, &w.layer.o_proj,
                                    &w.layer.shared.gate, &w.layer.shared.up, &w.layer.shared.down};
  for (const Expert& e : w.layer.experts) lin.insert(lin.end(), {&e.gate, &e.up, &e.down});
  ASSERT_EQ(lin.size(), size_t(coded));
  for (const Linear* l : lin) {
    ASSERT_NE(l->exl3, nullptr);
    EXPECT_EQ(l->exl3->K, 3);
    EXPECT_TRUE(l->weight.empty());
  }
  EXPECT_EQ(w.eh_proj.in, 2 * c.hidden_size);
  EXPECT_EQ(w.shared_head.out, c.vocab_size);
  EXPECT_EQ(m->weights().layers[1].o_proj.exl3, nullptr);  // the decoder layers stay as they were
}

TEST(MtpSave, RoundTripsNamesShapesAndBytes) {
  auto be = make_cpu_backend();
  auto m = Model::load(kTinyMtp, *be);
  TempDir out;
  m->save(out.str());
  json cfg = read_json_file(out / "config.json");
  EXPECT_EQ(cfg["num_nextn_predict_layers"], 1);
  TensorStore a = TensorStore::open(kTinyMtp), b = TensorStore::open(out.str());
  int n = 0;
  for (const std::string& name : a.names()) {
    if (!starts_with(name, kMtp)) continue;
    const TensorInfo* t = b.find(name);
    ASSERT_NE(t, nullptr) << name << " not written";
    EXPECT_EQ(t->shape, a.get(name).shape) << name;
    n++;
    const TensorInfo& s = a.get(name);
    if (t->dtype == s.dtype) {
      EXPECT_EQ(0, std::memcmp(t->data, s.data, s.nbytes)) << name;
    } else {  // norms are kept as f32 copies of the bf16 values
      ASSERT_EQ(s.dtype, DType::BF16) << name;
      ASSERT_EQ(t->dtype, DType::F32) << name;
      for (int64_t i = 0; i < s.numel(); i++)
        EXPECT_EQ(static_cast<const float*>(t->data)[i], bf16_to_f32(static_cast<const uint16_t*>(s.data)[i])) << name;
    }
  }
  // every MTP tensor of the fixture: 19 besides the experts (norms, eh_proj, attention, router, shared expert,
  // shared_head) and 3 per routed expert
  EXPECT_EQ(n, 19 + 3 * int(m->config().n_routed_experts));
  auto again = Model::load(out.str(), *be);
  EXPECT_EQ(again->weights().mtp.size(), 1u);

  // Without an MTP layer, save says so (num_nextn_predict_layers 0), whatever the source config claimed.
  Variant v([](TensorToWrite& t, Variant&) { return !starts_with(t.name, kMtp); });
  auto bare = Model::load(v.dir.str(), *be);
  TempDir out2;
  bare->save(out2.str());
  EXPECT_EQ(read_json_file(out2 / "config.json")["num_nextn_predict_layers"], 0);
}

// ---- the MTP forward against transformers' layer math (scripts/make_mtp_reference.py) ----

struct Err {
  double max_abs = 0, max_ref = 0;
  void add(const float* got, const float* want, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
      ASSERT_TRUE(std::isfinite(got[i])) << i;
      max_abs = std::max(max_abs, double(std::fabs(got[i] - want[i])));
      max_ref = std::max(max_ref, double(std::fabs(want[i])));
    }
  }
  double rel() const { return max_abs / std::max(1.0, max_ref); }
};

int argmax(const float* v, int64_t n) { return int(std::max_element(v, v + n) - v); }

// Rows of one sequence at positions pos0.. that owns the whole cache (block table 0, 1, 2, ...).
struct OneSeq {
  std::vector<int32_t> pos, seq, table;
  StepBatch batch(const int32_t* tokens, int n, int pos0, Logits logits) {
    pos.resize(size_t(n));
    seq.assign(size_t(n), 0);
    for (int i = 0; i < n; i++) pos[size_t(i)] = pos0 + i;
    table.resize(size_t(kv_blocks_for(pos0 + n)));
    for (size_t b = 0; b < table.size(); b++) table[b] = int32_t(b);
    StepBatch s;
    s.tokens = {tokens, size_t(n)};
    s.pos = pos;
    s.seq = seq;
    s.tables = table;
    s.table_stride = int(table.size());
    s.logits = logits;
    return s;
  }
};

// Both sides compute in f32 on the same stored weights (as test_hf_reference.cpp: ~1e-6 observed).
constexpr double kRelTol = 1e-4;

void check_mtp_fixture(const std::string& model_dir, const std::string& ref_dir, int prompts) {
  auto be = make_cpu_backend();
  auto m = Model::load(model_dir, *be);
  ASSERT_EQ(m->weights().mtp.size(), 1u);
  TensorStore ref = TensorStore::open(ref_dir + "/reference.safetensors");
  const int64_t V = m->config().vocab_size, H = m->config().hidden_size;
  for (int k = 0; k < prompts; k++) {
    const std::string p = "prompt" + std::to_string(k) + "_";
    const TensorInfo& ids = ref.get(p + "ids");
    const int P = int(ids.numel());
    const auto* mtp_ids = static_cast<const int32_t*>(ref.get(p + "mtp_ids").data);
    const auto* want_logits = static_cast<const float*>(ref.get(p + "mtp_logits").data);
    const auto* want_hidden = static_cast<const float*>(ref.get(p + "mtp_hidden").data);
    const auto* main_hidden = static_cast<const float*>(ref.get(p + "hidden").data);
    ASSERT_EQ(ref.get(p + "mtp_logits").shape, (std::vector<int64_t>{P, V}));

    // 1) the main model's prompt pass leaves h_p (after model.norm) in rs.x: the MTP's input, as transformers'
    RunState rs = m->make_run_state(P);
    m->add_mtp_state(rs);
    KvCache kv = m->make_kv_cache(P);
    m->forward(rs, kv, static_cast<const int32_t*>(ids.data), P, 0, true);
    Err eh;
    eh.add(rs.x.ptr<float>(), main_hidden, P * H);
    EXPECT_LT(eh.rel(), kRelTol) << "main hidden max|Δ| " << eh.max_abs;
    EXPECT_EQ(argmax(rs.logits.ptr<float>() + (P - 1) * V, V), static_cast<const int32_t*>(ref.get(p + "next_token").data)[0]);

    // 2) the MTP layer on every row at once (prefill through its own cache), fed rs.x as it is
    OneSeq one;
    KvCache mkv = m->make_mtp_kv_cache_blocks(1 + P / kKvBlockTokens);
    m->forward_mtp(rs, mkv, one.batch(mtp_ids, P, 0, Logits::All), TensorView(rs.x.data, DType::F32, {P, H}));
    Err el, ex;
    el.add(rs.logits.ptr<float>(), want_logits, P * V);
    ex.add(rs.h.ptr<float>(), want_hidden, P * H);
    EXPECT_LT(el.rel(), kRelTol) << model_dir << " prompt " << k << " MTP logits max|Δ| " << el.max_abs << " of " << el.max_ref;
    EXPECT_LT(ex.rel(), kRelTol) << "MTP hidden max|Δ| " << ex.max_abs;
    for (int r = 0; r < P; r++)
      EXPECT_EQ(argmax(rs.logits.ptr<float>() + r * V, V), argmax(want_logits + r * V, V)) << "draft at row " << r;
    std::printf("[ %s prompt %d ] %d rows: MTP logits max|Δ| %.3g (max|logit| %.3g), hidden max|Δ| %.3g\n",
                ref_dir.substr(ref_dir.rfind('/') + 1).c_str(), k, P, el.max_abs, el.max_ref, ex.max_abs);

    // 3) one row at a time through the MTP cache (what drafting does), fed transformers' hidden states
    RunState rs1 = m->make_run_state(1);
    m->add_mtp_state(rs1);
    KvCache mkv1 = m->make_mtp_kv_cache_blocks(1 + P / kKvBlockTokens);
    Err es;
    for (int r = 0; r < P; r++) {
      m->forward_mtp(rs1, mkv1, one.batch(mtp_ids + r, 1, r, Logits::Last),
                     TensorView(const_cast<float*>(main_hidden + int64_t(r) * H), DType::F32, {1, H}));
      es.add(rs1.logits.ptr<float>(), want_logits + int64_t(r) * V, V);
      EXPECT_EQ(argmax(rs1.logits.ptr<float>(), V), argmax(want_logits + int64_t(r) * V, V)) << "step " << r;
    }
    EXPECT_LT(es.rel(), kRelTol) << "MTP step-by-step max|Δ| " << es.max_abs;

    // 4) two chunks, the second at an offset: the same last row
    KvCache mkv2 = m->make_mtp_kv_cache_blocks(1 + P / kKvBlockTokens);
    const int split = P / 2;
    RunState rs2 = m->make_run_state(P);
    m->add_mtp_state(rs2);
    m->forward_mtp(rs2, mkv2, one.batch(mtp_ids, split, 0, Logits::Last), TensorView(const_cast<float*>(main_hidden), DType::F32, {split, H}));
    m->forward_mtp(rs2, mkv2, one.batch(mtp_ids + split, P - split, split, Logits::Last),
                   TensorView(const_cast<float*>(main_hidden + int64_t(split) * H), DType::F32, {P - split, H}));
    Err ec;
    ec.add(rs2.logits.ptr<float>(), want_logits + int64_t(P - 1) * V, V);
    EXPECT_LT(ec.rel(), kRelTol) << "MTP chunked max|Δ| " << ec.max_abs;
  }
}

TEST(MtpForward, TinyRandomLayerMatchesTransformers) { check_mtp_fixture(kTinyMtp, kTinyMtp, 1); }

TEST(MtpForward, ShippedModelLayerMatchesTransformers) {
  // models/tiny-glm's own MTP layer; the reference records the sha256 of the weights it was made from.
  const std::string ref = std::string(TRELLM_TEST_DATA) + "/hf/tiny_glm_mtp";
  check_mtp_fixture(std::string(TRELLM_MODELS_DIR) + "/tiny-glm", ref, 2);
}

}  // namespace
