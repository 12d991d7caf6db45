// Synthetic GLM-4.7-Flash-shaped models: every tensor allocated on the backend and filled with seeded random
// values (trellis codes are random bits: every bit pattern is a valid EXL3 tile). Used by `trellm bench`.
#include <cmath>

#include "core/error.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"

namespace trellm {

Config Config::glm47_flash() {
  Config c;
  c.vocab_size = 154880;
  c.hidden_size = 2048;
  c.intermediate_size = 10240;
  c.moe_intermediate_size = 1536;
  c.num_hidden_layers = 47;
  c.num_attention_heads = 20;
  c.num_key_value_heads = 20;
  c.n_shared_experts = 1;
  c.n_routed_experts = 64;
  c.routed_scaling_factor = 1.8;
  c.kv_lora_rank = 512;
  c.q_lora_rank = 768;
  c.qk_rope_head_dim = 64;
  c.qk_nope_head_dim = 192;
  c.v_head_dim = 256;
  c.num_experts_per_tok = 4;
  c.hidden_act = "silu";
  c.max_position_embeddings = 202752;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 1e6;
  c.mlp_sparse.assign(47, true);
  c.mlp_sparse[0] = false;
  c.eos_token_id = {154820, 154827, 154829};
  c.pad_token_id = 154820;
  c.num_nextn_predict_layers = 1;
  return c;
}

Config Config::glm47_flash_tiny() {
  Config c = glm47_flash();
  c.vocab_size = 300;  // not a multiple of 128: exercises the trellis padding of lm_head
  c.hidden_size = 128;
  c.intermediate_size = 200;
  c.moe_intermediate_size = 64;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.kv_lora_rank = 64;
  c.q_lora_rank = 48;
  c.qk_rope_head_dim = 16;
  c.qk_nope_head_dim = 24;
  c.v_head_dim = 32;
  c.mlp_sparse = {false, true, true};
  c.eos_token_id = {299};
  c.pad_token_id = 299;
  return c;
}

namespace {

struct Builder {
  Backend& be;
  const SyntheticSpec& spec;
  Arena& arena;
  std::vector<std::unique_ptr<trellis::TrellisWeight>>& exl3;
  uint64_t seed;

  TensorView tensor(DType t, std::initializer_list<int64_t> shape, float scale) {
    TensorView v(nullptr, t, shape);
    v.data = arena.alloc(v.nbytes());
    be.fill_random(v, seed++, scale);
    return v;
  }
  TensorView norm(int64_t n) {
    // RMSNorm weights near 1 (random in [0.9, 1.1]) keep activations at unit scale through 47 layers.
    std::vector<float> h(static_cast<size_t>(n));
    uint64_t z = seed++;
    for (auto& x : h) {
      z = z * 6364136223846793005ull + 1442695040888963407ull;
      x = 0.9f + 0.2f * float(z >> 40) / 16777216.0f;
    }
    TensorView v(arena.alloc(size_t(n) * 4), DType::F32, {n});
    be.from_host(v.data, h.data(), size_t(n) * 4);
    return v;
  }

