// GLM-4.7-Flash -> EXL3: the Linear table, bit allocation and the quantize pipeline. The Hessian capture
// lives in glm4_moe_lite_calibrate.cpp.
#include "model/glm4_moe_lite_quantize.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#include "core/timer.h"
#include "format/json_file.h"
#include "format/safetensors.h"
#include "quant/bit_allocation.h"

namespace trellm {

namespace fs = std::filesystem;

const char* linear_part_name(LinearPart p) {
  switch (p) {
    case LinearPart::Attention: return "attention";
    case LinearPart::DenseMlp: return "dense mlp";
    case LinearPart::SharedExpert: return "shared expert";
    case LinearPart::RoutedExpert: return "routed experts";
    case LinearPart::Head: return "lm_head";
    case LinearPart::Mtp: return "mtp";
  }
  return "?";
}

namespace {

int64_t hid_of(const Config& c) { return c.hidden_size; }

// Walks the Linears of the model in forward order; `w` may be null (names and shapes only). The names are the
// loader's (glm4_moe_lite_load.cpp); the per-expert layout is the one a quantized checkpoint stores.
// The Linears of one decoder layer under "model.layers.<l>." (`lw` may be null: names and shapes only).
template <typename Fn>
void for_each_layer_linear(const Config& c, int64_t l, const LayerWeights* lw, bool sparse, Fn&& fn) {
  const int64_t hid = c.hidden_size, H = c.num_attention_heads, qk = c.qk_head_dim();
  const std::string p = "model.layers." + std::to_string(l) + ".", a = p + "self_attn.";
  auto add = [&](const std::string& key, int64_t out, int64_t in, LinearPart part, const std::string& group,
                 const Linear* lin) {
    fn(LinearSpec{key, in, out, part, l, group.empty() ? key : group}, lin);
  };
  const std::string attn_in = a + "in";
  if (c.q_lora_rank > 0) {
    add(a + "q_a_proj", c.q_lora_rank, hid, LinearPart::Attention, attn_in, lw ? &lw->q_a_proj : nullptr);
    add(a + "q_b_proj", H * qk, c.q_lora_rank, LinearPart::Attention, "", lw ? &lw->q_b_proj : nullptr);
  } else {
    add(a + "q_proj", H * qk, hid, LinearPart::Attention, attn_in, lw ? &lw->q_proj : nullptr);
  }
  add(a + "kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, hid, LinearPart::Attention, attn_in,
      lw ? &lw->kv_a_proj_with_mqa : nullptr);
  add(a + "kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, LinearPart::Attention, "",
      lw ? &lw->kv_b_proj : nullptr);
  add(a + "o_proj", hid, H * c.v_head_dim, LinearPart::Attention, "", lw ? &lw->o_proj : nullptr);
  auto ffn = [&](const std::string& m, int64_t inter, LinearPart part, const Linear* g, const Linear* u,
                 const Linear* d) {
    add(m + "gate_proj", inter, hid, part, m + "in", g);
    add(m + "up_proj", inter, hid, part, m + "in", u);
    add(m + "down_proj", hid, inter, part, "", d);
  };
  if (!sparse) {
    ffn(p + "mlp.", c.intermediate_size, LinearPart::DenseMlp, lw ? &lw->mlp.gate_proj : nullptr,
        lw ? &lw->mlp.up_proj : nullptr, lw ? &lw->mlp.down_proj : nullptr);
    return;
  }
  for (int64_t e = 0; e < c.n_routed_experts; e++) {
    const Expert* ex = lw ? &lw->experts[size_t(e)] : nullptr;
    ffn(p + "mlp.experts." + std::to_string(e) + ".", c.moe_intermediate_size, LinearPart::RoutedExpert,
        ex ? &ex->gate : nullptr, ex ? &ex->up : nullptr, ex ? &ex->down : nullptr);
  }
  if (c.n_shared_experts > 0)
    ffn(p + "mlp.shared_experts.", c.moe_intermediate_size * c.n_shared_experts, LinearPart::SharedExpert,
        lw ? &lw->shared.gate : nullptr, lw ? &lw->shared.up : nullptr, lw ? &lw->shared.down : nullptr);
}

// Walks the Linears of the MTP layers (model.layers.<num_hidden_layers + k>.*) in forward order: eh_proj, the
// decoder layer's, shared_head.head; `w` may be null (names and shapes only; the layer is then taken as sparse, as
// in every released MTP layer).
template <typename Fn>
void for_each_mtp_linear(const Config& c, const Weights* w, Fn&& fn) {
  const int64_t hid = c.hidden_size;
  const int64_t n = w ? int64_t(w->mtp.size()) : c.num_nextn_predict_layers;
  for (int64_t k = 0; k < n; k++) {
    const MtpWeights* m = w ? &w->mtp[size_t(k)] : nullptr;
    const int64_t l = c.num_hidden_layers + k;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    fn(LinearSpec{p + "eh_proj", 2 * hid, hid, LinearPart::Mtp, l, p + "eh_proj"}, m ? &m->eh_proj : nullptr);
    // The part of each Linear is the one it has in a decoder layer.
    for_each_layer_linear(c, l, m ? &m->layer : nullptr, m ? m->sparse : c.n_routed_experts > 0, fn);
    fn(LinearSpec{p + "shared_head.head", hid, c.vocab_size, LinearPart::Mtp, l, p + "shared_head.head"},
       m ? &m->shared_head : nullptr);
  }
}

// Walks the Linears of the model in forward order; `w` may be null (names and shapes only). The names are the
// loader's (glm4_moe_lite_load.cpp); the per-expert layout is the one a quantized checkpoint stores.
template <typename Fn>
void for_each_linear(const Config& c, const Weights* w, Fn&& fn) {
  for (int64_t l = 0; l < c.num_hidden_layers; l++)
    for_each_layer_linear(c, l, w ? &w->layers[size_t(l)] : nullptr, c.mlp_sparse[size_t(l)], fn);
  if (!c.tie_word_embeddings)
    fn(LinearSpec{"lm_head", hid_of(c), c.vocab_size, LinearPart::Head, c.num_hidden_layers, "lm_head"},
       w ? &w->lm_head : nullptr);
}

std::string alloc_group(const LinearSpec& s) {
  const std::string p = "model.layers." + std::to_string(s.layer) + ".";
  switch (s.part) {
    case LinearPart::Attention: return p + "self_attn";
    case LinearPart::SharedExpert: return p + "mlp.shared_experts";
    case LinearPart::DenseMlp: return p + "mlp";
    case LinearPart::RoutedExpert: return p + "mlp.experts";
    case LinearPart::Head: return "lm_head";
    case LinearPart::Mtp: return s.key;
  }
  return s.key;
}

int alloc_priority(LinearPart p) {
  return p == LinearPart::Attention || p == LinearPart::SharedExpert ? 2 : p == LinearPart::DenseMlp ? 1 : 0;
}

// What may be at the output path before we start: nothing, an empty directory (removed), or, with force, a
// finished model directory (replaced when the new one is complete). Anything else is refused.
bool check_out_dir(const fs::path& out, bool force) {
  if (!fs::exists(out)) return false;
  if (!fs::is_directory(out)) fail(out.string(), ": exists and is not a directory");
  if (fs::is_empty(out)) {
    fs::remove(out);
    return false;
  }
  if (!fs::exists(out / "config.json"))
    fail(out.string(), ": exists and is not a model directory (no config.json); refusing to overwrite it");
  if (!force) fail(out.string(), ": already holds a model; pass --force to replace it");
  return true;
}

}  // namespace

// FNV-1a over the calibration token rows (recorded with every finished Linear: a resume with other data
// re-encodes instead of mixing Hessians from two data sets).
std::string calibration_fingerprint(const std::vector<std::vector<int32_t>>& rows) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) {
    for (int i = 0; i < 8; i++) h = (h ^ ((v >> (8 * i)) & 0xff)) * 1099511628211ull;
  };
  for (const auto& r : rows) {
    mix(r.size());
    for (int32_t t : r) mix(uint64_t(uint32_t(t)));
  }
  return std::to_string(rows.size()) + " rows, fnv1a " + std::to_string(h);
}

