// libFuzzer target: the JSON files of a model directory that trellm reads besides the weights. One input is written
// as config.json (the GLM-4.7-Flash Config, quantization_config included), generation_config.json and
// tokenizer_config.json (its chat_template and special tokens), and handed to quantization_config's parser
// directly (as the object itself and as config.json's member) so that parser is reached without a valid Config.
#include <nlohmann/json.hpp>

#include "format/generation_config.h"
#include "format/json_file.h"
#include "fuzz_util.h"
#include "model/glm4_moe_lite.h"
#include "quant/trellis_weight.h"
#include "runtime/chat_template.h"

using namespace trellm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = fuzz::scratch_dir();
  fuzz::write_bytes(dir + "/config.json", data, size);
  fuzz::write_bytes(dir + "/generation_config.json", data, size);
  fuzz::write_bytes(dir + "/tokenizer_config.json", data, size);

  fuzz::accepts([&] { (void)Config::from_json_file(dir + "/config.json"); });
  fuzz::accepts([&] { (void)GenerationConfig::from_dir(dir); });
  fuzz::accepts([&] {
    ChatTemplate t = ChatTemplate::from_model_dir(dir);
    (void)t.render(nlohmann::ordered_json::array({{{"role", "user"}, {"content", "Hi"}}}), nullptr, true);
  });

  // As its callers do (config.json through read_json_file): the nesting bound first.
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (!fuzz::accepts([&] { check_json_depth(text, "config.json"); })) return 0;
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  fuzz::accepts([&] { (void)trellis::parse_exl3_quantization_config(j, "quantization_config.json"); });
  fuzz::accepts([&] { (void)trellis::exl3_config_from_model_config(j, "config.json"); });
  return 0;
}
