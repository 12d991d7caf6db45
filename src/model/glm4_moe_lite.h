// GLM-4.7-Flash (Glm4MoeLiteForCausalLM, model_type "glm4_moe_lite"): Multi-head Latent Attention + a
// sigmoid-routed MoE with a shared expert. One definition for every backend and weight format.
// Facts and the reference forward pass: shared/GLM47FLASH.md; the oracle is transformers' modeling file.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "backend/arena.h"
#include "backend/backend.h"
#include "core/tensor.h"
#include "quant/trellis_weight.h"

namespace trellm {

class TensorStore;

// Named like the config.json keys. Values shown are the released GLM-4.7-Flash's.
struct Config {
  int64_t vocab_size = 0;             // 154880
  int64_t hidden_size = 0;            // 2048
  int64_t intermediate_size = 0;      // 10240 (dense MLP)
  int64_t moe_intermediate_size = 0;  // 1536 (each routed / shared expert)
  int64_t num_hidden_layers = 0;      // 47
  int64_t num_attention_heads = 0;    // 20
  int64_t num_key_value_heads = 0;    // 20 (informational: MLA shares one latent)
  int64_t n_shared_experts = 0;       // 1
  int64_t n_routed_experts = 0;       // 64
  double routed_scaling_factor = 1;   // 1.8
  int64_t kv_lora_rank = 0;           // 512
  int64_t q_lora_rank = 0;            // 768; 0 = no q LoRA (a plain q_proj)
  int64_t qk_rope_head_dim = 0;       // 64
  int64_t qk_nope_head_dim = 0;       // 192
  int64_t v_head_dim = 0;             // 256
  int64_t n_group = 1, topk_group = 1;
  int64_t num_experts_per_tok = 0;    // 4
  bool norm_topk_prob = true;
  std::string hidden_act;             // "silu"
  int64_t max_position_embeddings = 0;  // 202752
  double rms_norm_eps = 1e-5;
  double rope_theta = 1e6;            // rope_parameters.rope_theta (or legacy top-level rope_theta)
  bool rope_interleave = true;
  bool attention_bias = false;
  bool tie_word_embeddings = false;
  std::vector<bool> mlp_sparse;       // per layer, from mlp_layer_types or first_k_dense_replace
  std::vector<int64_t> eos_token_id;  // all of them stop generation
  int64_t pad_token_id = -1;
  int64_t bos_token_id = -1;
  int64_t num_nextn_predict_layers = 0;  // MTP layers shipped after the decoder layers
  std::optional<trellis::Exl3QuantConfig> exl3;  // quantization_config of an EXL3 checkpoint

