// Tokenizer tests. Expected ids and texts come from HF tokenizers (tests/data/tokenizers/expected/*.json,
// made by scripts/make_tokenizer_fixtures.py) or from the Unicode standard; never from trellm itself.
#include <gtest/gtest.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "format/tokenizer_json.h"
#include "runtime/tokenizer.h"
#include "runtime/unicode.h"
#include "runtime/unicode_nfc.h"

using namespace trellm;
using nlohmann::json;

namespace {

std::string tok_path(const std::string& name) { return std::string(TRELLM_TOKENIZER_DIR) + "/" + name + "/tokenizer.json"; }

// Loading the big files takes a moment: keep one Tokenizer per file for the whole test program.
const Tokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto& t = cache[name];
  if (!t) t = std::make_unique<Tokenizer>(Tokenizer::from_file(tok_path(name)));
  return *t;
}

std::string expect_message(const std::string& text) {
  try {
    Tokenizer t(format::parse_tokenizer_json(text, "bad.json"));
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A minimal valid byte-level tokenizer.json to mutate in error tests.
json minimal_tokenizer() {
  json vocab = json::object();
  const ByteLevelMap& bl = byte_level_map();
  for (int b = 0; b < 256; b++) vocab[bl.byte_to_utf8[size_t(b)]] = b;
  vocab["ab"] = 256;
  return json{{"version", "1.0"},
              {"added_tokens", json::array({json{{"id", 257}, {"content", "<|end|>"}, {"special", true},
                                                 {"normalized", false}, {"lstrip", false}, {"rstrip", false},
                                                 {"single_word", false}}})},
              {"normalizer", nullptr},
              {"pre_tokenizer", json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
              {"post_processor", nullptr},
              {"decoder", json{{"type", "ByteLevel"}}},
              {"model", json{{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"a b"})}}}};
}

}  // namespace

class HfParity : public ::testing::TestWithParam<std::string> {};

TEST_P(HfParity, EncodeAndDecodeMatchHfTokenizers) {
  const std::string name = GetParam();
  json expected = json::parse(format::read_text_file(std::string(TRELLM_TEST_DATA) + "/tokenizers/expected/" + name + ".json"));
  const Tokenizer& tok = tokenizer(name);
  int n = 0;
  for (const auto& c : expected["encode"]) {
    std::string text = c["text"];
    EXPECT_EQ(tok.encode(text, false), c["ids"].get<std::vector<int32_t>>()) << name << " text: " << json(text).dump();
    EXPECT_EQ(tok.encode(text, true), c["ids_special"].get<std::vector<int32_t>>()) << name << " text: " << json(text).dump();
    n++;
  }
  for (const auto& c : expected["decode"]) {
    auto ids = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.decode(ids, false), c["text"].get<std::string>()) << name << " ids: " << c["ids"].dump();
    EXPECT_EQ(tok.decode(ids, true), c["text_skip"].get<std::string>()) << name << " ids: " << c["ids"].dump();
    // Streaming one id at a time gives exactly the same text.
    StreamDecoder sd(tok);
    std::string streamed;
    for (int32_t id : ids) streamed += sd.push(id);
    streamed += sd.finish();
    EXPECT_EQ(streamed, c["text"].get<std::string>()) << name << " ids: " << c["ids"].dump();
    n++;
  }
  EXPECT_GE(n, 400);
}

INSTANTIATE_TEST_SUITE_P(Files, HfParity,
                         ::testing::Values("qwen3", "deepseek-v3", "olmo2-dolma2", "gpt-neox-olmo", "glm4-synthetic",
                                           "glm4-synthetic-bos"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& ch : s) if (ch == '-') ch = '_';
                           return s;
                         });

