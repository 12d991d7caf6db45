// Loading GLM-4.7-Flash weights. One name table drives loading and checks every tensor's name, dtype and
// shape; small vectors (norms, biases) become f32 copies, matrices stay in their checkpoint dtype (used in
// place from the mapping on the CPU, uploaded once on a GPU).
#include <algorithm>
#include <filesystem>
#include <set>
#include <string_view>

#include "core/error.h"
#include "core/half.h"
#include "core/log.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "quant/trellis_weight.h"

namespace trellm {

namespace {

struct Loader {
  const TensorStore& store;
  Backend& backend;
  Arena& arena;
  std::vector<std::unique_ptr<trellis::TrellisWeight>>& exl3;
  std::vector<std::string> names;  // sorted, for prefix ranges
  std::set<std::string> used;
  int dense_linears = 0, trellis_linears = 0;

  // Copies host bytes to the backend (no copy on a host backend).
  const void* place(const void* host, size_t bytes) {
    if (backend.host_memory()) return host;
    void* p = arena.alloc(bytes);
    backend.from_host(p, host, bytes);
    return p;
  }

  const TensorInfo& find(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorInfo& t = store.get(name);
    if (!dtype_is_float(t.dtype))
      fail(*t.file, ": tensor \"", name, "\" has dtype ", dtype_name(t.dtype), "; expected BF16, F16 or F32");
    if (t.shape != shape) {
      TensorView want(nullptr, t.dtype, {});
      want.ndim = int(shape.size());
      for (size_t i = 0; i < shape.size(); i++) want.shape[i] = shape[i];
      fail(*t.file, ": tensor \"", name, "\" has shape ", shape_str(t.view()), "; the config implies ", shape_str(want));
    }
    used.insert(name);
    return t;
  }

  // A matrix used as stored: in place on a host backend, else one upload.
  TensorView matrix(const TensorInfo& t) {
    TensorView v = t.view();
    if (backend.host_memory()) return v;
    void* p = arena.alloc(t.nbytes);
    backend.from_host(p, t.data, t.nbytes);
    v.data = p;
    return v;
  }
  TensorView matrix(const std::string& name, std::vector<int64_t> shape) { return matrix(find(name, shape)); }

  // A small vector, converted to f32.
  TensorView vec(const std::string& name, int64_t n) {
    const TensorInfo& t = find(name, {n});
    std::vector<float> f(static_cast<size_t>(n));
    TensorView v = t.view();
    for (int64_t i = 0; i < n; i++) {
      switch (t.dtype) {
        case DType::F32: f[i] = v.ptr<float>()[i]; break;
        case DType::F16: f[i] = f16_to_f32(v.ptr<uint16_t>()[i]); break;
        default: f[i] = bf16_to_f32(v.ptr<uint16_t>()[i]); break;
      }
    }
    void* p = arena.alloc(size_t(n) * 4);
    backend.from_host(p, f.data(), size_t(n) * 4);
    return TensorView(p, DType::F32, {n});
  }

  Linear linear(const std::string& prefix, int64_t out, int64_t in) {
    Linear l;
    l.in = in;
    l.out = out;
    if (store.contains(prefix + ".weight")) {
      l.weight = matrix(prefix + ".weight", {out, in});
      if (store.contains(prefix + ".bias")) l.bias = vec(prefix + ".bias", out);
      dense_linears++;
    } else if (store.contains(prefix + ".trellis")) {
      l.exl3 = trellis_linear(prefix, in, out, l.bias);
      trellis_linears++;
    } else {
      fail(store.path(), ": tensor \"", prefix, ".weight\" is missing");
    }
    return l;
  }

