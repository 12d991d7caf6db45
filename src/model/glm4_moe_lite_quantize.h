// Quantizing a GLM-4.7-Flash checkpoint to EXL3 (`trellm quantize`): which Linears are trellis-coded, how the
// bits are allocated among them, calibration Hessians captured with the model's own forward pass (on the CPU
// backend, or on the GPU with the sums in device memory), and the directory writer (src/quant/exl3_checkpoint.h)
// driven with that plan.
//
// Kept unquantized (copied byte for byte): embeddings, every norm, the router (mlp.gate.weight),
// e_score_correction_bias, and the MTP layer (model.layers.<num_hidden_layers>.*) unless mtp_bits asks for it.
// Trellis-coded: every Linear of the decoder (attention projections, dense MLP, routed and shared experts) at the
// allocated K, lm_head at head_bits (unless tied to the embedding, or head_bits = 16), and with mtp_bits the MTP
// layer's Linears at that K (eh_proj and its decoder layer's; shared_head.head at head_bits, as lm_head). The MTP
// Linears come after lm_head in the plan, outside the bit budget, so the main model's codes (Linear i is seeded
// with seed + i) are the same with or without them.
//
// Calibration (TRELLIS.md §4.1), what we do and why:
//  - By default (LayerCapture) layer by layer, as exllamav3 does: layer l's Hessians come from its unquantized
//    weights applied to the stream the already-quantized layers before it produce, so each layer is calibrated on
//    the inputs it will see when the model runs quantized. One layer's weights are loaded at a time and the residual
//    stream of all calibration tokens stays resident, so the capture needs ~one layer of memory (a model larger than
//    the GPU works). The quantizer drains its pipeline at each layer (the layer's codes must be written before the
//    next layer's inputs exist); a resume runs the finished layers from their files again, which gives the same
//    stream, so a resumed run still writes exactly the files an uninterrupted one would.
//  - With `inputs` Original (HessianCapture) every Hessian comes from the unquantized model: one capture serves
//    every Linear whatever the order, and the Hessians can be cached for other bit widths (--hessian-cache).
//    Captures run in windows of consecutive layers whose accumulators fit `memory_budget` (one pass over the
//    calibration tokens per window; one window for small models). The real GLM-4.7-Flash needs ~150 GB of
//    double accumulators for all 47 layers at once, ~3.4 GB per MoE layer (~4 GB on the GPU, with the pending
//    rows): 8 layers per pass on the CPU's default budget, ~17 beside the bf16 model on an H200.
//  - Each Linear sees exactly the rows it is applied to: routed experts only the tokens routed to them,
//    kv_b_proj the normalised latents c_kv. Linears with one input share one Hessian (q_a/kv_a, gate/up).
//  - The MTP layer (with mtp_bits) is calibrated as it runs when drafting: the MTP forward (Model::forward_mtp) on
//    the calibration rows, row p fed t[p+1] and the main model's final h_p (the last row of a calibration row, whose
//    t[p+1] is not in the data, is left out); shared_head.head sees every one of them.
//  - A Linear that saw fewer than min_rows_factor·in rows (rare experts) falls back to plain per-tile Viterbi;
//    we do not activate all experts during capture as exllamav3 does (the 64x expert compute is not affordable
//    in a CPU capture, and the routing stays the model's own).
//  - On the GPU the forward is the CUDA backend's, whose products round activations to bf16 (beyond 64 rows) and
//    whose latent cache is bf16: its Hessians agree with the CPU's to ~0.3 % (tiny_b), so the codes differ; the
//    capture device and the inputs' origin are recorded with every finished Linear, and a resume that differs in
//    either redoes them.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "model/glm4_moe_lite.h"
#include "quant/exl3_checkpoint.h"