TEST(Tokenizer, GlmSpecialTokensAndLookups) {
  const Tokenizer& tok = tokenizer("glm4-synthetic");
  // Ids from GLM47FLASH.md.
  EXPECT_EQ(tok.token_to_id("[gMASK]"), 154822);
  EXPECT_EQ(tok.token_to_id("<|assistant|>"), 154828);
  EXPECT_EQ(tok.token_to_id("</think>"), 154842);
  EXPECT_EQ(tok.id_to_token(154829), "<|observation|>");
  EXPECT_TRUE(tok.is_special(154827));
  EXPECT_FALSE(tok.is_special(65));
  EXPECT_EQ(tok.vocab_size(), 154851);
  EXPECT_EQ(tok.encode("[gMASK]<sop><|user|>"), (std::vector<int32_t>{154822, 154824, 154827}));
  EXPECT_FALSE(tok.id_to_token(100000).has_value());  // a hole between the BPE vocab and the added tokens
}

TEST(Tokenizer, StreamDecoderNeverSplitsACharacter) {
  const Tokenizer& tok = tokenizer("glm4-synthetic");
  const ByteLevelMap& bl = byte_level_map();
  // "€" is E2 82 AC: feed it as three single-byte tokens.
  std::vector<int32_t> ids;
  for (unsigned char b : std::string("a\xE2\x82\xAC")) ids.push_back(*tok.token_to_id(bl.byte_to_utf8[b]));
  StreamDecoder sd(tok);
  EXPECT_EQ(sd.push(ids[0]), "a");
  EXPECT_EQ(sd.push(ids[1]), "");
  EXPECT_EQ(sd.push(ids[2]), "");
  EXPECT_EQ(sd.push(ids[3]), "\xE2\x82\xAC");
  // An incomplete character at the end becomes one U+FFFD, like HF's decode of the same ids.
  EXPECT_EQ(sd.push(ids[1]), "");
  EXPECT_EQ(sd.finish(), "\xEF\xBF\xBD");
  // A byte that breaks a pending sequence flushes it at once as U+FFFD.
  EXPECT_EQ(sd.push(ids[1]), "");
  EXPECT_EQ(sd.push(ids[0]), "\xEF\xBF\xBD" "a");
}

TEST(Unicode, LossyMatchesTheStandardsMaximalSubpartExample) {
  // Unicode 15 §3.9, Table 3-8: 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64 -> a FFFD FFFD FFFD b FFFD c FFFD FFFD d
  std::string in = "\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64";
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_lossy(in), "a" + R + R + R + "b" + R + "c" + R + R + "d");
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), R + R + R);  // a surrogate is three ill-formed bytes
  EXPECT_EQ(utf8_lossy("ok\xF0\x9F\x98"), "ok" + R);   // truncated at the end: one replacement
  EXPECT_EQ(utf8_find_invalid("abc\xC3"), 3u);
  EXPECT_EQ(utf8_find_invalid("\xC3\xA9"), std::string::npos);
}