  // An EXL3 Linear: validated by the trellis reader, codes and channel scales placed on the backend. The
  // bias becomes the Linear's f32 bias, so dense and trellis layers add it the same way.
  const trellis::TrellisWeight* trellis_linear(const std::string& key, int64_t in, int64_t out, TensorView& bias) {
    auto lo = std::lower_bound(names.begin(), names.end(), key + ".");
    std::vector<std::string> under;
    for (auto it = lo; it != names.end() && it->compare(0, key.size() + 1, key + ".") == 0; ++it) under.push_back(*it);
    trellis::TensorFinder finder = [&](const std::string& n) -> std::optional<TensorView> {
      const TensorInfo* t = store.find(n);
      if (!t) return std::nullopt;
      return t->view();
    };
    auto w = std::make_unique<trellis::TrellisWeight>(trellis::read_trellis_weight(key, finder, in, out, &under));
    for (auto& n : under) used.insert(n);
    if (w->has_bias()) {
      std::vector<float> b(static_cast<size_t>(out));
      for (int64_t i = 0; i < out; i++) b[i] = cpu_value(w->bias, i);
      void* p = arena.alloc(size_t(out) * 4);
      backend.from_host(p, b.data(), size_t(out) * 4);
      bias = TensorView(p, DType::F32, {out});
      w->bias = TensorView();
    }
    const size_t u16 = sizeof(uint16_t);
    w->trellis = static_cast<const uint16_t*>(place(w->trellis, size_t(w->trellis_bytes())));
    w->suh = static_cast<const uint16_t*>(place(w->suh, size_t(w->in_padded) * u16));
    w->svh = static_cast<const uint16_t*>(place(w->svh, size_t(w->out_padded) * u16));
    exl3.push_back(std::move(w));
    return exl3.back().get();
  }

