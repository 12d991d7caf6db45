// generation_config.json: the model's default sampling settings and stop ids.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace trellm {

struct GenerationConfig {
  std::optional<bool> do_sample;
  std::optional<double> temperature, top_p, min_p;
  std::optional<int64_t> top_k;
  std::vector<int64_t> eos_token_id;

  // A missing file gives an empty config; a malformed one is an error naming the field.
  static GenerationConfig from_dir(const std::string& dir);
};

}  // namespace trellm
