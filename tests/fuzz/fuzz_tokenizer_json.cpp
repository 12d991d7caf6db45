// libFuzzer target: a tokenizer.json through the strict reader (format/tokenizer_json) and the runtime Tokenizer built
// from it; an accepted tokenizer then encodes and decodes a fixed mix of texts and ids (every pre-tokenizer,
// normalizer and decoder path it enabled runs once).
#include "format/tokenizer_json.h"
#include "fuzz_util.h"
#include "runtime/tokenizer.h"

using namespace trellm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::optional<Tokenizer> tok;
  if (!fuzz::accepts([&] { tok.emplace(format::parse_tokenizer_json(text, "tokenizer.json")); })) return 0;
  static const char* samples[] = {"", "Hello, world! It's 2024.", "  leading\tand\r\ntrailing  ", "ünïcödé 日本語 🙂 e\u0301",
                                  "<|endoftext|><|user|>[gMASK]<sop>", "1234567 x=3.14", "a\u00a0b\u2028c"};
  for (const char* s : samples) {
    for (bool special : {false, true}) {
      std::vector<int32_t> ids;
      if (!fuzz::accepts([&] { ids = tok->encode(s, special); })) continue;
      (void)tok->decode(ids, false);
      (void)tok->decode(ids, true);
    }
  }
  const int32_t n = tok->vocab_size();
  std::vector<int32_t> ids;
  for (int32_t i = -2; i < std::min<int32_t>(n + 2, 300); i++) ids.push_back(i);
  (void)tok->decode(ids, false);
  StreamDecoder sd(*tok);
  for (int32_t id : ids) (void)sd.push(id);
  (void)sd.finish();
  for (int32_t id : {0, n - 1, n, -1}) {
    (void)tok->id_to_token(id);
    (void)tok->is_special(id);
    std::string b;
    (void)tok->token_bytes(id, b);
  }
  for (const auto& a : tok->added_tokens()) (void)tok->token_to_id(a.content);
  return 0;
}