TEST(Unicode, NfcCompositionOrderingAndHangul) {
  EXPECT_EQ(nfc_normalize("e\xCC\x81"), "\xC3\xA9");                       // e + U+0301 -> é
  EXPECT_EQ(nfc_normalize("\xE2\x84\xAB"), "\xC3\x85");                    // U+212B ANGSTROM SIGN -> Å
  EXPECT_EQ(nfc_normalize("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // jamo -> 각
  // q + dot above (230) + dot below (220): reordered to below, above; neither composes with q.
  EXPECT_EQ(nfc_normalize("q\xCC\x87\xCC\xA3"), "q\xCC\xA3\xCC\x87");
  // a + ring above composes even across a lower-class mark: a + U+0323 + U+030A -> ạ̊ (U+1EA1 U+030A)
  EXPECT_EQ(nfc_normalize("a\xCC\xA3\xCC\x8A"), "\xE1\xBA\xA1\xCC\x8A");
  EXPECT_TRUE(nfc_quick_check("plain ascii and 中文"));
  EXPECT_FALSE(nfc_quick_check("e\xCC\x81"));
}

TEST(Tokenizer, RejectsInvalidUtf8Input) {
  const Tokenizer& tok = tokenizer("glm4-synthetic");
  try {
    tok.encode("ok\xFFno");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("invalid UTF-8 at byte 2"), std::string::npos) << e.what();
  }
}

TEST(TokenizerErrors, MalformedJsonNamesLineAndColumn) {
  std::string msg = expect_message("{\n  \"model\": {\n    \"type\": \"BPE\",,\n  }\n}");
  EXPECT_NE(msg.find("bad.json:3:19: malformed JSON"), std::string::npos) << msg;
}

TEST(TokenizerErrors, UnknownComponentTypesNameTypeAndPath) {
  json j = minimal_tokenizer();
  j["pre_tokenizer"] = json{{"type", "Sequence"},
                            {"pretokenizers", json::array({json{{"type", "Metaspace"}, {"replacement", "_"}}})}};
  std::string msg = expect_message(j.dump());
  EXPECT_NE(msg.find("pre_tokenizer.pretokenizers[0]: unsupported pre_tokenizer type \"Metaspace\""), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["normalizer"] = json{{"type", "NFKC"}};
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("normalizer: unsupported normalizer type \"NFKC\""), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["model"]["type"] = "Unigram";
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("model.type: unsupported model type \"Unigram\""), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["decoder"] = json{{"type", "WordPiece"}};
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("decoder: unsupported decoder type \"WordPiece\""), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["post_processor"] = json{{"type", "Mystery"}};
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("post_processor: unsupported post_processor type \"Mystery\""), std::string::npos) << msg;
}

TEST(TokenizerErrors, BadFieldsAreNamed) {
  json j = minimal_tokenizer();
  j["model"]["merges"] = json::array({"a b", "a b c"});
  std::string msg = expect_message(j.dump());
  EXPECT_NE(msg.find("model.merges[1]: expected \"a b\""), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["model"]["merges"] = json::array({json::array({"a", "zz"})});
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("model.merges[0]: \"zz\" is not in the vocabulary"), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["pre_tokenizer"] = json{{"type", "Split"}, {"pattern", json{{"Regex", "(unclosed"}}}, {"behavior", "Isolated"},
                            {"invert", false}};
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("pre_tokenizer.pattern: invalid regex"), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["pre_tokenizer"] = json{{"type", "Split"}, {"pattern", json{{"Regex", "x"}}}, {"behavior", "Sideways"}};
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("pre_tokenizer.behavior: unknown split behavior \"Sideways\""), std::string::npos) << msg;

  j = minimal_tokenizer();
  j["added_tokens"][0]["id"] = "seven";
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("added_tokens[0].id: expected a non-negative integer"), std::string::npos) << msg;

  j = minimal_tokenizer();
  j.erase("model");
  msg = expect_message(j.dump());
  EXPECT_NE(msg.find("missing field \"model\""), std::string::npos) << msg;

  try {
    Tokenizer::from_file("/nonexistent/tokenizer.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tokenizer.json: cannot open file"), std::string::npos);
  }
}

TEST(Tokenizer, MinimalTokenizerMergesAndSplitsAddedTokens) {
  Tokenizer tok(format::parse_tokenizer_json(minimal_tokenizer().dump(), "mini.json"));
  // "ab" merges; "<|end|>" is an added token; ' ' is byte 0x20 -> 'Ġ' (id 32 here since vocab ids = bytes).
  EXPECT_EQ(tok.encode("ab<|end|> ab"), (std::vector<int32_t>{256, 257, 32, 256}));
  EXPECT_EQ(tok.decode(std::vector<int32_t>{256, 257, 32}), "ab<|end|> ");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{256, 257, 32}, true), "ab ");
}

TEST(Tokenizer, ConcurrentEncodesAgreeWithTheHfExpectations) {
  // One Tokenizer shared by threads (as the server does): the piece cache must not mix results up.
  json expected = json::parse(format::read_text_file(std::string(TRELLM_TEST_DATA) + "/tokenizers/expected/glm4-synthetic.json"));
  const Tokenizer& tok = tokenizer("glm4-synthetic");
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      for (size_t i = size_t(t); i < expected["encode"].size(); i += 2) {
        const auto& c = expected["encode"][i];
        if (tok.encode(c["text"].get<std::string>()) != c["ids"].get<std::vector<int32_t>>()) mismatches++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}
