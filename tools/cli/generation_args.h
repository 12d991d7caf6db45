// Options shared by `run` and `chat`: model, device, context, sampling. Flags override the model's
// generation_config.json, which overrides transformers' defaults.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include <memory>

#include "format/generation_config.h"
#include "runtime/engine.h"
#include "runtime/generate.h"

namespace trellm::cli {

// The model's sampling defaults: generation_config.json's, else transformers' (temperature 1, filters off).
SamplingParams sampling_defaults(const GenerationConfig& gc);

struct GenerationArgs {
  std::string model, device = "auto";
  int max_tokens = -1, ctx = 0;  // max_tokens -1: the command's default; ctx 0: min(4096, max_position_embeddings)
  int top_k = -1;
  float temperature = -1, top_p = -1, min_p = -1;
  uint64_t seed = 0;
  bool ignore_eos = false;
  std::string speculative;  // "mtp": speculative decoding with the model's MTP layer
  int draft_tokens = 2;

  void add_to(CLI::App* cmd);
  // Sampling and stop settings for `dir`'s model.
  GenerateOptions options(const std::string& dir, int default_max_tokens) const;
  // The context to allocate for a model with max_position_embeddings = max_pos.
  int context(int64_t max_pos) const;
};

// One sequence through the batched engine, with Generator::generate's contract: `run` and `chat` use it for
// speculative decoding (--speculative mtp), which lives in the engine.
class EngineGenerator {
 public:
  EngineGenerator(Model& model, int context, int draft_tokens);
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                const std::function<bool(int32_t)>& on_token, GenerateStats* stats);
  Engine& engine() { return *engine_; }
  // "drafts accepted 412 of 600 (68.7 %), 2.37 tokens per step" for the tokens generated so far
  std::string acceptance() const;

 private:
  std::unique_ptr<Engine> engine_;
};

}  // namespace trellm::cli