  static Config from_json_file(const std::string& path);  // errors name the field
  static Config glm47_flash();       // the released GLM-4.7-Flash's values (for synthetic benchmarks)
  static Config glm47_flash_tiny();  // the same architecture shrunk to a few MB (smoke tests, CPU benches)
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  MlaDims mla() const;
  MoeRouting routing() const;
  RopeParams rope() const;
};

struct DenseMlp {
  Linear gate_proj, up_proj, down_proj;  // [inter, hidden], [inter, hidden], [hidden, inter]
};

struct LayerWeights {
  TensorView input_layernorm;           // [hidden]
  TensorView post_attention_layernorm;  // [hidden]
  // attention (MLA)
  Linear q_proj;                        // [heads*(nope+rope), hidden]   only when q_lora_rank == 0
  Linear q_a_proj;                      // [q_lora_rank, hidden]
  TensorView q_a_layernorm;             // [q_lora_rank]
  Linear q_b_proj;                      // [heads*(nope+rope), q_lora_rank]
  Linear kv_a_proj_with_mqa;            // [kv_rank + rope, hidden]
  TensorView kv_a_layernorm;            // [kv_rank]
  Linear kv_b_proj;                     // [heads*(nope+v), kv_rank]
  Linear o_proj;                        // [hidden, heads*v]
  // MLP: dense layers use `mlp`; sparse layers the router + experts + shared expert
  DenseMlp mlp;
  TensorView gate;                      // mlp.gate.weight [n_experts, hidden]
  TensorView e_score_correction_bias;   // [n_experts] f32 (selection only)
  std::vector<Expert> experts;          // n_experts × {gate, up, down}
  Expert shared;                        // mlp.shared_experts (intermediate = moe_inter * n_shared)
};

// One multi-token-prediction (MTP) module, stored as model.layers.<num_hidden_layers + k>.* (GLM-4.7-Flash and
// DeepSeek-V3 name it so; shared/GLM47FLASH.md): at position p it reads h_p (the main model's final hidden state
// after model.norm) and the embedding of token p+1, and predicts token p+2:
//   x = eh_proj(concat(enorm(embed(t[p+1])), hnorm(h_p)));  x = layer(x);  logits = shared_head(shared_head_norm(x))
struct MtpWeights {
  TensorView enorm;             // enorm.weight [hidden]
  TensorView hnorm;             // hnorm.weight [hidden]
  Linear eh_proj;               // eh_proj.weight [hidden, 2*hidden] (embedding half first)
  LayerWeights layer;           // a full decoder layer under the usual names (its own MLA latent cache)
  bool sparse = true;           // the layer's MLP is MoE (mlp.gate + experts), as in every released MTP layer
  TensorView shared_head_norm;  // shared_head.norm.weight [hidden]
  Linear shared_head;           // shared_head.head.weight [vocab, hidden]
  TensorView embed_tokens;      // embed_tokens.weight [vocab, hidden] when the checkpoint repeats it; else empty
                                // (the main model's model.embed_tokens is used)
};

struct Weights {
  TensorView embed_tokens;  // model.embed_tokens.weight [vocab, hidden]
  std::vector<LayerWeights> layers;
  TensorView norm;          // model.norm.weight [hidden]
  Linear lm_head;           // [vocab, hidden] (the embedding when tied)
  // config.num_nextn_predict_layers entries when the checkpoint holds them; empty when it does not (the model
  // runs without: nothing in forward() reads them)
  std::vector<MtpWeights> mtp;
};

// Optional per-part timing of a forward (benchmarks): the time between consecutive marks goes to the part
// that just ended. Events are recorded in the backend's stream order; read after the forward with collect().
enum class Part { Embed, AttnProj, AttnCore, AttnOut, Router, Experts, DenseMlp, MlpNorm, Head, Count };
constexpr const char* part_name(Part p) {
  // attn_proj: q_a + kv_a, q norm, q_b;  attn_core: rope, cache append, attention;  attn_out: o_proj;
  // router: residual add + post-attention norm + router (MoE layers; the dense layer counts them in dense_mlp);
  // experts (routed + shared; in MoE layers with the residual add + the next layer's norm, one fused op);
  // dense_mlp; mlp_norm: the dense layer's residual add + the next layer's norm;  head: lm_head
  const char* n[] = {"embed", "attn_proj", "attn_core", "attn_out", "router", "experts", "dense_mlp", "mlp_norm", "head"};
  return n[int(p)];
}
struct PartTimer {
  Backend* backend = nullptr;
  std::vector<std::pair<Part, int>> marks;  // (part that ended, event)
  int start = -1;
  void begin() { start = backend->record_event(); }
  void mark(Part p) { marks.emplace_back(p, backend->record_event()); }
  // Milliseconds per part since begin(); clears the marks.
  std::vector<double> collect();
};

// Scratch for one forward of up to max_tokens rows from up to max_seqs sequences; sized once, reused by every step.
struct RunState {
  int max_tokens = 0;
  int logit_rows = 0;
  int max_seqs = 0;       // block tables per step
  int max_blocks = 0;     // entries per block table (positions / kKvBlockTokens)
  TensorView tokens;      // I32 [max_tokens]
  TensorView pos;         // I32 [max_tokens] position of each row in its sequence
  TensorView seq;         // I32 [max_tokens] block table of each row (an index into tables)
  TensorView tables;      // I32 [max_seqs * max_blocks] the step's block tables (row stride: the step's table_stride)
  TensorView logit_idx;   // I32 [logit_rows] rows whose logits a step computes (Logits::Rows)
  TensorView h;           // residual stream [max_tokens, hidden]
  TensorView x;           // normed input [max_tokens, hidden]
  TensorView q_a;         // [max_tokens, q_lora_rank]
  TensorView q;           // [max_tokens, heads, nope+rope]
  TensorView kv;          // [max_tokens, kv_rank+rope]
  TensorView attn;        // [max_tokens, heads*v]
  TensorView y;           // [max_tokens, hidden]
  TensorView mlp_gate, mlp_up;  // [max_tokens, intermediate]
  TensorView moe_w;       // [max_tokens, top_k] f32
  TensorView moe_ids;     // [max_tokens, top_k] I32
  TensorView logits;      // [logit_rows, vocab]
  // The MTP layer's (Model::add_mtp_state; empty otherwise)
  TensorView mtp_stage;   // [2 * max_tokens, hidden] enorm(embed(t+1)) rows, then hnorm(h) rows from max_tokens on
  TensorView mtp_in;      // [max_tokens, 2 * hidden] their concatenation, eh_proj's input
  TensorView mtp_idx;     // I32 [2 * max_tokens] the gather that interleaves the two halves
  TensorView mtp_zero;    // [1, hidden] zeros (the embedding half at position 0)
  TensorView mtp_zero_idx;  // I32 [1] = 0
  std::vector<int32_t> host_pos, host_seq;  // staging, [max_tokens]
  std::vector<int32_t> host_table;          // the identity table of the single-sequence forward()
  PartTimer* timer = nullptr;     // set by benchmarks to time the parts of a forward
};

// The paged latent KV cache: per layer one pool of `blocks` blocks of kKvBlockTokens tokens, [blocks *
// kKvBlockTokens, kv_rank + rope] (576 values per token). Sequences address it through block tables
// (backend.h, Positions); the runtime's BlockManager decides which sequence owns which block.
struct KvCache {
  int blocks = 0;
  std::vector<TensorView> layers;
  int64_t token_capacity() const { return int64_t(blocks) * kKvBlockTokens; }
};

// Which rows of a step get logits (written to rs.logits[0..m) in this order).
enum class Logits {
  Last,  // the last row only (a single prompt chunk)
  All,   // every row (perplexity, teacher forcing; n <= rs.logit_rows)
  Rows,  // the rows listed in StepBatch::logit_rows (rs.logit_idx on the backend)
};

// One forward's rows as the host sees them: rows may come from many sequences (decode rows and prompt chunks).
// Row i is token tokens[i] at position pos[i] of the sequence whose block table is
// tables[seq[i] * table_stride .. + table_stride).
struct StepBatch {
  std::span<const int32_t> tokens, pos, seq;  // [n] each
  std::span<const int32_t> tables;            // [n_tables * table_stride]
  int table_stride = 0;
  std::span<const int> runs;                  // consecutive rows of one sequence (Positions::runs); empty: one run
  Logits logits = Logits::Last;
  std::span<const int32_t> logit_rows;        // Logits::Rows: row indices, each < n
};

// A model with random weights in a given format, built directly on the backend (no checkpoint): speed does
// not depend on weight values, so full-size benchmarks need no download.
struct SyntheticSpec {
  int bits = 3;        // K of every trellis-coded linear layer (0: dense bf16 weights)
  int head_bits = 6;   // K of lm_head (0: dense bf16)
  trellis::Codebook codebook = trellis::Codebook::Mcg;
  uint64_t seed = 1;
};

struct LoadOptions {
  // false: only the embeddings, model.norm and lm_head; the decoder layers are loaded one at a time by load_layer
  // (the layer-streamed calibration of `trellm quantize`, for a model larger than the GPU). The MTP layer then only
  // with `mtp`.
  bool layers = true;
  bool mtp = false;
};

class Model {
 public:
  // Loads config.json and the weights under `dir` onto `backend`.
  static std::unique_ptr<Model> load(const std::string& dir, Backend& backend, const LoadOptions& opt = {});
  static std::unique_ptr<Model> synthetic(const Config& config, Backend& backend, const SyntheticSpec& spec);
  // Writes the weights as a checkpoint directory (EXL3 tensors for trellis-coded Linears) that load() reads.
  void save(const std::string& dir) const;
  ~Model();

