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

double Model::kv_bytes_per_token(int depth, DType kv_dtype) const { return double(depth) * kv_bytes_per_cached_token(kv_dtype); }

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
  s.max_blocks = max_blocks > 0 ? max_blocks : kv_blocks_for(c.max_position_embeddings);
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

KvCache Model::cache_pools(int layers, int blocks, std::optional<DType> dtype) {
  TRELLM_ASSERT(blocks >= 1, "a KV cache needs at least one block");
  KvCache kv;
  kv.blocks = blocks;
  const int64_t rows = int64_t(blocks) * kKvBlockTokens;
  const DType dt = dtype.value_or(backend_->kv_dtype());
  const Arena::Mark before = arena_.mark();
  try {
    for (int l = 0; l < layers; l++) kv.layers.push_back(alloc(dt, {rows, config_.kv_lora_rank + config_.qk_rope_head_dim}));
  } catch (const Error& e) {
    const double gb = double(layers) * double(rows) * double(config_.kv_lora_rank + config_.qk_rope_head_dim) *
                      double(dtype_size(dt)) / 1e9;
    arena_.roll_back(before);
    fail("the KV cache of ", blocks, " blocks x ", kKvBlockTokens, " tokens x ", layers, " layers (", gb, " GB ",
         dtype_name(dt), ") does not fit: ", e.what(), "; lower --kv-memory, --ctx or --max-seqs");
  }
  return kv;
}

KvCache Model::make_kv_cache_blocks(int blocks, std::optional<DType> dtype) {
  return cache_pools(int(config_.num_hidden_layers), blocks, dtype);
}

KvCache Model::make_kv_cache(int capacity, std::optional<DType> dtype) {
  return make_kv_cache_blocks(kv_blocks_for(capacity), dtype);
}

StepBatch Model::single_sequence(RunState& rs, const KvCache& kv, const int32_t* tokens, int n, int pos) {
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && pos >= 0 && pos + n <= kv.token_capacity());
  const int blocks = kv_blocks_for(pos + n);  // the table entries this step reads
  rs.host_table.resize(size_t(blocks));
  for (int b = 0; b < blocks; b++) rs.host_table[b] = b;
  for (int i = 0; i < n; i++) rs.host_pos[i] = pos + i, rs.host_seq[i] = 0;
  StepBatch b;
  b.tokens = {tokens, size_t(n)};
  b.pos = {rs.host_pos.data(), size_t(n)};
  b.seq = {rs.host_seq.data(), size_t(n)};
  b.tables = rs.host_table;
  b.table_stride = blocks;
  return b;
}

void Model::forward(RunState& rs, KvCache& kv, const int32_t* tokens, int n, int pos, bool all_logits) {
  StepBatch b = single_sequence(rs, kv, tokens, n, pos);
  b.logits = all_logits ? Logits::All : Logits::Last;
  forward(rs, kv, b);
}

Model::Layout Model::upload(RunState& rs, const KvCache& kv, const StepBatch& b) {
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
  return l;
}

void Model::forward(RunState& rs, KvCache& kv, const StepBatch& b) {
  forward_uploaded(rs, kv, upload(rs, kv, b));
}

// One decoder layer on rows 0..n of rs: x = input_layernorm(h) on entry; h += attention(x), h += mlp(norm(h)),
// and on exit x = next_norm(h) (the next layer's input norm, model.norm after the last, shared_head.norm in the
// MTP layer). `cache` is this layer's latent cache pool. Written only in backend ops.
void Model::decoder_layer(const LayerWeights& L, bool sparse, TensorView cache, RunState& rs, int n, const Positions& pos,
                          TensorView next_norm) {
  const Config& c = config_;
  Backend& B = *backend_;
  const MlaDims mla = c.mla();
  const RopeParams rope = c.rope();
  const float eps = float(c.rms_norm_eps);
  // The CPU reference computes every row in the absorbed form, so that a row's result does not depend on how its
  // prompt was chunked or what else shared the step (bit-exact batch invariance; the expanded CPU form stays a
  // tested op). The GPU picks its form per call by tensor-core FLOPs (mla::make_plan) whatever this says.
  const MlaMode mode = MlaMode::Absorbed;
  TensorView h = rows(rs.h, n), x = rows(rs.x, n), y = rows(rs.y, n);            // [n, hidden]
  TensorView q = rows(rs.q, n);                                                     // [n, heads, nope+rope]
  TensorView kvr = rows(rs.kv, n);                                                  // [n, kv_rank+rope]
  TensorView attn = rows(rs.attn, n);                                               // [n, heads*v]
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
  B.attention_mla_append(attn, q, mla.nope_dim, cache, kvr, L.kv_a_layernorm, kLatentNormEps, L.kv_b_proj, pos,
                         mla, rope, mode);
  if (rs.timer) rs.timer->mark(Part::AttnCore);
  B.matmul(y, attn, L.o_proj);
  if (rs.timer) rs.timer->mark(Part::AttnOut);
  // ---- MLP: dense, or routed experts + shared expert; first h += attn, x = norm(h) ----
  if (sparse) {
    TensorView wts = rows(rs.moe_w, n), ids = rows(rs.moe_ids, n);                // [n, top_k]
    B.add_rms_norm_route(h, y, L.post_attention_layernorm, eps, x, wts, ids, L.gate, L.e_score_correction_bias,
                         c.routing());
    if (rs.timer) rs.timer->mark(Part::Router);
    // y = experts(x), then h += y, x = next_norm(h): one op, which the GPU runs in the down kernel's last blocks
    B.moe_ffn_add_rms_norm(y, x, wts, ids, L.experts, c.n_shared_experts > 0 ? &L.shared : nullptr, h, next_norm, eps, x);
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
    B.add_rms_norm(h, y, next_norm, eps, x);
    if (rs.timer) rs.timer->mark(Part::MlpNorm);
  }
}