namespace trellm {

namespace trellis {
class HessianCudaContext;
}

// Which part of the model a Linear belongs to (bit allocation groups, inspect tables).
enum class LinearPart { Attention, DenseMlp, SharedExpert, RoutedExpert, Head, Mtp };
// "attention", "dense mlp", "shared expert", "routed experts", "lm_head", "mtp" (eh_proj, shared_head.head)
const char* linear_part_name(LinearPart p);

struct LinearSpec {
  std::string key;          // module key: the checkpoint holds key + ".weight" [out, in]
  int64_t in = 0, out = 0;
  LinearPart part = LinearPart::Attention;
  int64_t layer = 0;        // decoder layer; num_hidden_layers for lm_head
  // Linears applied to the same activations share one Hessian: "<layer>.self_attn.in" for q_a/q (and
  // kv_a_proj_with_mqa), "<expert>.in" for gate/up; every other Linear is its own group (its key).
  std::string input_group;
};

// Every Linear of the model in forward order (layer by layer, lm_head last; omitted when tied).
std::vector<LinearSpec> linear_specs(const Config& c);
// The Linears of the MTP layers (model.layers.<num_hidden_layers + k>.*, k < num_nextn_predict_layers): eh_proj
// (part Mtp), the MoE decoder layer's (parts as in a decoder layer, layer = num_hidden_layers + k) and
// shared_head.head (Mtp). The quantizer codes them with mtp_bits (else copies them); `inspect` reads them, dense or EXL3.
std::vector<LinearSpec> mtp_linear_specs(const Config& c);
bool is_mtp_head(const LinearSpec& s);  // model.layers.<l>.shared_head.head
// The same, each with the model's Linear it describes (the objects the backend ops receive).
std::vector<std::pair<LinearSpec, const Linear*>> model_linears(const Model& m);
// The MTP layers' Linears of a loaded model (those it holds: none when the checkpoint has no MTP tensors).
std::vector<std::pair<LinearSpec, const Linear*>> model_mtp_linears(const Model& m);
// Decoder layer l's Linears as the model holds them now (Model::load_layer), in forward order.
std::vector<std::pair<LinearSpec, const Linear*>> layer_linears(const Model& m, int64_t l);

// Bit allocation groups (TRELLIS.md §4.6), promoted in this order of priority: per layer the attention
// projections ("model.layers.i.self_attn", priority 2), the shared expert ("….mlp.shared_experts", 2), the
// dense MLP ("….mlp", 1), all routed experts of the layer together ("….mlp.experts", 0); within a priority the
// layers nearest either end of the stack first. lm_head is outside the budget (head_bits).
struct BitPlan {
  std::vector<trellis::QuantizePlanEntry> entries;  // forward order
  double decoder_bits = 0;  // the real average K of the decoder Linears, weighted by 128-padded numel
  double all_bits = 0;      // the same including lm_head
  double mtp_bits = 0;      // the same over the MTP layer's planned Linears (0: none planned)
};
BitPlan plan_bits(const std::vector<LinearSpec>& linears, double bits, int head_bits, trellis::Codebook codebook);

// What quantize_model asks a calibration for: HessianCapture (every Hessian from the unquantized model) or
// LayerCapture (layer by layer, each layer's inputs from the quantized layers before it).
class Calibration {
 public:
  virtual ~Calibration() = default;
  // (in, in) row-major for Linear `key` (a key of linear_specs), or empty when it saw too few rows. Calls in
  // forward order.
  virtual std::vector<float> hessian(const std::string& key) = 0;
  virtual int64_t rows_seen(const std::string& key) = 0;  // the rows behind hessian(key) (after capturing)
  virtual int64_t tokens() const = 0;
  // CheckpointQuantizeOptions::on_batch: the plan reached `batch` ("layer <l>"); the Linears before it are
  // finished in work_dir.
  virtual void on_batch(const std::string& batch, const std::string& work_dir) {}
  // Where the capture's time went, one line ("" when there is nothing to split).
  virtual std::string time_by_phase() const { return ""; }
};

// Hessians H = XᵀX / rows of each Linear's inputs over calibration token rows, from the unquantized model
// running on a backend with a Linear observer (see the file comment): the CPU, or the GPU with the accumulators in
// device memory (hessian_cuda.h).
class HessianCapture final : public Calibration {
 public:
  struct Options {
    // Where each layer's inputs come from: the layers before it as quantized (layer by layer, exllamav3's order;
    // LayerCapture) or the unquantized model (HessianCapture). Auto: quantized, unless a Hessian cache is kept (it
    // holds the unquantized model's Hessians, the same for every bit width).
    enum class Inputs { Auto, Quantized, Original };
    Inputs inputs = Inputs::Auto;
    // Where the forward runs and the Hessians are summed: the CPU, or the encoder's GPU (--device cuda:N). The GPU
    // computes its products with bf16 activations, so its Hessians agree with the CPU's to ~1e-2, not bit for bit.
    trellis::EncodeDevice device = trellis::EncodeDevice::Cpu;
    int64_t chunk = 0;                // tokens per forward step; 0: 128 on the CPU, 2048 on the GPU
    double min_rows_factor = 2.0;     // fewer rows than this × in: no Hessian (plain Viterbi)
    // Bytes of accumulators per capture window; 0: 8 GiB on the CPU, on the GPU the device memory left after the
    // model less 12 GiB (the forward's scratch and the encoder beside it).
    uint64_t memory_budget = 0;
    // Non-empty: keep the Hessians in this folder (one f32 safetensors file per input group) and reuse them when
    // the model's tensors, the calibration rows and `chunk` are the same. The capture is a CPU forward pass over
    // every calibration token (3 min for 256 x 1024 tokens of the built-in model on 2 cores), the same for every
    // bit width; a cached Hessian is the same f32 matrix, so the codes are too.
    std::string cache_dir;
    // Also capture the Hessians of the MTP layer's Linears (keys of mtp_linear_specs; the model must hold its MTP
    // layer, and only one: the capture runs layer 0 on the main model's hidden states as drafting's first step does).
    bool mtp = false;
    std::function<void(const std::string&)> on_note;  // one line per capture pass (and the first cache hit)
    // After every forward chunk of a capture pass: pass number (1-based), calibration tokens done and in all. The
    // passes are the long CPU part of a conversion, so `trellm quantize` draws them as a progress bar with an ETA.
    std::function<void(int pass, int64_t done, int64_t total)> on_capture_progress;
  };
  // Loads `model_dir` on its own backend (Options::device). Token ids must be < vocab_size (an Error otherwise).
  HessianCapture(const std::string& model_dir, std::vector<std::vector<int32_t>> rows, Options opt);
  ~HessianCapture();
  // Captures the window holding key's layer first if needed (one pass per window).
  std::vector<float> hessian(const std::string& key) override;
  int64_t rows_seen(const std::string& key) override;
  int passes() const { return passes_; }      // capture passes run (not counting Hessians from the cache)
  int64_t cache_hits() const { return cache_hits_; }
  int64_t tokens() const override;

