// trellm inspect DIR: what a checkpoint holds, without loading it for inference. For EXL3 checkpoints also
// the trellis-coded Linears: K and codebook per part, the real bits per weight and the bytes a decoded token reads.
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "common.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"
#include "model/glm4_moe_lite_quantize.h"
#include "quant/trellis_weight.h"

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
    // The MTP layer(s) after the decoder layers, split like a decoder layer plus their own projection and head.
    const std::string mtp = layer >= c.num_hidden_layers ? "mtp " : "";
    if (name.find(".self_attn.") != std::string::npos) return mtp + "attention";
    if (name.find(".mlp.shared_experts.") != std::string::npos) return mtp + "shared expert";
    if (name.find(".mlp.experts.") != std::string::npos) return mtp + "routed experts";
    if (name.find(".mlp.gate.") != std::string::npos) return mtp + "router";
    if (name.find(".mlp.") != std::string::npos) return mtp + "dense mlp";
    if (!mtp.empty() && name.find(".eh_proj.") != std::string::npos) return "mtp eh_proj";
    if (!mtp.empty() && name.find(".shared_head.head.") != std::string::npos) return "mtp shared_head";
    if (!mtp.empty() && name.find(".embed_tokens.") != std::string::npos) return "mtp embedding";
    return mtp + "norms";
  }
  if (name == "model.embed_tokens.weight") return "embedding";
  if (name.rfind("lm_head", 0) == 0) return "lm_head";
  return "norms";
}

// Fraction of a part's weights a decoded token reads: top_k of the routed experts, one embedding row (all of
// it when tied: it is the lm_head too), nothing of the MTP layer (it runs only when drafting).
double read_fraction(const std::string& part, const Config& c) {
  if (part.rfind("mtp", 0) == 0) return 0.0;
  if (part == "routed experts") return double(c.num_experts_per_tok) / double(c.n_routed_experts);
  if (part == "embedding") return c.tie_word_embeddings ? 1.0 : 1.0 / double(c.vocab_size);
  return 1.0;
}

struct QLinear {
  LinearSpec spec;
  int K = 0;
  trellis::Codebook cb{};
  double bytes = 0;  // every tensor of the module
};