void Model::forward_layer(int64_t l, RunState& rs, KvCache& kv, int n, int pos) {
  const Config& c = config_;
  TRELLM_ASSERT(l >= 0 && l < c.num_hidden_layers && !w_.layers[size_t(l)].input_layernorm.empty(), "layer ", l,
                " is not loaded");
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens);
  // Tokens are not read by a layer: rs.host_seq (zeros) stands in for them.
  const Layout lay = upload(rs, kv, single_sequence(rs, kv, rs.host_seq.data(), n, pos));
  const LayerWeights& L = w_.layers[size_t(l)];
  backend_->rms_norm(rows(rs.x, n), rows(rs.h, n), L.input_layernorm, float(c.rms_norm_eps));
  // next_norm: the layer's own (x is recomputed by the next call)
  decoder_layer(L, c.mlp_sparse[size_t(l)], kv.layers[size_t(l)], rs, n, positions(rs, lay), L.input_layernorm);
}

Positions Model::positions(const RunState& rs, const Layout& lay) {
  Positions pos;
  pos.pos = rows(rs.pos, lay.n);
  pos.bound = lay.bound;
  pos.seq = rows(rs.seq, lay.n);
  pos.tables = TensorView(rs.tables.data, DType::I32, {lay.n_tables, lay.table_stride});
  pos.runs = lay.runs;
  return pos;
}

// The logits of the rows `lay` asks for, from rs.x (the final norm of every row) through `head`, into rs.logits.
void Model::logits_of(RunState& rs, const Layout& lay, const Linear& head) {
  const Config& c = config_;
  Backend& B = *backend_;
  const int n = lay.n;
  TensorView x = rows(rs.x, n);
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
  B.matmul(rows(rs.logits, xl.rows()), xl, head);
  if (rs.timer) rs.timer->mark(Part::Head);
}

void Model::forward_uploaded(RunState& rs, KvCache& kv, const Layout& lay) {
  const Config& c = config_;
  Backend& B = *backend_;
  const int n = lay.n;
  TRELLM_ASSERT(n >= 1 && n <= rs.max_tokens && lay.bound >= 1 && lay.bound <= int64_t(lay.table_stride) * kKvBlockTokens &&
                lay.n_tables >= 1 && lay.n_tables <= rs.max_seqs && lay.table_stride <= rs.max_blocks);
  const float eps = float(c.rms_norm_eps);

  TensorView tok = rows(rs.tokens, n);
  const Positions pos = positions(rs, lay);
  TensorView h = rows(rs.h, n), x = rows(rs.x, n);                                // [n, hidden]
  B.embed(h, tok, w_.embed_tokens);
  if (rs.timer) rs.timer->mark(Part::Embed);

  B.rms_norm(x, h, w_.layers[0].input_layernorm, eps);
  for (int64_t l = 0; l < c.num_hidden_layers; l++) {
    // h += attn(x); h += mlp(norm(h)); x = the next layer's input norm of h (the final norm after the last layer)
    const bool last = l + 1 == c.num_hidden_layers;
    decoder_layer(w_.layers[l], c.mlp_sparse[l], kv.layers[l], rs, n, pos, last ? w_.norm : w_.layers[l + 1].input_layernorm);
  }

  // ---- head: x holds model.norm(h) ----
  logits_of(rs, lay, w_.lm_head);
}

// ---- the MTP layer (multi-token prediction; shared/GLM47FLASH.md, "Speculative decoding material") ----

