// Unicode NFC normalization (canonical decomposition, canonical ordering, canonical composition) over UTF-8.
// The tables are generated from the Unicode Character Database by scripts/gen_unicode_nfc.py.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace trellm {

// True when `s` (valid UTF-8) holds no character that NFC could change: the fast path for almost all text.
bool nfc_quick_check(std::string_view s);
// NFC of valid UTF-8 text.
std::string nfc_normalize(std::string_view s);

namespace nfc_data {
struct CccEntry { uint32_t cp; uint8_t ccc; };
struct DecompEntry { uint32_t cp; uint32_t offset; uint32_t length; };  // into kDecompositionChars
struct CompEntry { uint32_t first, second, composite; };
struct RangeEntry { uint32_t lo, hi; };
extern const char* const kUnicodeVersion;
extern const CccEntry kCombiningClass[];
extern const size_t kCombiningClass_size;
extern const DecompEntry kDecomposition[];
extern const size_t kDecomposition_size;
extern const uint32_t kDecompositionChars[];
extern const size_t kDecompositionChars_size;
extern const CompEntry kComposition[];
extern const size_t kComposition_size;
extern const RangeEntry kQuickCheck[];
extern const size_t kQuickCheck_size;
}  // namespace nfc_data

}  // namespace trellm