  const Config& config() const { return config_; }
  const Weights& weights() const { return w_; }
  Backend& backend() const { return *backend_; }

  // logit_rows: rows of rs.logits (max_tokens by default; 1 when only the last row's logits are wanted, which
  // saves max_tokens x vocab floats: 5 GB for an 8K chunk of GLM-4.7-Flash). max_seqs: block tables per step;
  // max_blocks: entries per table (default: enough for max_position_embeddings).
  RunState make_run_state(int max_tokens, int logit_rows = -1, int max_seqs = 1, int max_blocks = 0);
  // Bytes one decoded token reads: weights (routed experts at top_k / n_experts of their total, one embedding
  // row) plus, at `depth` cached tokens, the latent cache rows of every layer in `kv_dtype`.
  double weight_bytes_per_token() const;
  double kv_bytes_per_token(int depth, DType kv_dtype) const;
  double weight_bytes_total() const;
  double routed_expert_bytes_total() const;  // every routed expert of every layer (what batching reads more of)
  // Bytes of cache one token takes over all layers (576 values per layer in `kv_dtype`).
  double kv_bytes_per_cached_token(DType kv_dtype) const;
  // A paged latent cache of `blocks` blocks; dtype defaults to the backend's (CPU F32, CUDA BF16).
  KvCache make_kv_cache_blocks(int blocks, std::optional<DType> dtype = std::nullopt);
  // A paged cache with room for `capacity` tokens (ceil(capacity / kKvBlockTokens) blocks).
  KvCache make_kv_cache(int capacity, std::optional<DType> dtype = std::nullopt);