std::vector<LinearSpec> linear_specs(const Config& c) {
  std::vector<LinearSpec> v;
  for_each_linear(c, nullptr, [&](LinearSpec s, const Linear*) { v.push_back(std::move(s)); });
  return v;
}

std::vector<LinearSpec> mtp_linear_specs(const Config& c) {
  std::vector<LinearSpec> v;
  for_each_mtp_linear(c, nullptr, [&](LinearSpec s, const Linear*) { v.push_back(std::move(s)); });
  return v;
}

bool is_mtp_head(const LinearSpec& s) {
  static const std::string tail = ".shared_head.head";
  return s.part == LinearPart::Mtp && s.key.size() > tail.size() &&
         s.key.compare(s.key.size() - tail.size(), tail.size(), tail) == 0;
}

std::vector<std::pair<LinearSpec, const Linear*>> model_mtp_linears(const Model& m) {
  std::vector<std::pair<LinearSpec, const Linear*>> v;
  for_each_mtp_linear(m.config(), &m.weights(), [&](LinearSpec s, const Linear* l) { v.emplace_back(std::move(s), l); });
  return v;
}

std::vector<std::pair<LinearSpec, const Linear*>> layer_linears(const Model& m, int64_t l) {
  const Config& c = m.config();
  TRELLM_ASSERT(l >= 0 && l < c.num_hidden_layers, "layer ", l, " of ", c.num_hidden_layers);
  std::vector<std::pair<LinearSpec, const Linear*>> v;
  for_each_layer_linear(c, l, &m.weights().layers[size_t(l)], c.mlp_sparse[size_t(l)],
                        [&](LinearSpec s, const Linear* lin) { v.emplace_back(std::move(s), lin); });
  return v;
}

