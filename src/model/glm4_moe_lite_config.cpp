// config.json for model_type "glm4_moe_lite". Every unsupported or inconsistent value is an error naming
// the field. Defaults for absent optional fields are transformers' Glm4MoeLiteConfig defaults.
#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "format/json_file.h"
#include "model/glm4_moe_lite.h"
#include "quant/trellis_weight.h"

namespace trellm {

Config Config::from_json_file(const std::string& path) {
  json j = read_json_file(path);
  JsonFields f(j, path);
  Config c;
  std::string model_type = f.get_str("model_type");
  if (model_type != "glm4_moe_lite")
    f.bad("model_type", "this model file implements \"glm4_moe_lite\" (GLM-4.7-Flash) only");

  auto positive = [&](const char* key) {
    int64_t v = f.get_int(key);
    if (v <= 0) f.bad(key, "must be a positive integer");
    return v;
  };
  c.vocab_size = positive("vocab_size");
  c.hidden_size = positive("hidden_size");
  c.intermediate_size = positive("intermediate_size");
  c.moe_intermediate_size = positive("moe_intermediate_size");
  c.num_hidden_layers = positive("num_hidden_layers");
  c.num_attention_heads = positive("num_attention_heads");
  c.num_key_value_heads = f.get_int("num_key_value_heads", c.num_attention_heads);
  c.n_routed_experts = positive("n_routed_experts");
  c.num_experts_per_tok = positive("num_experts_per_tok");
  c.kv_lora_rank = positive("kv_lora_rank");
  c.qk_rope_head_dim = positive("qk_rope_head_dim");
  c.qk_nope_head_dim = positive("qk_nope_head_dim");
  c.v_head_dim = positive("v_head_dim");
  c.n_shared_experts = f.get_int("n_shared_experts", 1);
  if (c.n_shared_experts < 0) f.bad("n_shared_experts", "must be >= 0");
  // q_lora_rank: null means a plain q_proj (no low-rank query path).
  if (!j.contains("q_lora_rank")) f.bad("q_lora_rank", "is required (an integer, or null for a plain q_proj)");
  c.q_lora_rank = f.has("q_lora_rank") ? f.get_int("q_lora_rank") : 0;
  if (c.q_lora_rank < 0) f.bad("q_lora_rank", "must be positive or null");
  c.routed_scaling_factor = f.get_num("routed_scaling_factor", 1.8);
  c.n_group = f.get_int("n_group", 1);
  c.topk_group = f.get_int("topk_group", 1);
  if (c.n_group <= 0 || c.n_routed_experts % c.n_group != 0)
    f.bad("n_group", str_cat("must divide n_routed_experts = ", c.n_routed_experts));
  if (c.n_group > 1 && c.n_routed_experts / c.n_group < 2)
    f.bad("n_group", "groups need at least 2 experts each (group score = sum of the top 2)");
  if (c.topk_group <= 0 || c.topk_group > c.n_group) f.bad("topk_group", str_cat("must be in 1..n_group = ", c.n_group));
  if (c.num_experts_per_tok > c.n_routed_experts / c.n_group * c.topk_group)
    f.bad("num_experts_per_tok", "is larger than the number of experts selectable");
  c.norm_topk_prob = f.get_bool("norm_topk_prob", true);
  std::string topk_method = f.get_str("topk_method", "noaux_tc");
  if (topk_method != "noaux_tc") f.bad("topk_method", "only \"noaux_tc\" (sigmoid + selection bias) is supported");
  std::string scoring = f.get_str("scoring_func", "sigmoid");
  if (scoring != "sigmoid") f.bad("scoring_func", "only \"sigmoid\" is supported");
  c.hidden_act = f.get_str("hidden_act", "silu");
  if (c.hidden_act != "silu") f.bad("hidden_act", "only \"silu\" is supported");
  c.max_position_embeddings = f.get_int("max_position_embeddings", 202752);
  if (c.max_position_embeddings <= 0) f.bad("max_position_embeddings", "must be positive");
  c.rms_norm_eps = f.get_num("rms_norm_eps", 1e-5);
  if (!(c.rms_norm_eps > 0)) f.bad("rms_norm_eps", "must be positive");
  c.rope_interleave = f.get_bool("rope_interleave", true);
  if (!c.rope_interleave) f.bad("rope_interleave", "only interleaved RoPE (true) is supported");
  c.attention_bias = f.get_bool("attention_bias", false);
  c.tie_word_embeddings = f.get_bool("tie_word_embeddings", false);
  if (c.qk_rope_head_dim % 2) f.bad("qk_rope_head_dim", "must be even");
  c.num_nextn_predict_layers = f.get_int("num_nextn_predict_layers", 0);

  // RoPE: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta and
  // rope_scaling at the top level. Only plain RoPE is implemented; YaRN and friends are refused.
  c.rope_theta = 10000.0;
  if (f.has("rope_parameters")) {
    JsonFields rp = f.sub("rope_parameters");
    std::string type = rp.get_str("rope_type", "default");
    if (type != "default") rp.bad("rope_type", "only \"default\" RoPE is supported");
    c.rope_theta = rp.get_num("rope_theta", f.get_num("rope_theta", 10000.0));
    double prf = rp.get_num("partial_rotary_factor", 1.0);
    if (prf != 1.0) rp.bad("partial_rotary_factor", "only 1.0 is supported");
  } else {
    c.rope_theta = f.get_num("rope_theta", 10000.0);
    if (f.has("rope_scaling")) f.bad("rope_scaling", "scaled RoPE is not supported");
  }
  if (!(c.rope_theta > 0)) f.bad("rope_theta", "must be positive");

  // Which layers are MoE: mlp_layer_types (what transformers 5 uses) wins; else first_k_dense_replace.
  if (f.has("mlp_layer_types")) {
    auto types = f.get_str_list("mlp_layer_types");
    if (int64_t(types.size()) != c.num_hidden_layers)
      f.bad("mlp_layer_types", str_cat("has ", types.size(), " entries for ", c.num_hidden_layers, " layers"));
    for (auto& t : types) {
      if (t != "dense" && t != "sparse") f.bad("mlp_layer_types", "entries must be \"dense\" or \"sparse\"");
      c.mlp_sparse.push_back(t == "sparse");
    }
    if (f.has("first_k_dense_replace")) {
      int64_t k = f.get_int("first_k_dense_replace");
      bool agree = true;
      for (int64_t i = 0; i < c.num_hidden_layers; i++) agree &= c.mlp_sparse[i] == (i >= k);
      if (!agree) log_warn(path, ": first_k_dense_replace disagrees with mlp_layer_types; using mlp_layer_types");
    }
  } else {
    int64_t k = f.get_int("first_k_dense_replace", 1);
    if (k < 0 || k > c.num_hidden_layers) f.bad("first_k_dense_replace", "must be in 0..num_hidden_layers");
    for (int64_t i = 0; i < c.num_hidden_layers; i++) c.mlp_sparse.push_back(i >= k);
  }

  if (f.has("eos_token_id")) c.eos_token_id = f.get_int_list("eos_token_id");
  c.pad_token_id = f.get_int("pad_token_id", -1);
  c.bos_token_id = f.get_int("bos_token_id", -1);
  for (int64_t e : c.eos_token_id)
    if (e < 0 || e >= c.vocab_size) f.bad("eos_token_id", "ids must lie in 0..vocab_size-1");

  // EXL3 (trellis) checkpoints carry quantization_config; anything else there is refused, naming the key.
  c.exl3 = trellis::exl3_config_from_model_config(j, path);
  return c;
}

MlaDims Config::mla() const {
  MlaDims d;
  d.heads = int(num_attention_heads);
  d.kv_rank = int(kv_lora_rank);
  d.rope_dim = int(qk_rope_head_dim);
  d.nope_dim = int(qk_nope_head_dim);
  d.v_dim = int(v_head_dim);
  d.scale = float(1.0 / std::sqrt(double(qk_head_dim())));
  return d;
}

MoeRouting Config::routing() const {
  MoeRouting r;
  r.n_experts = int(n_routed_experts);
  r.top_k = int(num_experts_per_tok);
  r.n_group = int(n_group);
  r.topk_group = int(topk_group);
  r.norm_topk_prob = norm_topk_prob;
  r.routed_scaling_factor = float(routed_scaling_factor);
  return r;
}

RopeParams Config::rope() const {
  RopeParams p;
  p.theta = float(rope_theta);
  p.dim = int(qk_rope_head_dim);
  return p;
}

}  // namespace trellm