void Model::add_mtp_state(RunState& rs) {
  TRELLM_ASSERT(!w_.mtp.empty(), "the model has no MTP layer");
  if (!rs.mtp_in.empty()) return;
  const int64_t T = rs.max_tokens, H = config_.hidden_size;
  rs.mtp_stage = alloc(DType::F32, {2 * T, H});
  rs.mtp_in = alloc(DType::F32, {T, 2 * H});
  // The concatenation as one gather: row 2i of mtp_in (as [2T, H]) is stage row i (the embedding half), row 2i+1
  // is stage row T + i (the hidden half); independent of the step's row count, so uploaded once.
  std::vector<int32_t> idx(size_t(2 * T));
  for (int64_t i = 0; i < T; i++) idx[size_t(2 * i)] = int32_t(i), idx[size_t(2 * i + 1)] = int32_t(T + i);
  rs.mtp_idx = alloc(DType::I32, {2 * T});
  backend_->from_host(rs.mtp_idx.data, idx.data(), idx.size() * sizeof(int32_t));
  const std::vector<float> zero(size_t(H), 0.0f);
  rs.mtp_zero = alloc(DType::F32, {1, H});
  backend_->from_host(rs.mtp_zero.data, zero.data(), zero.size() * sizeof(float));
  const int32_t z = 0;
  rs.mtp_zero_idx = alloc(DType::I32, {1});
  backend_->from_host(rs.mtp_zero_idx.data, &z, sizeof z);
}

KvCache Model::make_mtp_kv_cache_blocks(int blocks, std::optional<DType> dtype) { return cache_pools(int(w_.mtp.size()), blocks, dtype); }

void Model::forward_mtp(RunState& rs, KvCache& mtp_kv, const StepBatch& b, TensorView hidden, int k) {
  TRELLM_ASSERT(k >= 0 && size_t(k) < w_.mtp.size(), "MTP layer ", k, " of ", w_.mtp.size());
  const Layout lay = upload(rs, mtp_kv, b);
  std::vector<int> first;  // rows at position 0
  for (int i = 0; i < lay.n; i++)
    if (b.pos[size_t(i)] == 0) first.push_back(i);
  mtp_layer(rs, mtp_kv, lay, hidden, k, first);
}

void Model::forward_mtp_uploaded(RunState& rs, KvCache& mtp_kv, const Layout& lay, TensorView hidden, int k) {
  mtp_layer(rs, mtp_kv, lay, hidden, k, {});
}

void Model::mtp_layer(RunState& rs, KvCache& mtp_kv, const Layout& lay, TensorView hidden, int k, std::span<const int> first) {
  const Config& c = config_;
  Backend& B = *backend_;
  TRELLM_ASSERT(k >= 0 && size_t(k) < w_.mtp.size(), "MTP layer ", k, " of ", w_.mtp.size());
  TRELLM_ASSERT(size_t(k) < mtp_kv.layers.size(), "the MTP cache has ", mtp_kv.layers.size(), " layers");
  TRELLM_ASSERT(!rs.mtp_in.empty(), "forward_mtp needs add_mtp_state(rs)");
  const MtpWeights& m = w_.mtp[size_t(k)];
  const int n = lay.n;
  const int64_t T = rs.max_tokens, H = c.hidden_size;
  TRELLM_ASSERT(hidden.dtype == DType::F32 && hidden.rows() == n && hidden.cols() == H, "MTP hidden input ",
                shape_str(hidden), " for ", n, " rows of ", H);
  const float eps = float(c.rms_norm_eps);
  TensorView stage_e(rs.mtp_stage.data, DType::F32, {n, H});
  TensorView stage_h(rs.mtp_stage[T].data, DType::F32, {n, H});
  // hnorm(h_p) first: `hidden` may be rs.x or rs.h, which the rest overwrites
  B.rms_norm(stage_h, hidden, m.hnorm, eps);
  TensorView e = rows(rs.y, n);
  B.embed(e, rows(rs.tokens, n), m.embed_tokens.empty() ? w_.embed_tokens : m.embed_tokens);
  B.rms_norm(stage_e, e, m.enorm, eps);
  // No token precedes position 0, so its embedding half is zero (vLLM's deepseek_mtp, SGLang's NextN).
  for (int i : first) B.gather_rows(TensorView(stage_e[i].data, DType::F32, {1, H}), rs.mtp_zero, rs.mtp_zero_idx);
  // x = eh_proj(concat(enorm(e), hnorm(h))), the embedding half first
  TensorView cat(rs.mtp_in.data, DType::F32, {2 * int64_t(n), H});
  B.gather_rows(cat, rs.mtp_stage, rows(rs.mtp_idx, 2 * int64_t(n)));
  TensorView h = rows(rs.h, n);
  B.matmul(h, TensorView(rs.mtp_in.data, DType::F32, {n, 2 * H}), m.eh_proj);
  if (rs.timer) rs.timer->mark(Part::Embed);
  // one decoder layer on its own latent cache (positions and block tables as the main model's rows)
  B.rms_norm(rows(rs.x, n), h, m.layer.input_layernorm, eps);
  decoder_layer(m.layer, m.sparse, mtp_kv.layers[size_t(k)], rs, n, positions(rs, lay), m.shared_head_norm);
  // rs.h: the layer's output; rs.x: shared_head.norm of it; logits predict the token after b.tokens' own
  logits_of(rs, lay, m.shared_head);
}

}  // namespace trellm