 private:
  void capture(int64_t first_layer);
  const LinearSpec& spec(const std::string& key) const;
  bool in_window(const LinearSpec& s) const;
  bool load_cached(const LinearSpec& s, std::vector<float>& h, int64_t& rows);
  void save_window() const;
  std::string cache_key_;  // what a cached Hessian depends on (model tensors, calibration rows, chunk)
  int64_t cache_hits_ = 0;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<trellis::HessianCudaContext> cuda_;  // the GPU accumulators' stream and cuBLAS handle
  std::unique_ptr<Model> model_;
  std::vector<std::vector<int32_t>> rows_;
  Options opt_;
  std::vector<std::pair<LinearSpec, const Linear*>> linears_;
  std::map<std::string, size_t> by_key_;
  struct Window;
  std::unique_ptr<Window> window_;
  RunState rs_;            // sized at the first pass, reused (the model keeps its allocations)
  KvCache kv_;
  KvCache mtp_kv_;         // the MTP layer's latent cache (opt_.mtp)
  bool rs_ready_ = false;
  int passes_ = 0;
};

// The Hessians layer by layer, as exllamav3 captures them: decoder layer l is loaded alone (Model::load_layer: one
// layer's weights on the backend, so a model larger than the GPU works), the residual stream of every calibration
// token stays resident ([tokens, hidden] f32: 2.1 GB for 128 x 2048 tokens of GLM-4.7-Flash), and layer l's Hessians
// come from its unquantized weights on the stream its quantized predecessors produced: once the quantizer has
// finished layer l (CheckpointQuantizeOptions::on_batch), layer l is loaded again from its codes in the work
// directory and run over the stream. With Options::inputs Original the stream runs the unquantized layers instead,
// which gives HessianCapture's Hessians bit for bit on the CPU. Each layer is one pass over the tokens; a resumed
// conversion runs the finished layers from their files again (deterministic: the same Hessians). With opt.mtp the
// MTP layer is calibrated after lm_head on the final hidden states, as HessianCapture does. No Hessian cache (it
// holds the unquantized model's Hessians).
class LayerCapture final : public Calibration {
 public:
  // planned: the keys the quantizer trellis-codes (the others run as stored). opt.inputs Auto counts as Quantized;
  // opt.memory_budget and cache_dir do not apply.
  LayerCapture(const std::string& model_dir, std::vector<std::vector<int32_t>> rows, std::set<std::string> planned,
               HessianCapture::Options opt);
  ~LayerCapture() override;
  std::vector<float> hessian(const std::string& key) override;
  int64_t rows_seen(const std::string& key) override;
  int64_t tokens() const override { return tokens_; }
  void on_batch(const std::string& batch, const std::string& work_dir) override;
  int passes() const;  // layers observed (and lm_head)
  // Seconds in: loading layers (unquantized and quantized), the observed passes (Hessians summed), the quantized
  // passes (the stream moved on), copying Hessians out.
  std::string time_by_phase() const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t tokens_ = 0;
};

// Errors naming the row: an empty row, one longer than max_position_embeddings, a token id outside the vocabulary.
void check_calibration_rows(const std::vector<std::vector<int32_t>>& rows, const Config& c);

// "<rows> rows, fnv1a <hash>" of calibration token rows (recorded with quantized Linears and cached Hessians).
std::string calibration_fingerprint(const std::vector<std::vector<int32_t>>& rows);

struct QuantizeModelOptions {
  std::string out_dir;
  double bits = 4.0;                  // average K of the decoder Linears, 1..8 (fractional: allocated)
  int head_bits = 6;                  // lm_head K, 1..8; 16 keeps it unquantized
  // K of the MTP layer's Linears (eh_proj and its decoder layer's), 1..8, with shared_head.head at head_bits; 16
  // (default) keeps the MTP layer unquantized. With calibration they get LDLQ (an MTP capture pass, see above).
  int mtp_bits = 16;
  trellis::Codebook codebook = trellis::Codebook::Mcg;
  std::vector<std::vector<int32_t>> calibration;  // token rows; empty: plain per-tile Viterbi everywhere
  int64_t calibration_cols = 0;       // the row length asked for (recorded in quantization_config)
  HessianCapture::Options capture;
  bool force = false;                 // replace an existing complete model at out_dir
  bool scale_search = true;           // the encoder's global scale search (TRELLIS.md §4.3)
  trellis::EncodeDevice device = trellis::EncodeDevice::Cpu;  // where the Viterbi runs (same codes on both)
  uint64_t seed = 0;                  // sign flips: Linear i uses seed + i
  uint64_t shard_bytes = 8192ull << 20;
  int64_t stop_after = 0;             // > 0: stop after encoding this many Linears (tests of resuming)
  int group_linears = 64;             // Linears of one shape and K encoded together (CheckpointQuantizeOptions)
  std::optional<uint64_t> ahead_bytes;  // later groups rotated ahead (CheckpointQuantizeOptions; unset: its default)
  std::function<bool(const LinearSpec&)> select;  // quantize only these (tests); the others stay dense
  std::function<void(const trellis::QuantizeProgress&)> on_progress;
  std::function<void(const std::string&)> on_note;  // plan and calibration summaries, one line each
};

struct QuantizeModelResult {
  BitPlan plan;
  int64_t reused = 0;        // Linears taken from an interrupted earlier run
  int64_t ldlq = 0;          // encoded with a Hessian (LDLQ)
  int64_t plain = 0;         // encoded with plain per-tile Viterbi (no calibration)
  int64_t few_rows = 0;      // of those, Linears whose calibration rows were too few
  int64_t mtp = 0;           // MTP-layer Linears in the plan (mtp_bits)
  bool stopped = false;      // stop_after reached: out_dir + ".partial" holds the work so far
  double calibration_seconds = 0;  // wall time in the calibration capture (its load, passes and Hessian copies)
  trellis::EncodeTimes encode_times;  // the encoder's phases, summed (the CPU and GPU halves overlap)
};

// Quantizes the HF checkpoint `in_dir` (bf16 / f16 / f32, sharded or not) into opt.out_dir. Errors (trellm::Error)
// name the file, tensor or option: an already-quantized or unknown model, fused 3-D experts, missing tensors,
// bits out of range, an existing out_dir (unless force and it holds a model).
QuantizeModelResult quantize_model(const std::string& in_dir, const QuantizeModelOptions& opt);

}  // namespace trellm
