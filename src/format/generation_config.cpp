#include "format/generation_config.h"

#include <filesystem>

#include "format/json_file.h"

namespace trellm {

GenerationConfig GenerationConfig::from_dir(const std::string& dir) {
  GenerationConfig g;
  std::string path = (std::filesystem::path(dir) / "generation_config.json").string();
  if (!std::filesystem::exists(path)) return g;
  json j = read_json_file(path);
  JsonFields f(j, path);
  if (f.has("do_sample")) g.do_sample = f.get_bool("do_sample", false);
  if (f.has("temperature")) g.temperature = f.get_num("temperature");
  if (f.has("top_p")) g.top_p = f.get_num("top_p");
  if (f.has("min_p")) g.min_p = f.get_num("min_p");
  if (f.has("top_k")) g.top_k = f.get_int("top_k");
  if (f.has("eos_token_id")) g.eos_token_id = f.get_int_list("eos_token_id");
  return g;
}

}  // namespace trellm
