// Writing a model's current weights as a checkpoint directory (config.json, safetensors shards + index): dense
// tensors as they are, trellis-coded Linears as EXL3 tensors (.trellis/.suh/.svh + codebook marker). Used to
// put a synthetic full-size model on disk, so loading speed can be measured without a download.
#include <filesystem>
#include <deque>
#include <fstream>
#include <map>

#include "core/error.h"
#include "format/json_file.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"

namespace trellm {

namespace {

struct Saver {
  Backend& be;
  std::deque<std::vector<uint8_t>> host;  // stable storage for one shard's data
  std::vector<TensorToWrite> shard;
  size_t shard_bytes = 0;
  int shard_index = 0;
  std::map<std::string, std::string> weight_map;
  std::string dir;
  static constexpr size_t kShardBytes = size_t(4) << 30;

  void add(const std::string& name, const void* dev, DType t, std::vector<int64_t> shape, size_t nbytes) {
    if (shard_bytes + nbytes > kShardBytes && !shard.empty()) flush();
    auto& h = host.emplace_back(nbytes);
    be.to_host(h.data(), dev, nbytes);
    shard.push_back({name, t, std::move(shape), h.data(), nbytes});
    shard_bytes += nbytes;
  }
  void add(const std::string& name, TensorView v) {
    std::vector<int64_t> shape(v.shape.begin(), v.shape.begin() + v.ndim);
    add(name, v.data, v.dtype, shape, v.nbytes());
  }
  void linear(const std::string& key, const Linear& l) {
    if (!l.bias.empty()) add(key + ".bias", l.bias);
    if (!l.exl3) return add(key + ".weight", l.weight);
    const trellis::TrellisWeight& w = *l.exl3;
    add(key + ".trellis", w.trellis, DType::I16, {w.in_padded / 16, w.out_padded / 16, 16 * w.K}, size_t(w.trellis_bytes()));
    add(key + ".suh", w.suh, DType::F16, {w.in_padded}, size_t(w.in_padded) * 2);
    add(key + ".svh", w.svh, DType::F16, {w.out_padded}, size_t(w.out_padded) * 2);
    if (w.codebook != trellis::Codebook::Inst3) {
      static const int32_t mcg = int32_t(trellis::kMcgMul), mul1 = int32_t(trellis::kMul1Mul);
      const bool is_mcg = w.codebook == trellis::Codebook::Mcg;
      shard.push_back({key + (is_mcg ? ".mcg" : ".mul1"), DType::I32, {}, is_mcg ? &mcg : &mul1, 4});
    }
  }
  void flush() {
    const std::string name = "model-" + std::to_string(++shard_index) + ".safetensors";
    write_safetensors(dir + "/" + name, shard, {{"format", "pt"}});
    for (auto& t : shard) weight_map[t.name] = name;
    shard.clear();
    host.clear();
    shard_bytes = 0;
  }
};

// One decoder layer's tensors under `p` ("model.layers.<i>."), the loader's names; Linears go through `linear`.
template <typename LinearFn>
void save_layer(Saver& s, const std::string& p, const LayerWeights& L, const Config& c, bool sparse, LinearFn&& linear) {
  s.add(p + "input_layernorm.weight", L.input_layernorm);
  s.add(p + "post_attention_layernorm.weight", L.post_attention_layernorm);
  const std::string a = p + "self_attn.";
  std::vector<std::pair<std::string, const Linear*>> lin;
  if (c.q_lora_rank > 0) {
    lin.insert(lin.end(), {{a + "q_a_proj", &L.q_a_proj}, {a + "q_b_proj", &L.q_b_proj}});
    s.add(a + "q_a_layernorm.weight", L.q_a_layernorm);
  } else {
    lin.push_back({a + "q_proj", &L.q_proj});
  }
  lin.insert(lin.end(), {{a + "kv_a_proj_with_mqa", &L.kv_a_proj_with_mqa}, {a + "kv_b_proj", &L.kv_b_proj}, {a + "o_proj", &L.o_proj}});
  s.add(a + "kv_a_layernorm.weight", L.kv_a_layernorm);
  const std::string m = p + "mlp.";
  if (!sparse) {
    lin.insert(lin.end(), {{m + "gate_proj", &L.mlp.gate_proj}, {m + "up_proj", &L.mlp.up_proj}, {m + "down_proj", &L.mlp.down_proj}});
  } else {
    s.add(m + "gate.weight", L.gate);
    s.add(m + "gate.e_score_correction_bias", L.e_score_correction_bias);
    for (size_t e = 0; e < L.experts.size(); e++) {
      const std::string ep = m + "experts." + std::to_string(e) + ".";
      lin.insert(lin.end(), {{ep + "gate_proj", &L.experts[e].gate}, {ep + "up_proj", &L.experts[e].up}, {ep + "down_proj", &L.experts[e].down}});
    }
    if (c.n_shared_experts > 0)
      lin.insert(lin.end(), {{m + "shared_experts.gate_proj", &L.shared.gate}, {m + "shared_experts.up_proj", &L.shared.up},
                             {m + "shared_experts.down_proj", &L.shared.down}});
  }
  for (auto& [key, l] : lin) linear(key, *l);
}

json config_json(const Config& c, int64_t mtp_layers) {
  json j = {{"architectures", {"Glm4MoeLiteForCausalLM"}}, {"model_type", "glm4_moe_lite"},
            {"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
            {"moe_intermediate_size", c.moe_intermediate_size}, {"num_hidden_layers", c.num_hidden_layers},
            {"num_attention_heads", c.num_attention_heads}, {"num_key_value_heads", c.num_key_value_heads},
            {"n_shared_experts", c.n_shared_experts}, {"n_routed_experts", c.n_routed_experts},
            {"routed_scaling_factor", c.routed_scaling_factor}, {"kv_lora_rank", c.kv_lora_rank},
            {"qk_rope_head_dim", c.qk_rope_head_dim}, {"qk_nope_head_dim", c.qk_nope_head_dim},
            {"v_head_dim", c.v_head_dim}, {"n_group", c.n_group}, {"topk_group", c.topk_group},
            {"num_experts_per_tok", c.num_experts_per_tok}, {"norm_topk_prob", c.norm_topk_prob},
            {"hidden_act", c.hidden_act}, {"max_position_embeddings", c.max_position_embeddings},
            {"rms_norm_eps", c.rms_norm_eps}, {"rope_interleave", c.rope_interleave},
            {"attention_bias", c.attention_bias}, {"tie_word_embeddings", c.tie_word_embeddings},
            {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", c.rope_theta}}},
            {"eos_token_id", c.eos_token_id}, {"pad_token_id", c.pad_token_id},
            {"num_nextn_predict_layers", mtp_layers}};
  j["q_lora_rank"] = c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
  json types = json::array();
  for (bool sp : c.mlp_sparse) types.push_back(sp ? "sparse" : "dense");
  j["mlp_layer_types"] = types;
  return j;
}

}  // namespace

void Model::save(const std::string& dir) const {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  const Config& c = config_;
  Saver s{*backend_, {}, {}, 0, 0, {}, dir};
  s.add("model.embed_tokens.weight", w_.embed_tokens);
  s.add("model.norm.weight", w_.norm);
  if (!c.tie_word_embeddings) s.linear("lm_head", w_.lm_head);
  int trellis_linears = 0, bits_sum = 0, head_bits = 0;
  auto linear = [&](const std::string& key, const Linear& l) {
    s.linear(key, l);
    if (l.exl3) trellis_linears++, bits_sum += l.exl3->K;
  };
  for (size_t i = 0; i < w_.layers.size(); i++)
    save_layer(s, "model.layers." + std::to_string(i) + ".", w_.layers[i], c, c.mlp_sparse[i], linear);
  // The MTP layers after the decoder layers, named as GLM-4.7-Flash / DeepSeek-V3 checkpoints name them. Their
  // Linears do not count in quantization_config's average (the quantizer leaves them as they are).
  auto mtp_linear = [&](const std::string& key, const Linear& l) { s.linear(key, l); };
  for (size_t k = 0; k < w_.mtp.size(); k++) {
    const MtpWeights& m = w_.mtp[k];
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + int64_t(k)) + ".";
    s.add(p + "enorm.weight", m.enorm);
    s.add(p + "hnorm.weight", m.hnorm);
    s.linear(p + "eh_proj", m.eh_proj);
    save_layer(s, p, m.layer, c, m.sparse, mtp_linear);
    s.add(p + "shared_head.norm.weight", m.shared_head_norm);
    s.linear(p + "shared_head.head", m.shared_head);
    if (!m.embed_tokens.empty()) s.add(p + "embed_tokens.weight", m.embed_tokens);
  }
  s.flush();
  json idx = {{"metadata", json::object()}, {"weight_map", s.weight_map}};
  std::ofstream(dir + "/model.safetensors.index.json") << idx.dump(1);
  json cfg = config_json(c, int64_t(w_.mtp.size()));  // the MTP layers written, not the config's claim
  if (trellis_linears) {
    if (w_.lm_head.exl3) head_bits = w_.lm_head.exl3->K;
    cfg["quantization_config"] = {{"quant_method", "exl3"}, {"version", "trellm-synthetic"},
                                  {"bits", double(bits_sum) / trellis_linears}, {"head_bits", head_bits},
                                  {"calibration", {{"rows", 0}, {"cols", 0}}}, {"out_scales", "always"}};
  }
  std::ofstream(dir + "/config.json") << cfg.dump(1);
}

}  // namespace trellm