std::vector<std::pair<LinearSpec, const Linear*>> model_linears(const Model& m) {
  std::vector<std::pair<LinearSpec, const Linear*>> v;
  for_each_linear(m.config(), &m.weights(), [&](LinearSpec s, const Linear* l) { v.emplace_back(std::move(s), l); });
  return v;
}

BitPlan plan_bits(const std::vector<LinearSpec>& linears, double bits, int head_bits, trellis::Codebook codebook) {
  std::vector<trellis::AllocTarget> targets;
  for (const LinearSpec& s : linears)
    if (s.part != LinearPart::Head)
      targets.push_back({s.key, trellis::round_up_128(s.in) * trellis::round_up_128(s.out), alloc_group(s),
                         alloc_priority(s.part), 0});
  BitPlan plan;
  const trellis::Allocation a = targets.empty() ? trellis::Allocation{} : trellis::allocate_bits(targets, bits);
  double numel = 0, sum = 0;
  for (const LinearSpec& s : linears) {
    int K = s.part == LinearPart::Head ? head_bits : a.K.at(s.key);
    if (s.part == LinearPart::Head && head_bits == 16) continue;  // kept unquantized
    plan.entries.push_back({s.key, s.in, s.out, K, codebook, str_cat("layer ", s.layer)});
    const double n = double(trellis::round_up_128(s.in) * trellis::round_up_128(s.out));
    numel += n;
    sum += n * K;
  }
  plan.decoder_bits = a.average_bits;
  plan.all_bits = numel > 0 ? sum / numel : 0;
  return plan;
}