  // Runs one step: the rows of `b` (n <= rs.max_tokens, at most rs.max_seqs tables), appending each row to its
  // sequence's cache, then the logits `b.logits` asks for. Host data is uploaded here.
  void forward(RunState& rs, KvCache& kv, const StepBatch& b);
  // The single-sequence case: tokens at positions pos..pos+n-1 of one sequence that owns the whole cache
  // (block table 0, 1, 2, ...). Writes logits of every row to rs.logits when all_logits, else of the last row only
  // (into rs.logits[0]). `tokens` is on the host.
  void forward(RunState& rs, KvCache& kv, const int32_t* tokens, int n, int pos, bool all_logits);
  // The step with rs.tokens, rs.pos, rs.seq, rs.tables (and rs.logit_idx) already on the backend: a captured CUDA
  // graph replays this. bound: > every pos[i] (the tables' capacity when captured once for every position);
  // n_tables x table_stride: the tables' layout; runs: as in StepBatch; n_logits: rows of rs.logit_idx (Rows).
  struct Layout {
    int n = 0, bound = 0, n_tables = 1, table_stride = 0;
    std::span<const int> runs;
    Logits logits = Logits::Last;
    int n_logits = 0;
  };
  void forward_uploaded(RunState& rs, KvCache& kv, const Layout& l);

