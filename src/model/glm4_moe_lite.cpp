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

double Model::routed_expert_bytes_total() const {
  double b = 0;
  for (size_t l = 0; l < w_.layers.size(); l++)
    if (config_.mlp_sparse[l])
      for (const Expert& e : w_.layers[l].experts) b += expert_bytes(e);
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

RunState Model::make_run_state(int max_tokens, int logit_rows, int max_seqs, int max_blocks) {
  const Config& c = config_;
  const int64_t T = max_tokens;
  RunState s;
  s.max_tokens = max_tokens;
  s.logit_rows = logit_rows < 0 ? max_tokens : std::max(1, std::min(logit_rows, max_tokens));
  s.max_seqs = std::max(1, max_seqs);
  s.max_blocks = max_blocks > 0 ? max_blocks
                                : int(std::max<int64_t>(1, (c.max_position_embeddings + kKvBlockTokens - 1) / kKvBlockTokens));
  s.tokens = alloc(DType::I32, {T});
  s.pos = alloc(DType::I32, {T});
  s.seq = alloc(DType::I32, {T});
  s.tables = alloc(DType::I32, {int64_t(s.max_seqs) * s.max_blocks});
  s.logit_idx = alloc(DType::I32, {s.logit_rows});
  s.host_pos.resize(size_t(T));
  s.host_seq.resize(size_t(T));
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

double Model::kv_bytes_per_cached_token(DType kv_dtype) const {
  return double(config_.kv_lora_rank + config_.qk_rope_head_dim) * double(dtype_size(kv_dtype)) *
         double(config_.num_hidden_layers);
}

KvCache Model::make_kv_cache_blocks(int blocks, std::optional<DType> dtype) {
  TRELLM_ASSERT(blocks >= 1, "a KV cache needs at least one block");
  KvCache kv;
  kv.blocks = blocks;
  const int64_t rows = int64_t(blocks) * kKvBlockTokens;
  for (int64_t l = 0; l < config_.num_hidden_layers; l++)
    kv.layers.push_back(alloc(dtype.value_or(backend_->kv_dtype()), {rows, config_.kv_lora_rank + config_.qk_rope_head_dim}));
  return kv;
}

KvCache Model::make_kv_cache(int capacity, std::optional<DType> dtype) {
  return make_kv_cache_blocks(std::max(1, (capacity + kKvBlockTokens - 1) / kKvBlockTokens), dtype);
}

void Model::forward(RunState& rs, KvCache& kv, const int32_t* tokens, int n, int pos, bool all_logits) {
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && pos >= 0 && pos + n <= kv.token_capacity());
  const int blocks = int((pos + n + kKvBlockTokens - 1) / kKvBlockTokens);  // the table entries this step reads
  rs.host_table.resize(size_t(blocks));
  for (int b = 0; b < blocks; b++) rs.host_table[b] = b;
  for (int i = 0; i < n; i++) rs.host_pos[i] = pos + i, rs.host_seq[i] = 0;
  StepBatch b;
  b.tokens = {tokens, size_t(n)};
  b.pos = {rs.host_pos.data(), size_t(n)};
  b.seq = {rs.host_seq.data(), size_t(n)};
  b.tables = rs.host_table;
  b.table_stride = blocks;
  b.logits = all_logits ? Logits::All : Logits::Last;
  forward(rs, kv, b);
}

void Model::forward(RunState& rs, KvCache& kv, const StepBatch& b) {
  const int n = int(b.tokens.size());
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && b.pos.size() == size_t(n) && b.seq.size() == size_t(n),
                "step of ", n, " rows for a run state of ", rs.max_tokens);
  TRELLM_ASSERT(b.table_stride >= 1 && b.table_stride <= rs.max_blocks && b.tables.size() % size_t(b.table_stride) == 0,
                "block tables of stride ", b.table_stride, " (run state: ", rs.max_blocks, " entries)");
  const int n_tables = int(b.tables.size() / size_t(b.table_stride));
  TRELLM_ASSERT(n_tables >= 1 && n_tables <= rs.max_seqs, "", n_tables, " block tables for a run state of ", rs.max_seqs);
  int bound = 0;
  for (int i = 0; i < n; i++) {
    const int32_t p = b.pos[i], sq = b.seq[i];
    TRELLM_ASSERT(p >= 0 && sq >= 0 && sq < n_tables && p / kKvBlockTokens < b.table_stride, "row ", i, ": position ", p,
                  " of table ", sq, " outside the step's tables");
    const int32_t blk = b.tables[size_t(sq) * b.table_stride + p / kKvBlockTokens];
    TRELLM_ASSERT(blk >= 0 && blk < kv.blocks, "row ", i, ": block ", blk, " outside the cache of ", kv.blocks);
    bound = std::max(bound, p + 1);
  }
  Backend& B = *backend_;
  B.from_host(rs.tokens.data, b.tokens.data(), sizeof(int32_t) * size_t(n));
  B.from_host(rs.pos.data, b.pos.data(), sizeof(int32_t) * size_t(n));
  B.from_host(rs.seq.data, b.seq.data(), sizeof(int32_t) * size_t(n));
  B.from_host(rs.tables.data, b.tables.data(), sizeof(int32_t) * b.tables.size());
  Layout l;
  l.n = n;
  l.bound = bound;
  l.n_tables = n_tables;
  l.table_stride = b.table_stride;
  l.runs = b.runs;
  l.logits = b.logits;
  if (b.logits == Logits::Rows) {
    TRELLM_ASSERT(!b.logit_rows.empty() && b.logit_rows.size() <= size_t(rs.logit_rows), "", b.logit_rows.size(),
                  " logit rows for a run state of ", rs.logit_rows);
    for (int32_t r : b.logit_rows) TRELLM_ASSERT(r >= 0 && r < n, "logit row ", r, " outside the step's ", n, " rows");
    B.from_host(rs.logit_idx.data, b.logit_rows.data(), sizeof(int32_t) * b.logit_rows.size());
    l.n_logits = int(b.logit_rows.size());
  }
  forward_uploaded(rs, kv, l);
}

