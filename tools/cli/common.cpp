#include "common.h"

#include <unistd.h>

#include <climits>
#include <filesystem>
#include <sstream>

#include "core/error.h"

namespace trellm::cli {

namespace fs = std::filesystem;

std::string default_model_dir() {
  // Next to the build tree (build/trellm -> ../<dir>), else the source tree this binary was built from.
  // The built-in model is the 3-bit EXL3 quantization of models/tiny-glm (made by `trellm quantize`,
  // models/tiny-glm-3bit/README.md); the bf16 original stays in models/tiny-glm as the reference for --ref.
  const char* rel = "models/tiny-glm-3bit";
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n > 0) {
    buf[n] = 0;
    fs::path p = fs::path(buf).parent_path().parent_path() / rel;
    if (fs::exists(p / "config.json")) return p.string();
  }
  return std::string(TRELLM_SOURCE_DIR) + "/" + rel;
}

std::string resolve_model(const std::string& given) {
  if (!given.empty()) return given;
  std::string d = default_model_dir();
  std::fprintf(stderr, "trellm: no --model given; using the built-in model %s (tiny-glm-3bit: 7.4 M parameters + a 1.9 M MTP layer, the GLM-4.7-Flash architecture trained on Jane Austen and chat fine-tuned, 3-bit EXL3)\n", d.c_str());
  return d;
}

std::vector<int32_t> parse_ids(const std::string& csv) {
  std::vector<int32_t> ids;
  std::string s = csv;
  for (char& c : s)
    if (c == ',') c = ' ';
  std::istringstream in(s);
  std::string tok;
  while (in >> tok) {
    char* end = nullptr;
    long v = std::strtol(tok.c_str(), &end, 10);
    if (*end || v < 0 || v > INT32_MAX) fail("--prompt-ids: \"", tok, "\" is not a token id");
    ids.push_back(int32_t(v));
  }
  if (ids.empty()) fail("--prompt-ids: no token ids given");
  return ids;
}

std::unique_ptr<Backend> make_backend(const std::string& device, const CudaOptions& cuda) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "auto") return cuda_available() ? make_cuda_backend(0, cuda) : make_cpu_backend();
  if (device == "cuda") return make_cuda_backend(0, cuda);
  if (device.rfind("cuda:", 0) == 0) return make_cuda_backend(std::atoi(device.c_str() + 5), cuda);
  fail("--device ", device, ": unknown device (cpu, cuda, cuda:N or auto)");
}

void add_cuda_options(CLI::App* cmd, CudaOptions& cuda) {
  cmd->add_option_function<std::string>(
         "--mla-prefill", [&cuda](const std::string& s) { cuda.mla_prefill = parse_mla_prefill(s, "--mla-prefill"); },
         "GPU MLA prefill form: auto (the one with fewer MACs per call), absorbed or expanded (the same function; "
         "for A/B measurements)")
      ->default_str("auto");
}

}  // namespace trellm::cli

namespace trellm::cli {

Tokenizer load_tokenizer(const std::string& dir) {
  const std::string path = (fs::path(dir) / "tokenizer.json").string();
  if (!fs::exists(path)) fail(dir, ": the model has no tokenizer.json (give token ids with --prompt-ids instead)");
  return Tokenizer::from_file(path);
}

}  // namespace trellm::cli
