// Byte-level BPE tokenizer with exact Hugging Face `tokenizers` semantics for the model family GLM-4.7 belongs
// to (Llama-3 / Qwen / DeepSeek style tokenizer.json): added tokens split out first, normalizer, pre-tokenizers
// (Split regex, ByteLevel, Digits, Sequence), BPE by merge rank, post-processor special tokens, byte-level
// decoding with HF's U+FFFD repair, and a streaming decoder. Safe to use from several threads at once.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "format/tokenizer_json.h"

namespace trellm {

class Tokenizer {
 public:
  explicit Tokenizer(const format::TokenizerJson& spec);
  static Tokenizer from_file(const std::string& path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Token ids of `text` (valid UTF-8; invalid input is a trellm::Error naming the byte offset). With
  // add_special_tokens the post-processor's tokens (e.g. Llama-3's BOS) are added, like HF's encode().
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // Text of `ids`, like HF's decode(): invalid byte sequences become U+FFFD; unknown ids are skipped.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The token's string as stored in tokenizer.json (byte-level mapped), or nullopt for an unknown id.
  std::optional<std::string> id_to_token(int32_t id) const;
  // Raw bytes the decoder produces for one token (may be part of a UTF-8 character); false if unknown id.
  bool token_bytes(int32_t id, std::string& out) const;
  bool is_special(int32_t id) const;
  // One past the largest id of the vocabulary or the added tokens (the size an embedding table needs).
  int32_t vocab_size() const;
  const std::vector<format::AddedToken>& added_tokens() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer for streaming: push ids one at a time and get the text they complete. Never emits
// part of a UTF-8 character; bytes that can no longer form a valid character become U+FFFD exactly as decode()
// of the whole sequence would produce, so the concatenated output equals decode(all ids).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tok_(&tokenizer), skip_special_(skip_special_tokens) {}
  std::string push(int32_t id);
  // Flushes what is still pending (an incomplete character becomes U+FFFD) and resets.
  std::string finish();

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace trellm