  // One decoder layer under `p` ("model.layers.<i>."): the table shared by the main layers and the MTP layer.
  void layer(LayerWeights& lw, const std::string& p, const Config& c, bool sparse, const std::string& dir) {
    const int64_t hid = c.hidden_size, H = c.num_attention_heads, qk = c.qk_head_dim();
    lw.input_layernorm = vec(p + "input_layernorm.weight", hid);
    lw.post_attention_layernorm = vec(p + "post_attention_layernorm.weight", hid);
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank > 0) {
      lw.q_a_proj = linear(a + "q_a_proj", c.q_lora_rank, hid);
      lw.q_a_layernorm = vec(a + "q_a_layernorm.weight", c.q_lora_rank);
      lw.q_b_proj = linear(a + "q_b_proj", H * qk, c.q_lora_rank);
    } else {
      lw.q_proj = linear(a + "q_proj", H * qk, hid);
    }
    lw.kv_a_proj_with_mqa = linear(a + "kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, hid);
    lw.kv_a_layernorm = vec(a + "kv_a_layernorm.weight", c.kv_lora_rank);
    lw.kv_b_proj = linear(a + "kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    lw.o_proj = linear(a + "o_proj", hid, H * c.v_head_dim);

    const std::string mp = p + "mlp.";
    if (!sparse) {
      lw.mlp.gate_proj = linear(mp + "gate_proj", c.intermediate_size, hid);
      lw.mlp.up_proj = linear(mp + "up_proj", c.intermediate_size, hid);
      lw.mlp.down_proj = linear(mp + "down_proj", hid, c.intermediate_size);
      return;
    }
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
    lw.gate = matrix(mp + "gate.weight", {E, hid});
    lw.e_score_correction_bias = vec(mp + "gate.e_score_correction_bias", E);
    lw.experts.resize(size_t(E));
    if (store.contains(mp + "experts.gate_up_proj")) {
      // transformers 5 in-memory layout: gate_up_proj [E, 2I, hidden] (gate rows first), down_proj [E, hidden, I].
      if (!fused_logged) log_info(dir, ": experts stored fused (3-D gate_up_proj / down_proj)");
      fused_logged = true;
      TensorView gu = matrix(mp + "experts.gate_up_proj", {E, 2 * I, hid});
      TensorView dn = matrix(mp + "experts.down_proj", {E, hid, I});
      for (int64_t e = 0; e < E; e++) {
        TensorView g = gu[e];
        Expert& ex = lw.experts[e];
        ex.gate.in = ex.up.in = hid;
        ex.gate.out = ex.up.out = I;
        ex.gate.weight = TensorView(g.data, g.dtype, {I, hid});
        ex.up.weight = TensorView(static_cast<char*>(g.data) + I * hid * dtype_size(g.dtype), g.dtype, {I, hid});
        ex.down.in = I;
        ex.down.out = hid;
        ex.down.weight = dn[e];
      }
    } else {
      for (int64_t e = 0; e < E; e++) {
        const std::string ep = mp + "experts." + std::to_string(e) + ".";
        lw.experts[e].gate = linear(ep + "gate_proj", I, hid);
        lw.experts[e].up = linear(ep + "up_proj", I, hid);
        lw.experts[e].down = linear(ep + "down_proj", hid, I);
      }
    }
    if (c.n_shared_experts > 0) {
      const int64_t SI = I * c.n_shared_experts;
      lw.shared.gate = linear(mp + "shared_experts.gate_proj", SI, hid);
      lw.shared.up = linear(mp + "shared_experts.up_proj", SI, hid);
      lw.shared.down = linear(mp + "shared_experts.down_proj", hid, SI);
    }
  }
  bool fused_logged = false;

  static float cpu_value(const TensorView& t, int64_t i) {
    switch (t.dtype) {
      case DType::F32: return t.ptr<float>()[i];
      case DType::F16: return f16_to_f32(t.ptr<uint16_t>()[i]);
      default: return bf16_to_f32(t.ptr<uint16_t>()[i]);
    }
  }
};


// Whether any tensor name starts with `prefix` (names are sorted).
bool has_prefix(const std::vector<std::string>& names, const std::string& prefix) {
  auto it = std::lower_bound(names.begin(), names.end(), prefix);
  return it != names.end() && it->compare(0, prefix.size(), prefix) == 0;
}

// The MTP layers (model.layers.<num_hidden_layers + k>.*), through the same table as the decoder layers plus
// enorm, hnorm, eh_proj and shared_head. Absent altogether: the model runs without them. Present: every tensor
// is required and checked (name, dtype, shape), bf16/f16/f32 or EXL3 like any Linear.
void load_mtp(Loader& L, const Config& c, Weights& w, const std::string& dir) {
  if (c.num_nextn_predict_layers <= 0) return;  // tensors there, if any, are reported below as unused
  const int64_t hid = c.hidden_size;
  for (int64_t k = 0; k < c.num_nextn_predict_layers; k++) {
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
    if (!has_prefix(L.names, p)) {
      if (k == 0)
        log_info(dir, ": config.json has num_nextn_predict_layers ", c.num_nextn_predict_layers,
                 " but the checkpoint holds no MTP tensors (", p, "*); running without the MTP layer");
      else
        fail(dir, ": num_nextn_predict_layers is ", c.num_nextn_predict_layers, " but only ", k,
             " MTP layer(s) are stored (no tensor under \"", p, "\")");
      return;
    }
    MtpWeights& m = w.mtp.emplace_back();
    m.enorm = L.vec(p + "enorm.weight", hid);
    m.hnorm = L.vec(p + "hnorm.weight", hid);
    m.eh_proj = L.linear(p + "eh_proj", hid, 2 * hid);
    // The released MTP layers are MoE; a dense one (mlp.gate_proj, no router) is read as such.
    m.sparse = !L.store.contains(p + "mlp.gate_proj.weight") && !L.store.contains(p + "mlp.gate_proj.trellis");
    if (m.sparse && c.n_routed_experts <= 0) fail(dir, ": MTP layer ", p, "* has no dense MLP and the model has no experts");
    L.layer(m.layer, p, c, m.sparse, dir);
    m.shared_head_norm = L.vec(p + "shared_head.norm.weight", hid);
    m.shared_head = L.linear(p + "shared_head.head", c.vocab_size, hid);
    if (L.store.contains(p + "embed_tokens.weight")) m.embed_tokens = L.matrix(p + "embed_tokens.weight", {c.vocab_size, hid});
  }
}

// Every tensor through the name table (the decoder layers only when `layers`, the MTP layers then with `mtp`).
void load_weights(Loader& L, const Config& c, Weights& w, const std::string& dir, bool layers, bool mtp) {
  const int64_t hid = c.hidden_size;
  w.embed_tokens = L.matrix("model.embed_tokens.weight", {c.vocab_size, hid});
  w.norm = L.vec("model.norm.weight", hid);
  if (c.tie_word_embeddings) {
    w.lm_head.in = hid;
    w.lm_head.out = c.vocab_size;
    w.lm_head.weight = w.embed_tokens;
  } else {
    w.lm_head = L.linear("lm_head", c.vocab_size, hid);
  }

  w.layers.resize(size_t(c.num_hidden_layers));
  if (!layers) {  // Model::load_layer, one at a time
    if (mtp) load_mtp(L, c, w, dir);
    return;
  }
  for (int64_t i = 0; i < c.num_hidden_layers; i++)
    L.layer(w.layers[i], "model.layers." + std::to_string(i) + ".", c, c.mlp_sparse[i], dir);
  load_mtp(L, c, w, dir);
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& dir, Backend& backend, const LoadOptions& opt) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) fail(dir, ": not a model directory");
  std::unique_ptr<Model> m(new Model());
  m->backend_ = &backend;
  m->arena_.set_backend(&backend);
  m->config_ = Config::from_json_file((fs::path(dir) / "config.json").string());
  m->store_ = std::make_unique<TensorStore>(TensorStore::open(dir));
  const Config& c = m->config_;
  Loader L{*m->store_, backend, m->arena_, m->exl3_, m->store_->names(), {}};
  Weights& w = m->w_;

