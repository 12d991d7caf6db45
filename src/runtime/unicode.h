// UTF-8 helpers shared by the tokenizer, the chat template engine and the output parser.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace trellm {

// Appends the UTF-8 encoding of code point `cp` (must be a scalar value) to `out`.
void utf8_append(std::string& out, uint32_t cp);

// Decodes the character at s[i] of valid UTF-8 and advances i. Invalid input gives unspecified code points (validate
// first), but never a read past the end of s: a truncated sequence is U+FFFD and advances one byte.
uint32_t utf8_next(std::string_view s, size_t& i);

// Length of the well-formed UTF-8 sequence at the start of `s`, 0 if it is ill-formed, or -1 if `s` is a
// proper prefix of a well-formed sequence (more bytes could complete it).
int utf8_sequence_length(std::string_view s);

// Byte offset of the first ill-formed byte in `s`, or npos when `s` is valid UTF-8.
size_t utf8_find_invalid(std::string_view s);

// Converts bytes to valid UTF-8 the way Rust's String::from_utf8_lossy (and so HF tokenizers) does: every
// maximal ill-formed subsequence (Unicode §3.9, "substitution of maximal subparts") becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

// Unicode White_Space property (what Rust's char::is_whitespace tests).
bool is_unicode_whitespace(uint32_t cp);

// The GPT-2 byte <-> unicode map used by byte-level BPE: printable Latin-1 bytes map to themselves, the rest
// to U+0100.. in order.
struct ByteLevelMap {
  std::array<uint32_t, 256> byte_to_cp;
  std::array<std::string, 256> byte_to_utf8;
  // cp (< 0x144) -> byte, or -1.
  std::array<int16_t, 0x144> cp_to_byte;
  ByteLevelMap();
};
const ByteLevelMap& byte_level_map();

}  // namespace trellm