int run_inspect(const std::string& dir, bool list_tensors) {
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
  if (c.exl3) {
    const trellis::Exl3QuantConfig& q = *c.exl3;
    std::printf("  quantization      EXL3 (%s): %.4g bpw, head %d bits, codebook %s, out_scales %s, calibration %lld x %lld\n",
                q.version.empty() ? "no version" : q.version.c_str(), q.bits, q.head_bits,
                q.codebook ? trellis::codebook_name(*q.codebook) : "-", q.out_scales.empty() ? "-" : q.out_scales.c_str(),
                (long long)q.calibration_rows, (long long)q.calibration_cols);
  }

  // The trellis-coded Linears (read and validated like the loader does).
  trellis::TrellisReader reader(store);
  std::map<std::string, QLinear> qlin;  // by module key
  std::vector<LinearSpec> all_linears = linear_specs(c);
  for (LinearSpec& s : mtp_linear_specs(c)) all_linears.push_back(std::move(s));
  for (const LinearSpec& s : all_linears) {
    if (!reader.contains(s.key)) continue;
    const trellis::TrellisWeight w = reader.read(s.key, s.in, s.out);
    QLinear q{s, w.K, w.codebook, 0};
    qlin.emplace(s.key, q);
  }

  std::map<std::string, std::pair<int, size_t>> by_dtype;
  std::map<std::string, std::pair<double, double>> by_part;  // params, bytes
  for (const auto& name : store.names()) {
    const TensorInfo& t = store.get(name);
    by_dtype[std::string(dtype_name(t.dtype))].first++;
    by_dtype[std::string(dtype_name(t.dtype))].second += t.nbytes;
    auto& p = by_part[part_of(name, c)];
    const size_t dot = name.rfind('.');
    auto q = dot == std::string::npos ? qlin.end() : qlin.find(name.substr(0, dot));
    if (q != qlin.end()) {
      q->second.bytes += double(t.nbytes);
      if (name.compare(dot, std::string::npos, ".trellis") == 0) p.first += double(q->second.spec.in * q->second.spec.out);
    } else {
      p.first += double(t.numel());
    }
    p.second += double(t.nbytes);
  }
  std::printf("\n  tensors by dtype\n");
  for (auto& [dt, v] : by_dtype) std::printf("    %-6s %6d tensors  %s\n", dt.c_str(), v.first, human(double(v.second)).c_str());

  double total = 0, total_bytes = 0, active = 0, active_bytes = 0;
  std::printf("\n  parameters by part            params          bytes   read per token\n");
  for (auto& [part, v] : by_part) {
    const double frac = read_fraction(part, c);
    std::printf("    %-20s %14s %14s %14s\n", part.c_str(), count(v.first).c_str(), human(v.second).c_str(),
                count(v.first * frac).c_str());
    total += v.first;
    total_bytes += v.second;
    active += v.first * frac;
    active_bytes += v.second * frac;
  }
  std::printf("    %-20s %14s %14s %14s\n", "total", count(total).c_str(), human(total_bytes).c_str(), count(active).c_str());

  // The MTP layers: what the loader reads as MtpWeights (glm4_moe_lite_load.cpp), by the same names.
  for (int64_t k = 0; k < c.num_nextn_predict_layers; k++) {
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
    double params = 0, bytes = 0;
    int tensors = 0;
    std::map<std::string, int> dtypes;
    for (const auto& name : store.names()) {
      if (name.rfind(p, 0) != 0) continue;
      const TensorInfo& t = store.get(name);
      tensors++, bytes += double(t.nbytes), dtypes[std::string(dtype_name(t.dtype))]++;
      const size_t dot = name.rfind('.');
      auto q = qlin.find(name.substr(0, dot));
      if (q == qlin.end()) params += double(t.numel());
      else if (name.compare(dot, std::string::npos, ".trellis") == 0) params += double(q->second.spec.in * q->second.spec.out);
    }
    if (!tensors) {
      std::printf("\n  %-18sabsent (no %s* tensors): the model runs without it\n", str_cat("MTP layer ", k).c_str(), p.c_str());
      continue;
    }
    std::string dts;
    for (auto& [dt, n] : dtypes) dts += str_cat(dts.empty() ? "" : ", ", n, " ", dt);
    std::printf("\n  %-18s%s*: %d tensors (%s), %s parameters, %s\n", str_cat("MTP layer ", k).c_str(), p.c_str(), tensors,
                dts.c_str(), count(params).c_str(), human(bytes).c_str());
    std::printf("                    x = eh_proj(concat(enorm(embed(t+1)), hnorm(h_t))), a %s decoder layer, "
                "logits = shared_head.head(shared_head.norm(x))\n",
                store.contains(p + "mlp.gate.weight") ? "MoE" : "dense");
  }

  if (!qlin.empty()) {
    // Count of Linears per part and (K, codebook); dense Linears counted apart.
    std::set<std::pair<int, int>> cols;  // (K, codebook)
    std::map<std::string, std::map<std::pair<int, int>, int>> table;
    std::map<std::string, int> dense;
    double dec_weights = 0, dec_bits = 0, dec_bytes = 0;
    for (const LinearSpec& s : all_linears) {
      const bool mtp = s.layer >= c.num_hidden_layers && s.part != LinearPart::Head;
      const std::string part = mtp ? "mtp" : linear_part_name(s.part);
      auto it = qlin.find(s.key);
      if (it == qlin.end()) {
        if (!mtp || store.contains(s.key + ".weight")) dense[part]++;
        continue;
      }
      const std::pair<int, int> col{it->second.K, int(it->second.cb)};
      cols.insert(col);
      table[part][col]++;
      if (s.part != LinearPart::Head && !mtp) {
        dec_weights += double(s.in * s.out);
        dec_bits += double(trellis::round_up_128(s.in) * trellis::round_up_128(s.out)) * it->second.K;
        dec_bytes += it->second.bytes;
      }
    }
    std::printf("\n  trellis-coded Linears by part, K and codebook\n    %-16s", "part");
    for (auto [k, cb] : cols) std::printf(" %9s", str_cat("K=", k, " ", trellis::codebook_name(trellis::Codebook(cb))).c_str());
    std::printf(" %9s\n", "dense");
    for (const char* part : {"attention", "dense mlp", "shared expert", "routed experts", "lm_head", "mtp"}) {
      if (!table.count(part) && !dense.count(part)) continue;
      std::printf("    %-16s", part);
      for (auto col : cols) std::printf(" %9d", table[part][col]);
      std::printf(" %9d\n", dense[part]);
    }
    double dec_padded = 0;
    for (const auto& [k, q] : qlin)
      if (q.spec.part != LinearPart::Head && q.spec.layer < c.num_hidden_layers)
        dec_padded += double(trellis::round_up_128(q.spec.in) * trellis::round_up_128(q.spec.out));
    std::printf("\n  decoder Linears   %.4f bits per stored weight (K, 128-padded numel-weighted); %.4f bits per real\n"
                "                    weight including suh/svh and padding (%s in %s)\n",
                dec_padded > 0 ? dec_bits / dec_padded : 0.0, dec_weights > 0 ? dec_bytes * 8 / dec_weights : 0.0,
                human(dec_bytes).c_str(), count(dec_weights).c_str());
    std::printf("  whole checkpoint  %.4f bits per parameter (%s for %s parameters)\n",
                total > 0 ? total_bytes * 8 / total : 0.0, human(total_bytes).c_str(), count(total).c_str());
    if (list_tensors) {
      std::printf("\n  %-56s %-14s %3s %-6s %12s\n", "Linear", "part", "K", "cb", "bytes");
      for (const LinearSpec& s : all_linears) {
        auto it = qlin.find(s.key);
        if (it == qlin.end()) continue;
        std::printf("  %-56s %-14s %3d %-6s %12.0f\n", s.key.c_str(), linear_part_name(s.part), it->second.K,
                    trellis::codebook_name(it->second.cb), it->second.bytes);
      }
    }
  }
  std::printf("\n  checkpoint bytes %s; weight bytes read per decoded token: %s\n", human(total_bytes).c_str(),
              human(active_bytes).c_str());
  return 0;
}

}  // namespace

void add_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Summarise a checkpoint: config, tensors by dtype, parameters per part, "
                                            "and for EXL3 the K / codebook of every Linear and the real bpw");
  static std::string dir;
  static bool tensors = false;
  cmd->add_option("dir", dir, "Model directory (config.json + safetensors)")->required();
  cmd->add_flag("--tensors", tensors, "EXL3: list every trellis-coded Linear with its K, codebook and bytes");
  cmd->callback([] { std::exit(run_inspect(dir, tensors)); });
}

}  // namespace trellm::cli
