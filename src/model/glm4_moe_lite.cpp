// GLM-4.7-Flash forward pass, top to bottom, written only in backend ops.
#include "model/glm4_moe_lite.h"

#include "core/error.h"
#include "format/safetensors.h"
#include "quant/trellis_weight.h"

namespace trellm {

namespace {
// The first n rows of a [max, ...] state buffer.
TensorView rows(TensorView t, int64_t n) {
  t.shape[0] = n;
  return t;
}
// Prompts up to this many tokens use the absorbed form; longer ones expand K/V per tile (fewer FLOPs once
// the query count approaches the per-head expansion cost).
constexpr int kAbsorbedMaxTokens = 16;
// transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps (1e-6), not rms_norm_eps.
constexpr float kLatentNormEps = 1e-6f;
}  // namespace

std::vector<double> PartTimer::collect() {
  std::vector<double> ms(size_t(Part::Count), 0.0);
  int prev = start;
  for (auto& [part, ev] : marks) {
    ms[size_t(part)] += backend->elapsed_ms(prev, ev);
    prev = ev;
  }
  marks.clear();
  return ms;
}

namespace {
double linear_bytes(const Linear& l) {
  if (!l.present()) return 0;
  double b = l.bias.empty() ? 0 : double(l.bias.nbytes());
  if (l.exl3) return b + double(l.exl3->trellis_bytes()) + 2.0 * double(l.exl3->in_padded + l.exl3->out_padded);
  return b + double(l.weight.nbytes());
}
double expert_bytes(const Expert& e) { return linear_bytes(e.gate) + linear_bytes(e.up) + linear_bytes(e.down); }
}  // namespace

double Model::weight_bytes_per_token() const {
  const Config& c = config_;
  double b = double(c.hidden_size * dtype_size(w_.embed_tokens.dtype)) + linear_bytes(w_.lm_head) + double(w_.norm.nbytes());
  for (size_t l = 0; l < w_.layers.size(); l++) {
    const LayerWeights& L = w_.layers[l];
    b += double(L.input_layernorm.nbytes() + L.post_attention_layernorm.nbytes());
    for (const Linear* x : {&L.q_proj, &L.q_a_proj, &L.q_b_proj, &L.kv_a_proj_with_mqa, &L.kv_b_proj, &L.o_proj}) b += linear_bytes(*x);
    b += double(L.q_a_layernorm.nbytes() + L.kv_a_layernorm.nbytes());
    if (!c.mlp_sparse[l]) {
      b += linear_bytes(L.mlp.gate_proj) + linear_bytes(L.mlp.up_proj) + linear_bytes(L.mlp.down_proj);
      continue;
    }
    double experts = 0;
    for (const Expert& e : L.experts) experts += expert_bytes(e);
    b += experts * double(c.num_experts_per_tok) / double(c.n_routed_experts);
    b += expert_bytes(L.shared) + double(L.gate.nbytes() + L.e_score_correction_bias.nbytes());
  }
  return b;
}

double Model::weight_bytes_total() const {
  const Config& c = config_;
  double b = double(w_.embed_tokens.nbytes()) + double(w_.norm.nbytes());
  if (w_.lm_head.weight.data != w_.embed_tokens.data) b += linear_bytes(w_.lm_head);
  for (size_t l = 0; l < w_.layers.size(); l++) {
    const LayerWeights& L = w_.layers[l];
    for (const Linear* x : {&L.q_proj, &L.q_a_proj, &L.q_b_proj, &L.kv_a_proj_with_mqa, &L.kv_b_proj, &L.o_proj}) b += linear_bytes(*x);
    b += linear_bytes(L.mlp.gate_proj) + linear_bytes(L.mlp.up_proj) + linear_bytes(L.mlp.down_proj);
    for (const Expert& e : L.experts) b += expert_bytes(e);
    if (c.mlp_sparse[l]) b += expert_bytes(L.shared) + double(L.gate.nbytes());
  }
  return b;
}

double Model::kv_bytes_per_token(int depth, DType kv_dtype) const {
  return double(depth) * double(config_.kv_lora_rank + config_.qk_rope_head_dim) * double(dtype_size(kv_dtype)) *
         double(config_.num_hidden_layers);
}

Model::~Model() {
  arena_.release();
}

TensorView Model::alloc(DType t, std::initializer_list<int64_t> shape) {
  TensorView v(nullptr, t, shape);
  v.data = arena_.alloc(v.nbytes());
  return v;
}

RunState Model::make_run_state(int max_tokens, int logit_rows) {
  const Config& c = config_;
  const int64_t T = max_tokens;
  RunState s;
  s.max_tokens = max_tokens;
  s.logit_rows = logit_rows < 0 ? max_tokens : std::max(1, std::min(logit_rows, max_tokens));
  s.tokens = alloc(DType::I32, {T});
  s.pos = alloc(DType::I32, {T});
  s.host_pos.resize(size_t(T));
  s.h = alloc(DType::F32, {T, c.hidden_size});
  s.x = alloc(DType::F32, {T, c.hidden_size});
  s.q_a = alloc(DType::F32, {T, std::max<int64_t>(c.q_lora_rank, 1)});
  s.q = alloc(DType::F32, {T, c.num_attention_heads, c.qk_head_dim()});
  s.kv = alloc(DType::F32, {T, c.kv_lora_rank + c.qk_rope_head_dim});
  s.attn = alloc(DType::F32, {T, c.num_attention_heads * c.v_head_dim});
  s.y = alloc(DType::F32, {T, c.hidden_size});
  s.mlp_gate = alloc(DType::F32, {T, c.intermediate_size});
  s.mlp_up = alloc(DType::F32, {T, c.intermediate_size});
  s.moe_w = alloc(DType::F32, {T, c.num_experts_per_tok});
  s.moe_ids = alloc(DType::I32, {T, c.num_experts_per_tok});
  s.logits = alloc(DType::F32, {s.logit_rows, c.vocab_size});
  return s;
}

KvCache Model::make_kv_cache(int capacity, std::optional<DType> dtype) {
  KvCache kv;
  kv.capacity = capacity;
  for (int64_t l = 0; l < config_.num_hidden_layers; l++)
    kv.layers.push_back(alloc(dtype.value_or(backend_->kv_dtype()), {capacity, config_.kv_lora_rank + config_.qk_rope_head_dim}));
  return kv;
}

void Model::forward(RunState& rs, KvCache& kv, const int32_t* tokens, int n, int pos, bool all_logits) {
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && pos >= 0 && pos + n <= kv.capacity);
  for (int i = 0; i < n; i++) rs.host_pos[i] = pos + i;
  backend_->from_host(rs.tokens.data, tokens, sizeof(int32_t) * size_t(n));
  backend_->from_host(rs.pos.data, rs.host_pos.data(), sizeof(int32_t) * size_t(n));
  forward_uploaded(rs, kv, n, pos + n, all_logits);
}