QuantizeModelResult quantize_model(const std::string& in_dir, const QuantizeModelOptions& opt) {
  auto note = [&](const std::string& s) {
    if (opt.on_note) opt.on_note(s);
  };
  if (!(opt.bits >= 1.0 && opt.bits <= 8.0)) fail("--bits ", opt.bits, ": must be between 1 and 8");
  if (!((opt.head_bits >= 1 && opt.head_bits <= 8) || opt.head_bits == 16))
    fail("--head-bits ", opt.head_bits, ": must be 1..8, or 16 to keep lm_head unquantized");
  if (!((opt.mtp_bits >= 1 && opt.mtp_bits <= 8) || opt.mtp_bits == 16))
    fail("--mtp-bits ", opt.mtp_bits, ": must be 1..8, or 16 to keep the MTP layer unquantized");
  if (opt.out_dir.empty()) fail("--out: no output directory given");
  const fs::path src(in_dir), out(opt.out_dir);
  if (!fs::is_directory(src)) fail(in_dir, ": not a model directory");
  if (!fs::exists(src / "config.json")) fail(in_dir, ": no config.json");
  if (fs::exists(out) && fs::equivalent(src, out)) fail("--out ", opt.out_dir, ": is the input directory");

  // The source must be an unquantized glm4_moe_lite checkpoint with one tensor per expert Linear.
  const std::string cfg_path = (src / "config.json").string();
  {
    const json raw = read_json_file(cfg_path);
    if (raw.is_object() && raw.contains("quantization_config")) {
      const json& q = raw["quantization_config"];
      const std::string method = q.is_object() && q.contains("quant_method") && q["quant_method"].is_string()
                                     ? q["quant_method"].get<std::string>()
                                     : "?";
      fail(cfg_path, ": the model is already quantized (quantization_config.quant_method = \"", method,
           "\"); trellm quantize needs an unquantized BF16, F16 or F32 checkpoint");
    }
  }
  const Config config = Config::from_json_file(cfg_path);  // model_type and every field checked
  {
    const TensorStore store = TensorStore::open(in_dir);
    for (const std::string& n : store.names()) {
      auto ends_with = [&](const std::string& tail) {
        return n.size() >= tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0;
      };
      if (ends_with(".mlp.experts.gate_up_proj") || ends_with(".mlp.experts.down_proj"))
        fail(in_dir, ": tensor \"", n, "\": experts are stored fused (3-D, transformers' in-memory layout); "
             "trellm quantize needs one tensor per expert Linear (transformers' save_pretrained writes that)");
      if (ends_with(".trellis"))
        fail(in_dir, ": tensor \"", n, "\" is already trellis-coded (EXL3); re-quantizing is not supported");
    }
  }
  const bool replace = check_out_dir(out, opt.force);

  std::vector<LinearSpec> all = linear_specs(config), chosen;
  for (const LinearSpec& s : all)
    if (!opt.select || opt.select(s)) chosen.push_back(s);
  QuantizeModelResult res;
  res.plan = plan_bits(chosen, opt.bits, opt.head_bits, opt.codebook);
  const bool mtp = opt.mtp_bits != 16;
  {
    // Every tensor the forward pass needs, with its shape and dtype, before hours of encoding: the loader's
    // checks (a CPU backend maps the checkpoint in place).
    CpuBackend cpu;
    const auto m = Model::load(in_dir, cpu);
    if (mtp && m->weights().mtp.empty())
      fail("--mtp-bits ", opt.mtp_bits, ": ", in_dir, " has no MTP layer (config.json num_nextn_predict_layers ",
           config.num_nextn_predict_layers, ", no model.layers.", config.num_hidden_layers, ".* tensors loaded)");
    if (mtp && !opt.calibration.empty() && m->weights().mtp.size() > 1)
      fail("--mtp-bits with --calibration: ", in_dir, " has ", m->weights().mtp.size(),
           " MTP layers; calibrating more than one is not supported");
  }
  if (mtp) {
    // After the main plan (lm_head included), outside the bit budget: the main Linears keep their seeds.
    double numel = 0, sum = 0;
    for (const LinearSpec& s : mtp_linear_specs(config)) {
      if (opt.select && !opt.select(s)) continue;
      const int K = is_mtp_head(s) ? opt.head_bits : opt.mtp_bits;
      if (K == 16) continue;  // shared_head.head with head_bits 16: kept like lm_head
      res.plan.entries.push_back({s.key, s.in, s.out, K, opt.codebook, str_cat("layer ", s.layer)});
      const double n = double(trellis::round_up_128(s.in) * trellis::round_up_128(s.out));
      numel += n;
      sum += n * K;
      res.mtp++;
    }
    res.plan.mtp_bits = numel > 0 ? sum / numel : 0;
  }
  std::map<int, int64_t> per_k;
  for (const auto& e : res.plan.entries) per_k[e.K]++;
  std::string ks;
  for (auto [k, n] : per_k) ks += (ks.empty() ? "" : ", ") + std::to_string(n) + " at K=" + std::to_string(k);
  note(str_cat(res.plan.entries.size(), " Linears to trellis-code (", ks, "), codebook ",
               trellis::codebook_name(opt.codebook), "; decoder average ", res.plan.decoder_bits, " bpw; Viterbi on ",
               opt.device == trellis::EncodeDevice::Cuda ? "the GPU (CUDA)" : "the CPU",
               res.mtp ? str_cat("; ", res.mtp, " of them the MTP layer's (", res.plan.mtp_bits, " bpw)")
                       : std::string(config.num_nextn_predict_layers > 0 && !mtp
                                         ? "; the MTP layer kept unquantized (--mtp-bits 16)" : "")));

  using Inputs = HessianCapture::Options::Inputs;
  std::unique_ptr<Calibration> capture;
  bool quantized_inputs = false;
  if (!opt.calibration.empty()) {
    HessianCapture::Options co = opt.capture;
    if (!co.on_note) co.on_note = opt.on_note;
    co.mtp = co.mtp || res.mtp > 0;
    if (co.inputs == Inputs::Quantized && !co.cache_dir.empty())
      fail("--calibration-inputs quantized: a Hessian cache (--hessian-cache) holds the unquantized model's Hessians; "
           "use --calibration-inputs original");
    quantized_inputs = co.inputs == Inputs::Quantized || (co.inputs == Inputs::Auto && co.cache_dir.empty());
    const char* where = co.device == trellis::EncodeDevice::Cuda ? "the GPU" : "the CPU";
    const Timer load;  // the capture's model load counts as calibration time
    if (quantized_inputs) {
      std::set<std::string> planned;
      for (const auto& e : res.plan.entries) planned.insert(e.key);
      capture = std::make_unique<LayerCapture>(in_dir, opt.calibration, std::move(planned), co);
      note(str_cat("calibration: ", opt.calibration.size(), " rows, ", capture->tokens(), " tokens; Hessians layer by "
                   "layer on ", where, ", each layer's inputs from the quantized layers before it; LDLQ where a Linear "
                   "saw >= ", co.min_rows_factor, " x in rows"));
    } else {
      capture = std::make_unique<HessianCapture>(in_dir, opt.calibration, co);
      note(str_cat("calibration: ", opt.calibration.size(), " rows, ", capture->tokens(),
                   " tokens; Hessians from the unquantized model on ", where, ", LDLQ where a Linear saw >= ",
                   co.min_rows_factor, " x in rows"));
    }
    res.calibration_seconds += load.seconds();
  } else {
    note("no calibration data: plain per-tile Viterbi for every Linear (no LDLQ)");
  }

  trellis::Exl3QuantConfig q;
  q.bits = res.plan.decoder_bits;
  q.head_bits = opt.head_bits;
  q.codebook = opt.codebook;
  q.out_scales = "always";
  q.calibration_rows = int64_t(opt.calibration.size());
  q.calibration_cols = opt.calibration.empty() ? 0 : opt.calibration_cols;

  trellis::CheckpointQuantizeOptions co;
  co.out_dir = opt.out_dir;
  co.replace_existing = replace;
  co.seed = opt.seed;
  co.shard_bytes = opt.shard_bytes;
  co.group_linears = opt.group_linears;
  co.ahead_bytes = opt.ahead_bytes;
  co.encode.scale_search = opt.scale_search;
  co.encode.times = &res.encode_times;
  co.encode.device = opt.device;  // not in extra_metadata: both devices write the same codes, so a resume may switch
  co.encode.fixed_scale = 0;  // without the search: the Gaussian-optimal scale of each K
  co.extra_metadata = {
      // The GPU's Hessians are its own (bf16 activations), so the capture device is part of what a resume must match.
      {"calibration", opt.calibration.empty() ? "none"
                      : str_cat(calibration_fingerprint(opt.calibration),
                                opt.capture.device == trellis::EncodeDevice::Cuda ? ", captured on the GPU" : "",
                                quantized_inputs ? ", inputs from the quantized layers" : "")},
      {"encoder", str_cat("scale_search=", opt.scale_search, " sigma_reg=", co.encode.sigma_reg,
                          " min_rows_factor=", opt.capture.min_rows_factor)}};
  if (capture && quantized_inputs)
    co.on_batch = [&](const std::string& batch, const std::string& work_dir) { capture->on_batch(batch, work_dir); };
  if (capture) {
    co.hessian = [&](const trellis::QuantizePlanEntry& e) {
      const Timer t;
      std::vector<float> h = capture->hessian(e.key);
      res.calibration_seconds += t.seconds();
      if (h.empty()) res.plain++, res.few_rows++;
      else res.ldlq++;
      return h;
    };
  }
  int64_t encoded = 0;
  struct Stop {};
  co.on_progress = [&](const trellis::QuantizeProgress& p) {
    if (p.reused) res.reused++;
    else if (!capture) res.plain++;
    if (opt.on_progress) opt.on_progress(p);
    if (!p.reused && opt.stop_after > 0 && ++encoded >= opt.stop_after && p.done < p.total) throw Stop{};
  };
  try {
    trellis::quantize_checkpoint(in_dir, res.plan.entries, q, co);
  } catch (const Stop&) {
    res.stopped = true;
  }
  const trellis::EncodeTimes& t = res.encode_times;
  auto sec = [](double v) { return str_cat(int64_t(v * 10) / 10.0, " s"); };
  if (capture && !capture->time_by_phase().empty()) note("calibration time: " + capture->time_by_phase());
  if (t.prepare + t.encode > 0)
    note(str_cat("encoder time (", opt.device == trellis::EncodeDevice::Cuda
                                       ? "summed over groups, which overlap on the GPU: the groups in flight encode at once "
                                         "beside the next ones' preparation, so the sum can exceed the wall time; "
                                         "--trace shows when each ran"
                                       : "summed",
                 "): prepare ", sec(t.prepare), ", block LDL ", sec(t.ldl), ", LDLQ / Viterbi ", sec(t.encode), ", packing ",
                 sec(t.finish)));
  return res;
}

}  // namespace trellm
