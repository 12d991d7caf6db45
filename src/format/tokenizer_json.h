// Reader for Hugging Face `tokenizer.json` files (the `tokenizers` library's serialization).
// It checks the structure strictly and keeps only what the runtime tokenizer needs; any component type the
// runtime does not implement is an error naming the type and its JSON path, never a silent difference.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace trellm::format {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool normalized = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// Normalizers: NFC, Sequence, Prepend, Replace, Strip.
struct NormalizerSpec {
  std::string type;
  std::vector<NormalizerSpec> children;  // Sequence
  std::string prepend;                   // Prepend
  std::string pattern;                   // Replace: a literal string or (pattern_is_regex) a regex
  bool pattern_is_regex = false;
  std::string content;                   // Replace
  bool strip_left = false, strip_right = false;  // Strip
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// Pre-tokenizers: Split, ByteLevel, Digits, Sequence.
struct PreTokenizerSpec {
  std::string type;
  std::vector<PreTokenizerSpec> children;  // Sequence
  std::string pattern;                     // Split: literal or (pattern_is_regex) regex
  bool pattern_is_regex = false;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = true;          // ByteLevel
  bool individual_digits = false; // Digits
};

// Decoders: ByteLevel, or a Sequence holding ByteLevel (the byte-level BPE family).
struct DecoderSpec {
  std::string type;
};

// Post-processors: ByteLevel (offsets only: adds nothing), TemplateProcessing, Sequence of those.
// Only what `encode(text, add_special_tokens=true)` of one sequence adds is kept.
struct PostProcessorSpec {
  bool present = false;
  // Ids added before / after the sequence for a single input when add_special_tokens is true.
  std::vector<int32_t> prefix_ids, suffix_ids;
};

struct BpeModelSpec {
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
};

struct TokenizerJson {
  std::string source;  // file name, for messages
  std::vector<AddedToken> added_tokens;
  std::optional<NormalizerSpec> normalizer;
  std::optional<PreTokenizerSpec> pre_tokenizer;
  std::optional<DecoderSpec> decoder;
  PostProcessorSpec post_processor;
  BpeModelSpec model;
};

// Parses the text of a tokenizer.json; `source` names it in error messages. Throws trellm::Error.
TokenizerJson parse_tokenizer_json(const std::string& text, const std::string& source);
// Reads and parses a file. Throws trellm::Error.
TokenizerJson load_tokenizer_json(const std::string& path);

// Turns a byte offset into "line:column" (1-based) for error messages about text files.
std::string line_col(const std::string& text, size_t offset);

// Reads a whole file; throws trellm::Error naming the path on failure.
std::string read_text_file(const std::string& path);

}  // namespace trellm::format