  Linear linear(const std::string& key, int64_t out, int64_t in, int bits) {
    Linear l;
    l.in = in;
    l.out = out;
    if (bits == 0) {
      // Dense bf16 with entries ~ U(±sqrt(3/in)): unit-variance outputs for unit-variance inputs.
      l.weight = tensor(DType::BF16, {out, in}, std::sqrt(3.0f / float(in)));
      return l;
    }
    auto w = std::make_unique<trellis::TrellisWeight>();
    w->key = key;
    w->K = bits;
    w->codebook = spec.codebook;
    w->in = in;
    w->out = out;
    w->in_padded = trellis::round_up_128(in);
    w->out_padded = trellis::round_up_128(out);
    w->trellis = tensor(DType::I16, {w->in_padded / 16, w->out_padded / 16, 16 * bits}, 0).ptr<uint16_t>();
    // Q has RMS ~1.24: suh ~ U(±sqrt(3/in)/1.24) and svh ~ U(±sqrt(3)) give unit-variance outputs.
    w->suh = tensor(DType::F16, {w->in_padded}, std::sqrt(3.0f / float(in)) / 1.24f).ptr<uint16_t>();
    w->svh = tensor(DType::F16, {w->out_padded}, std::sqrt(3.0f)).ptr<uint16_t>();
    exl3.push_back(std::move(w));
    l.exl3 = exl3.back().get();
    return l;
  }
};

}  // namespace

std::unique_ptr<Model> Model::synthetic(const Config& c, Backend& backend, const SyntheticSpec& spec) {
  if (spec.bits < 0 || spec.bits > 8 || spec.head_bits < 0 || spec.head_bits > 8)
    fail("synthetic model: bits must be 1..8 (or 0 for dense bf16); got ", spec.bits, " and head ", spec.head_bits);
  std::unique_ptr<Model> m(new Model());
  m->backend_ = &backend;
  m->arena_.set_backend(&backend);
  m->config_ = c;
  Builder b{backend, spec, m->arena_, m->exl3_, spec.seed * 1000003ull};
  Weights& w = m->w_;
  const int64_t hid = c.hidden_size, H = c.num_attention_heads, qk = c.qk_head_dim(), K = spec.bits;
  w.embed_tokens = b.tensor(DType::BF16, {c.vocab_size, hid}, 1.7f);
  w.norm = b.norm(hid);
  w.lm_head = b.linear("lm_head", c.vocab_size, hid, spec.head_bits);
  auto layer = [&](LayerWeights& L, const std::string& p, bool sparse) {
    L.input_layernorm = b.norm(hid);
    L.post_attention_layernorm = b.norm(hid);
    if (c.q_lora_rank > 0) {
      L.q_a_proj = b.linear(p + "self_attn.q_a_proj", c.q_lora_rank, hid, K);
      L.q_a_layernorm = b.norm(c.q_lora_rank);
      L.q_b_proj = b.linear(p + "self_attn.q_b_proj", H * qk, c.q_lora_rank, K);
    } else {
      L.q_proj = b.linear(p + "self_attn.q_proj", H * qk, hid, K);
    }
    L.kv_a_proj_with_mqa = b.linear(p + "self_attn.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, hid, K);
    L.kv_a_layernorm = b.norm(c.kv_lora_rank);
    L.kv_b_proj = b.linear(p + "self_attn.kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, K);
    L.o_proj = b.linear(p + "self_attn.o_proj", hid, H * c.v_head_dim, K);
    if (!sparse) {
      L.mlp.gate_proj = b.linear(p + "mlp.gate_proj", c.intermediate_size, hid, K);
      L.mlp.up_proj = b.linear(p + "mlp.up_proj", c.intermediate_size, hid, K);
      L.mlp.down_proj = b.linear(p + "mlp.down_proj", hid, c.intermediate_size, K);
      return;
    }
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
    L.gate = b.tensor(DType::BF16, {E, hid}, std::sqrt(3.0f / float(hid)));
    L.e_score_correction_bias = b.tensor(DType::F32, {E}, 0.1f);
    L.experts.resize(size_t(E));
    for (int64_t e = 0; e < E; e++) {
      const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
      L.experts[e].gate = b.linear(ep + "gate_proj", I, hid, K);
      L.experts[e].up = b.linear(ep + "up_proj", I, hid, K);
      L.experts[e].down = b.linear(ep + "down_proj", hid, I, K);
    }
    if (c.n_shared_experts > 0) {
      const int64_t SI = I * c.n_shared_experts;
      L.shared.gate = b.linear(p + "mlp.shared_experts.gate_proj", SI, hid, K);
      L.shared.up = b.linear(p + "mlp.shared_experts.up_proj", SI, hid, K);
      L.shared.down = b.linear(p + "mlp.shared_experts.down_proj", hid, SI, K);
    }
  };
  w.layers.resize(size_t(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; i++)
    layer(w.layers[size_t(i)], "model.layers." + std::to_string(i) + ".", c.mlp_sparse[size_t(i)]);
  // The MTP layer(s) GLM-4.7-Flash ships (num_nextn_predict_layers): a sparse decoder layer, eh_proj at the
  // layers' bits, shared_head.head at the head's; the embedding is the main model's.
  w.mtp.resize(size_t(c.num_nextn_predict_layers));
  for (size_t k = 0; k < w.mtp.size(); k++) {
    MtpWeights& mt = w.mtp[k];
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + int64_t(k)) + ".";
    mt.enorm = b.norm(hid);
    mt.hnorm = b.norm(hid);
    mt.eh_proj = b.linear(p + "eh_proj", hid, 2 * hid, K);
    layer(mt.layer, p, true);
    mt.sparse = true;
    mt.shared_head_norm = b.norm(hid);
    mt.shared_head = b.linear(p + "shared_head.head", c.vocab_size, hid, spec.head_bits);
  }
  backend.synchronize();
  return m;
}

}  // namespace trellm
