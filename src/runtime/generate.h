// The generation loop for one sequence: chunked prefill, then one token at a time through the KV cache,
// stopping on any EOS id or the token limit.
#pragma once
#include <functional>
#include <optional>
#include <vector>

#include "model/glm4_moe_lite.h"
#include "runtime/sampler.h"

namespace trellm {

struct GenerateOptions {
  int max_tokens = 128;           // new tokens
  SamplingParams sampling;
  bool stop_at_eos = true;
  int prefill_chunk = 512;        // rows per prefill forward
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

  // Generates after `prompt`; on_token is called with each new token (return false to stop early).
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                const std::function<bool(int32_t)>& on_token = nullptr,
                                GenerateStats* stats = nullptr);
  int context() const { return kv_.capacity; }

 private:
  Model& model_;
  RunState rs_;
  KvCache kv_;
  std::vector<float> logits_;  // host copy of one row
};

}  // namespace trellm
