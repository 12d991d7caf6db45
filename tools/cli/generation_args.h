// Options shared by `run` and `chat`: model, device, context, sampling. Flags override the model's
// generation_config.json, which overrides transformers' defaults.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "format/generation_config.h"
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

  void add_to(CLI::App* cmd);
  // Sampling and stop settings for `dir`'s model.
  GenerateOptions options(const std::string& dir, int default_max_tokens) const;
  // The context to allocate for a model with max_position_embeddings = max_pos.
  int context(int64_t max_pos) const;
};

}  // namespace trellm::cli
