// trellm inspect DIR: what a checkpoint holds, without loading it for inference.
#include <cstdio>
#include <filesystem>
#include <map>

#include "common.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"

namespace trellm::cli {

namespace {

std::string human(double bytes) {
  const char* u[] = {"B", "KB", "MB", "GB", "TB"};
  int i = 0;
  while (bytes >= 1000 && i < 4) bytes /= 1000, i++;
  char b[32];
  std::snprintf(b, sizeof b, i ? "%.2f %s" : "%.0f %s", bytes, u[i]);
  return b;
}
std::string count(double n) {
  char b[32];
  if (n >= 1e9) std::snprintf(b, sizeof b, "%.3f B", n / 1e9);
  else if (n >= 1e6) std::snprintf(b, sizeof b, "%.3f M", n / 1e6);
  else std::snprintf(b, sizeof b, "%.0f", n);
  return b;
}

// Which part of the model a tensor belongs to, for the parameter table.
std::string part_of(const std::string& name, const Config& c) {
  if (name.rfind("model.layers.", 0) == 0) {
    int layer = std::atoi(name.c_str() + 13);
    if (layer >= c.num_hidden_layers) return "mtp";
    if (name.find(".self_attn.") != std::string::npos) return "attention";
    if (name.find(".mlp.shared_experts.") != std::string::npos) return "shared expert";
    if (name.find(".mlp.experts.") != std::string::npos) return "routed experts";
    if (name.find(".mlp.gate.") != std::string::npos) return "router";
    if (name.find(".mlp.") != std::string::npos) return "dense mlp";
    return "norms";
  }
  if (name == "model.embed_tokens.weight") return "embedding";
  if (name.rfind("lm_head", 0) == 0) return "lm_head";
  return "norms";
}

int run_inspect(const std::string& dir) {
  Config c = Config::from_json_file((std::filesystem::path(dir) / "config.json").string());
  TensorStore store = TensorStore::open(dir);
  std::printf("%s\n", dir.c_str());
  std::printf("  architecture      glm4_moe_lite (GLM-4.7-Flash family)\n");
  std::printf("  layers            %lld (%lld dense MLP, %lld MoE) + %lld MTP\n", (long long)c.num_hidden_layers,
              (long long)std::count(c.mlp_sparse.begin(), c.mlp_sparse.end(), false),
              (long long)std::count(c.mlp_sparse.begin(), c.mlp_sparse.end(), true), (long long)c.num_nextn_predict_layers);
  std::printf("  hidden            %lld, vocab %lld\n", (long long)c.hidden_size, (long long)c.vocab_size);
  std::printf("  attention (MLA)   %lld heads, q_lora %lld, kv_lora %lld, qk nope %lld + rope %lld, v %lld\n",
              (long long)c.num_attention_heads, (long long)c.q_lora_rank, (long long)c.kv_lora_rank,
              (long long)c.qk_nope_head_dim, (long long)c.qk_rope_head_dim, (long long)c.v_head_dim);
  std::printf("  MoE               %lld routed (top-%lld) + %lld shared, expert intermediate %lld, scaling %.3g\n",
              (long long)c.n_routed_experts, (long long)c.num_experts_per_tok, (long long)c.n_shared_experts,
              (long long)c.moe_intermediate_size, c.routed_scaling_factor);
  std::printf("  rope theta        %.6g, max positions %lld\n", c.rope_theta, (long long)c.max_position_embeddings);
  std::printf("  latent KV cache   %lld values per token per layer (%s per token in bf16)\n",
              (long long)(c.kv_lora_rank + c.qk_rope_head_dim),
              human(double(c.kv_lora_rank + c.qk_rope_head_dim) * 2 * c.num_hidden_layers).c_str());

  std::map<std::string, std::pair<int, size_t>> by_dtype;
  std::map<std::string, std::pair<double, double>> by_part;  // params, bytes
  for (const auto& name : store.names()) {
    const TensorInfo& t = store.get(name);
    by_dtype[std::string(dtype_name(t.dtype))].first++;
    by_dtype[std::string(dtype_name(t.dtype))].second += t.nbytes;
    auto& p = by_part[part_of(name, c)];
    p.first += double(t.numel());
    p.second += double(t.nbytes);
  }
  std::printf("\n  tensors by dtype\n");
  for (auto& [dt, v] : by_dtype) std::printf("    %-6s %6d tensors  %s\n", dt.c_str(), v.first, human(double(v.second)).c_str());

  double total = 0, total_bytes = 0, active = 0, active_bytes = 0;
  std::printf("\n  parameters by part            params          bytes   read per token\n");
  for (auto& [part, v] : by_part) {
    // Per decoded token: top_k of the routed experts; one embedding row; nothing of the MTP layer.
    double frac = part == "routed experts" ? double(c.num_experts_per_tok) / double(c.n_routed_experts)
                  : part == "embedding"    ? 1.0 / double(c.vocab_size)
                  : part == "mtp"          ? 0.0
                                           : 1.0;
    if (part == "embedding" && c.tie_word_embeddings) frac = 1.0;  // it is the lm_head too
    std::printf("    %-20s %14s %14s %14s\n", part.c_str(), count(v.first).c_str(), human(v.second).c_str(),
                count(v.first * frac).c_str());
    total += v.first;
    total_bytes += v.second;
    active += v.first * frac;
    active_bytes += v.second * frac;
  }
  std::printf("    %-20s %14s %14s %14s\n", "total", count(total).c_str(), human(total_bytes).c_str(), count(active).c_str());
  std::printf("\n  weight bytes read per decoded token: %s\n", human(active_bytes).c_str());
  return 0;
}

}  // namespace

void add_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Summarise a checkpoint: config, tensors by dtype, parameters per part");
  static std::string dir;
  cmd->add_option("dir", dir, "Model directory (config.json + safetensors)")->required();
  cmd->callback([] { std::exit(run_inspect(dir)); });
}

}  // namespace trellm::cli
