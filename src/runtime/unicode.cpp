#include "runtime/unicode.h"

namespace trellm {

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

uint32_t utf8_next(std::string_view s, size_t& i) {
  uint8_t c = uint8_t(s[i]);
  if (c < 0x80) { i += 1; return c; }
  // A sequence cut off by the end of s (the Jinja interpreter's strings are not validated): U+FFFD, one byte, and
  // no read past the end (found by fuzz_jinja: libstdc++'s bounds assertion).
  const size_t n = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (i + n > s.size()) { i += 1; return 0xFFFD; }
  if (c < 0xE0) { uint32_t cp = ((c & 0x1F) << 6) | (uint8_t(s[i + 1]) & 0x3F); i += 2; return cp; }
  if (c < 0xF0) {
    uint32_t cp = ((c & 0x0F) << 12) | ((uint8_t(s[i + 1]) & 0x3F) << 6) | (uint8_t(s[i + 2]) & 0x3F);
    i += 3;
    return cp;
  }
  uint32_t cp = ((c & 0x07) << 18) | ((uint8_t(s[i + 1]) & 0x3F) << 12) | ((uint8_t(s[i + 2]) & 0x3F) << 6) |
                (uint8_t(s[i + 3]) & 0x3F);
  i += 4;
  return cp;
}

// Table 3-7 of the Unicode standard: the allowed range of the second byte depends on the first.
int utf8_sequence_length(std::string_view s) {
  if (s.empty()) return -1;
  uint8_t c = uint8_t(s[0]);
  if (c < 0x80) return 1;
  int n;
  uint8_t lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c == 0xE0) { n = 3; lo = 0xA0; }
  else if (c >= 0xE1 && c <= 0xEC) n = 3;
  else if (c == 0xED) { n = 3; hi = 0x9F; }
  else if (c >= 0xEE && c <= 0xEF) n = 3;
  else if (c == 0xF0) { n = 4; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) n = 4;
  else if (c == 0xF4) { n = 4; hi = 0x8F; }
  else return 0;
  for (int k = 1; k < n; k++) {
    if (size_t(k) >= s.size()) return -1;
    uint8_t b = uint8_t(s[k]);
    if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
  }
  return n;
}

size_t utf8_find_invalid(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) { i++; continue; }
    int n = utf8_sequence_length(s.substr(i));
    if (n <= 0) return i;
    i += size_t(n);
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) { out.push_back(s[i++]); continue; }
    int n = utf8_sequence_length(s.substr(i));
    if (n > 0) {
      out.append(s.substr(i, size_t(n)));
      i += size_t(n);
      continue;
    }
    // Ill-formed: skip the maximal prefix of a well-formed sequence (at least one byte) and emit one U+FFFD.
    size_t k = 1;
    while (i + k < s.size() && k < 4 && utf8_sequence_length(s.substr(i, k + 1)) == -1) k++;
    if (n == -1) k = s.size() - i;  // truncated at the end of the input: the whole tail is one maximal subpart
    out += "\xEF\xBF\xBD";
    i += k;
  }
  return out;
}

bool is_unicode_whitespace(uint32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

ByteLevelMap::ByteLevelMap() {
  cp_to_byte.fill(-1);
  uint32_t next = 256;
  for (int b = 0; b < 256; b++) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    uint32_t cp = printable ? uint32_t(b) : next++;
    byte_to_cp[b] = cp;
    byte_to_utf8[b].clear();
    utf8_append(byte_to_utf8[b], cp);
    cp_to_byte[cp] = int16_t(b);
  }
}

const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap m;
  return m;
}

}  // namespace trellm