void Model::forward_uploaded(RunState& rs, KvCache& kv, int n, int kv_bound, bool all_logits) {
  const Config& c = config_;
  Backend& B = *backend_;
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && kv_bound <= kv.capacity);
  const MlaDims mla = c.mla();
  const RopeParams rope = c.rope();
  const float eps = float(c.rms_norm_eps);
  const MlaMode mode = n <= kAbsorbedMaxTokens ? MlaMode::Absorbed : MlaMode::Expanded;

  TensorView tok = rows(rs.tokens, n);
  const Positions pos{rows(rs.pos, n), kv_bound};
  TensorView h = rows(rs.h, n), x = rows(rs.x, n), y = rows(rs.y, n);            // [n, hidden]
  TensorView q = rows(rs.q, n);                                                     // [n, heads, nope+rope]
  TensorView kvr = rows(rs.kv, n);                                                  // [n, kv_rank+rope]
  TensorView attn = rows(rs.attn, n);                                               // [n, heads*v]
  B.embed(h, tok, w_.embed_tokens);
  if (rs.timer) rs.timer->mark(Part::Embed);

  B.rms_norm(x, h, w_.layers[0].input_layernorm, eps);
  for (int64_t l = 0; l < c.num_hidden_layers; l++) {
    const LayerWeights& L = w_.layers[l];
    // ---- attention (MLA); x = input_layernorm(h) ----
    if (c.q_lora_rank > 0) {
      TensorView qa = rows(rs.q_a, n);                                              // [n, q_lora_rank]
      B.matmul_pair(qa, kvr, x, L.q_a_proj, L.kv_a_proj_with_mqa);                 // kvr: c_kv | k_rope
      B.rms_norm_matmul(q, qa, L.q_a_layernorm, kLatentNormEps, L.q_b_proj);        // q = q_b(norm(qa))
    } else {
      B.matmul(q, x, L.q_proj);
      B.matmul(kvr, x, L.kv_a_proj_with_mqa);                                      // c_kv | k_rope
    }
    if (rs.timer) rs.timer->mark(Part::AttnProj);
    // rope on q_rope of every head; cache row pos = [norm(c_kv) | rope(k_rope)]; the attention
    B.attention_mla_append(attn, q, mla.nope_dim, kv.layers[l], kvr, L.kv_a_layernorm, kLatentNormEps, L.kv_b_proj, pos,
                           mla, rope, mode);
    if (rs.timer) rs.timer->mark(Part::AttnCore);
    B.matmul(y, attn, L.o_proj);
    if (rs.timer) rs.timer->mark(Part::AttnOut);
    // ---- MLP: dense, or routed experts + shared expert; first h += attn, x = norm(h) ----
    if (c.mlp_sparse[l]) {
      TensorView wts = rows(rs.moe_w, n), ids = rows(rs.moe_ids, n);                // [n, top_k]
      B.add_rms_norm_route(h, y, L.post_attention_layernorm, eps, x, wts, ids, L.gate, L.e_score_correction_bias,
                           c.routing());
      if (rs.timer) rs.timer->mark(Part::Router);
      B.moe_ffn(y, x, wts, ids, L.experts, c.n_shared_experts > 0 ? &L.shared : nullptr);
      if (rs.timer) rs.timer->mark(Part::Experts);
    } else {
      B.add_rms_norm(h, y, L.post_attention_layernorm, eps, x);
      TensorView g(rs.mlp_gate.data, DType::F32, {n, c.intermediate_size});
      TensorView u(rs.mlp_up.data, DType::F32, {n, c.intermediate_size});
      B.matmul(g, x, L.mlp.gate_proj);
      B.matmul(u, x, L.mlp.up_proj);
      B.silu_mul(g, g, u);
      B.matmul(y, g, L.mlp.down_proj);
      if (rs.timer) rs.timer->mark(Part::DenseMlp);
    }
    // h += mlp; x = the next layer's input norm of h (the final norm after the last layer)
    const bool last = l + 1 == c.num_hidden_layers;
    B.add_rms_norm(h, y, last ? w_.norm : w_.layers[l + 1].input_layernorm, eps, x);
    if (rs.timer) rs.timer->mark(Part::MlpNorm);
  }

  // ---- head: x holds model.norm(h); logits of all rows, or just the last ----
  TRELLM_ASSERT(!all_logits || n <= rs.logit_rows, "all_logits needs a run state with >= ", n, " logit rows");
  TensorView xl = all_logits ? x : TensorView(x[n - 1].data, DType::F32, {1, c.hidden_size});
  B.matmul(rows(rs.logits, xl.rows()), xl, w_.lm_head);
  if (rs.timer) rs.timer->mark(Part::Head);
}

}  // namespace trellm