void Model::forward_uploaded(RunState& rs, KvCache& kv, const Layout& lay) {
  const Config& c = config_;
  Backend& B = *backend_;
  const int n = lay.n;
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && lay.bound >= 1 && lay.bound <= int64_t(lay.table_stride) * kKvBlockTokens &&
                lay.n_tables >= 1 && lay.n_tables <= rs.max_seqs && lay.table_stride <= rs.max_blocks);
  const MlaDims mla = c.mla();
  const RopeParams rope = c.rope();
  const float eps = float(c.rms_norm_eps);
  // The CPU reference computes every row in the absorbed form, so that a row's result does not depend on how its
  // prompt was chunked or what else shared the step (bit-exact batch invariance; the expanded CPU form stays a
  // tested op). The GPU picks its form per call by tensor-core FLOPs (mla::make_plan) whatever this says.
  const MlaMode mode = MlaMode::Absorbed;

  TensorView tok = rows(rs.tokens, n);
  Positions pos;
  pos.pos = rows(rs.pos, n);
  pos.bound = lay.bound;
  pos.seq = rows(rs.seq, n);
  pos.tables = TensorView(rs.tables.data, DType::I32, {lay.n_tables, lay.table_stride});
  pos.runs = lay.runs;
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
    // rope on q_rope of every head; each row's cache slot = [norm(c_kv) | rope(k_rope)]; the attention
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

  // ---- head: x holds model.norm(h); logits of the rows asked for ----
  TensorView xl;
  switch (lay.logits) {
    case Logits::All:
      TRELLM_ASSERT(n <= rs.logit_rows, "all logits need a run state with >= ", n, " logit rows");
      xl = x;
      break;
    case Logits::Last: xl = TensorView(x[n - 1].data, DType::F32, {1, c.hidden_size}); break;
    case Logits::Rows:  // y is free after the last layer: the wanted rows of x, gathered
      TRELLM_ASSERT(lay.n_logits >= 1 && lay.n_logits <= rs.logit_rows && lay.n_logits <= rs.max_tokens);
      xl = rows(rs.y, lay.n_logits);
      B.gather_rows(xl, x, rows(rs.logit_idx, lay.n_logits));
      break;
  }
  B.matmul(rows(rs.logits, xl.rows()), xl, w_.lm_head);
  if (rs.timer) rs.timer->mark(Part::Head);
}

}  // namespace trellm
