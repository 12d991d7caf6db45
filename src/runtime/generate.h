// The generation loop for one sequence: chunked prefill, then one token at a time through the KV cache,
// stopping on any EOS id or the token limit. Decoding runs as a captured step (a CUDA graph on the GPU) that
// samples the next token on the device, so the host only reads tokens back.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "model/glm4_moe_lite.h"
#include "runtime/sampler.h"

namespace trellm {

struct GenerateOptions {
  int max_tokens = 128;           // new tokens
  SamplingParams sampling;
  bool stop_at_eos = true;
  bool use_graph = true;          // replay a captured decode step that samples on the device
  int read_every = 1;             // launch this many steps between reads of the new tokens
  std::vector<int64_t> extra_stop_ids;  // stop tokens beside config.json's eos_token_id (generation_config's)
};

struct GenerateStats {
  int prompt_tokens = 0, generated = 0;
  double prefill_s = 0, decode_s = 0;
  bool hit_eos = false;
  double prefill_tok_s() const { return prefill_s > 0 ? prompt_tokens / prefill_s : 0; }
  double decode_tok_s() const { return decode_s > 0 && generated > 1 ? (generated - 1) / decode_s : 0; }
};

class Generator {
 public:
  // Sizes the run state and KV cache for `context` tokens (prompt + generated). kv_dtype: the latent cache's
  // element type (default: the backend's).
  Generator(Model& model, int context, int prefill_chunk = 512, std::optional<DType> kv_dtype = std::nullopt);
  ~Generator();
  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;

  // Generates after `prompt`; on_token is called with each new token (return false to stop early).
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                const std::function<bool(int32_t)>& on_token = nullptr,
                                GenerateStats* stats = nullptr);
  int context() const { return context_; }
  // Runs the prompt through the model (cache rows 0..P-1); the last row's logits are left in run_state().
  void prefill(const std::vector<int32_t>& prompt);
  RunState& run_state() { return rs_; }
  KvCache& kv_cache() { return kv_; }
  // Benchmark path: `steps` greedy steps launched back to back starting with `token` at position `pos` (the
  // cache rows before it are whatever they hold), then one read of the produced tokens.
  std::vector<int32_t> decode_steps(int32_t token, int pos, int steps);

 private:
  std::vector<int32_t> generate_graph(int P, int limit, const GenerateOptions& opt, const SamplingParams& sp,
                                      const std::function<bool(int32_t)>& on_token, GenerateStats& st);
  void ensure_step_captured();
  Model::Layout decode_layout() const;  // the captured step: one row of sequence 0 at any position below context

  Model& model_;
  int context_;
  RunState rs_;
  KvCache kv_;
  std::vector<float> logits_;        // host copy of one row
  TensorView history_;               // I32 [1 + context] on the backend: count, then sampled tokens
  TensorView params_;                // SamplingParams on the backend, read by the captured step
  std::unique_ptr<StepGraph> step_;  // captured decode step (built on first use)
  uint64_t step_epoch_ = 0;          // Backend::memory_epoch() when it was captured
};

}  // namespace trellm