  // ---- the MTP layer(s), when the checkpoint has them (weights().mtp) ----
  // Sizes the MTP scratch in `rs` (once; 4 x hidden floats per row of rs.max_tokens).
  void add_mtp_state(RunState& rs);
  // The MTP layers' own latent caches, one pool per layer in the main cache's block layout (the same block tables
  // address both).
  KvCache make_mtp_kv_cache_blocks(int blocks, std::optional<DType> dtype = std::nullopt);
  // MTP layer k on the rows of `b`: row i is token t[p+1] = b.tokens[i] at position p = b.pos[i], with `hidden`
  // row i = h_p, the main model's final hidden state after model.norm ([n, hidden] f32 on the backend; rs.x after
  // forward() holds it for every row of that step, and may be passed as is). Appends each row to layer k's latent
  // cache in mtp_kv, writes the logits b.logits asks for (predicting t[p+2]) to rs.logits; rs.h keeps the layer's
  // output before shared_head.norm (what chained drafts feed back as h).
  void forward_mtp(RunState& rs, KvCache& mtp_kv, const StepBatch& b, TensorView hidden, int k = 0);
  // The same with the rows already on the backend (rs.tokens, pos, seq, tables, logit_idx), as forward_uploaded; no
  // row may be at position 0 (a captured draft step: its rows follow a verified token).
  void forward_mtp_uploaded(RunState& rs, KvCache& mtp_kv, const Layout& l, TensorView hidden, int k = 0);

  // ---- one layer at a time (the layer-streamed calibration) ----
  // Decoder layer l's weights from `store` (the checkpoint, or quantized Linears over it: TensorStore::overlay),
  // checked through the same name table as load(), into memory of their own; replaces what layer l held.
  void load_layer(int64_t l, const TensorStore& store);
  void release_layer(int64_t l);  // frees them (and the backend's caches of them)
  // Decoder layer l alone on rows 0..n of rs.h (the residual stream; h holds the layer's output afterwards), as
  // forward() runs it: positions pos..pos+n-1 of one sequence owning kv (blocks 0, 1, 2, ...); x = the layer's
  // input norm of h on entry, unspecified on exit.
  void forward_layer(int64_t l, RunState& rs, KvCache& kv, int n, int pos);

 private:
  KvCache cache_pools(int layers, int blocks, std::optional<DType> dtype);  // `layers` pools of `blocks` blocks
  Model() = default;
  TensorView alloc(DType t, std::initializer_list<int64_t> shape);
  Layout upload(RunState& rs, const KvCache& kv, const StepBatch& b);  // checks b, copies it to rs
  // Positions pos..pos+n-1 of one sequence owning kv (blocks 0, 1, 2, ...), laid out in rs's host buffers.
  StepBatch single_sequence(RunState& rs, const KvCache& kv, const int32_t* tokens, int n, int pos);
  static Positions positions(const RunState& rs, const Layout& lay);
  void decoder_layer(const LayerWeights& L, bool sparse, TensorView cache, RunState& rs, int n, const Positions& pos,
                     TensorView next_norm);
  void logits_of(RunState& rs, const Layout& lay, const Linear& head);
  // MTP layer k on the uploaded rows; `first`: the rows at position 0 (their embedding half is zero).
  void mtp_layer(RunState& rs, KvCache& mtp_kv, const Layout& lay, TensorView hidden, int k, std::span<const int> first);

  Config config_;
  Weights w_;
  Backend* backend_ = nullptr;
  std::unique_ptr<TensorStore> store_;
  Arena arena_;               // backend memory for weights and state, released on destruction
  std::vector<std::unique_ptr<trellis::TrellisWeight>> exl3_;  // descriptors the Linears point to
  struct LayerMemory {  // what load_layer placed for one layer
    explicit LayerMemory(Backend* b) : arena(b) {}
    Arena arena;
    std::vector<std::unique_ptr<trellis::TrellisWeight>> exl3;
  };
  std::map<int64_t, std::unique_ptr<LayerMemory>> layer_memory_;
  friend struct ModelLoader;
};

}  // namespace trellm
