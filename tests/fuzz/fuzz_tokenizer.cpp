// libFuzzer target: arbitrary bytes through real tokenizers (the built-in model's, the synthetic GLM ones and, when
// the build has unpacked them, Qwen3 / DeepSeek-V3 / OLMo: different pre-tokenizer regexes and normalizers).
// First byte: which tokenizer and mode; the rest is encoded as text and, read as 16-bit ids, decoded in one go and
// streamed. Invalid UTF-8 is a trellm::Error (a normal rejection). The streaming decoder must give exactly
// decode() of the whole sequence, as tokenizer.h promises.
#include <filesystem>

#include "fuzz_util.h"
#include "runtime/tokenizer.h"

using namespace trellm;

namespace {
std::vector<Tokenizer>& tokenizers() {
  static std::vector<Tokenizer> toks = [] {
    std::vector<Tokenizer> v;
    const std::string src = TRELLM_SOURCE_DIR;
    std::vector<std::string> paths = {src + "/models/tiny-glm/tokenizer.json",
                                      src + "/tests/data/tokenizers/glm4-synthetic/tokenizer.json",
                                      src + "/tests/data/tokenizers/glm4-synthetic-bos/tokenizer.json"};
    for (const char* name : {"qwen3", "deepseek-v3", "olmo2-dolma2", "gpt-neox-olmo"}) {
      std::string p = std::string(TRELLM_FUZZ_TOKENIZER_DIR) + "/" + name + "/tokenizer.json";
      if (std::filesystem::exists(p)) paths.push_back(p);
    }
    for (const auto& p : paths) v.push_back(Tokenizer::from_file(p));
    std::fprintf(stderr, "fuzz_tokenizer: %zu tokenizers\n", v.size());
    return v;
  }();
  return toks;
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)tokenizers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  auto& toks = tokenizers();
  const Tokenizer& tok = toks[data[0] % toks.size()];
  const bool special = data[0] & 0x80, skip = data[0] & 0x40;
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);

  std::vector<int32_t> ids;
  if (fuzz::accepts([&] { ids = tok.encode(text, special); })) {
    for (int32_t id : ids)
      if (id < 0 || id >= tok.vocab_size()) {
        std::fprintf(stderr, "fuzz_tokenizer: encode produced id %d outside 0..%d\n", id, tok.vocab_size() - 1);
        std::abort();
      }
    (void)tok.decode(ids, skip);
  }
  // The bytes as ids (a few unknown: negative or past the vocabulary), decoded whole and streamed.
  ids.clear();
  const uint32_t range = uint32_t(tok.vocab_size()) + 32;
  for (size_t i = 1; i + 1 < size; i += 2)
    ids.push_back(int32_t((uint32_t(data[i]) | uint32_t(data[i + 1]) << 8) % range) - 16);
  const std::string whole = tok.decode(ids, skip);
  StreamDecoder sd(tok, skip);
  std::string streamed;
  for (int32_t id : ids) streamed += sd.push(id);
  streamed += sd.finish();
  if (streamed != whole) {
    std::fprintf(stderr, "fuzz_tokenizer: streamed decode differs from decode()\n");
    std::abort();
  }
  return 0;
}