  try {
    load_weights(L, c, w, dir, opt.layers, opt.mtp);
  } catch (const Error& e) {
    // Out of GPU memory: say how much of the checkpoint was placed, so the user can size the GPU or the bits.
    if (backend.host_memory() || std::string_view(e.what()).find("out of GPU memory") == std::string_view::npos) throw;
    fail(dir, ": the weights do not fit on ", backend.name(), ": ", m->arena_.used() >> 20, " MiB placed of a ",
         m->store_->total_bytes() >> 20, " MiB checkpoint when ", e.what(),
         "; quantize to fewer bits (trellm quantize), free the GPU, or use --device cpu");
  }

  if (!opt.layers) return m;  // the layers' tensors come with load_layer
  // Tensors the table did not consume: MTP layers the config does not announce are expected (and unused);
  // anything else is reported.
  std::vector<std::string> unknown;
  int mtp_unused = 0;
  const std::string mtp_prefix = "model.layers." + std::to_string(c.num_hidden_layers) + ".";
  for (const std::string& name : L.store.names()) {
    if (L.used.count(name)) continue;
    if (w.mtp.empty() && name.rfind(mtp_prefix, 0) == 0) {
      mtp_unused++;
      continue;
    }
    unknown.push_back(name);
  }
  if (mtp_unused)
    log_debug(dir, ": ", mtp_unused, " MTP-layer tensors (", mtp_prefix, "*) not loaded: num_nextn_predict_layers is 0");
  if (!w.mtp.empty()) log_debug(dir, ": ", w.mtp.size(), " MTP layer(s) loaded");
  log_debug(dir, ": ", L.dense_linears, " dense and ", L.trellis_linears, " trellis-coded (EXL3) linear layers");
  if (!unknown.empty())
    log_warn(dir, ": ", unknown.size(), " tensors not used by glm4_moe_lite, e.g. \"", unknown[0], "\"");
  return m;
}

void Model::load_layer(int64_t l, const TensorStore& store) {
  const Config& c = config_;
  TRELLM_ASSERT(l >= 0 && l < c.num_hidden_layers, "layer ", l, " of ", c.num_hidden_layers);
  release_layer(l);
  auto mem = std::make_unique<LayerMemory>(backend_);
  Loader L{store, *backend_, mem->arena, mem->exl3, store.names(), {}};
  try {
    L.layer(w_.layers[size_t(l)], "model.layers." + std::to_string(l) + ".", c, c.mlp_sparse[size_t(l)], store.path());
  } catch (...) {
    w_.layers[size_t(l)] = LayerWeights{};
    throw;
  }
  layer_memory_[l] = std::move(mem);
}

void Model::release_layer(int64_t l) {
  TRELLM_ASSERT(l >= 0 && l < config_.num_hidden_layers, "layer ", l, " of ", config_.num_hidden_layers);
  auto it = layer_memory_.find(l);
  if (it == layer_memory_.end()) return;
  backend_->synchronize();  // no kernel may still read them
  backend_->forget_weights();
  w_.layers[size_t(l)] = LayerWeights{};
  layer_memory_.erase(it);
}

}  // namespace trellm
