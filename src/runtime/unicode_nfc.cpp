// NFC per Unicode Standard Annex #15: decompose canonically (tables fully pre-expanded, Hangul by formula),
// reorder combining marks stably by combining class, then compose with the primary-composite table.
#include "runtime/unicode_nfc.h"

#include <algorithm>
#include <unordered_map>
#include <vector>

#include "runtime/unicode.h"

namespace trellm {
namespace {

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

struct Tables {
  std::vector<uint64_t> bmp_quick;  // one bit per BMP code point in the quick-check set
  std::unordered_map<uint32_t, uint8_t> ccc;
  std::unordered_map<uint32_t, std::pair<uint32_t, uint32_t>> decomp;  // cp -> (offset, length)
  std::unordered_map<uint64_t, uint32_t> compose;                      // (first << 32 | second) -> composite
  Tables() {
    using namespace nfc_data;
    bmp_quick.assign(0x10000 / 64, 0);
    for (size_t i = 0; i < kQuickCheck_size; i++)
      for (uint32_t cp = kQuickCheck[i].lo; cp <= kQuickCheck[i].hi && cp < 0x10000; cp++)
        bmp_quick[cp >> 6] |= uint64_t(1) << (cp & 63);
    for (size_t i = 0; i < kCombiningClass_size; i++) ccc[kCombiningClass[i].cp] = kCombiningClass[i].ccc;
    for (size_t i = 0; i < kDecomposition_size; i++)
      decomp[kDecomposition[i].cp] = {kDecomposition[i].offset, kDecomposition[i].length};
    for (size_t i = 0; i < kComposition_size; i++)
      compose[(uint64_t(kComposition[i].first) << 32) | kComposition[i].second] = kComposition[i].composite;
  }
  bool quick(uint32_t cp) const {
    if (cp < 0x10000) return (bmp_quick[cp >> 6] >> (cp & 63)) & 1;
    // Supplementary planes: binary search in the range list.
    const auto* b = nfc_data::kQuickCheck;
    const auto* e = b + nfc_data::kQuickCheck_size;
    const auto* it = std::upper_bound(b, e, cp, [](uint32_t v, const nfc_data::RangeEntry& r) { return v < r.lo; });
    return it != b && cp <= (it - 1)->hi;
  }
  uint8_t combining_class(uint32_t cp) const {
    if (cp < 0x300) return 0;
    auto it = ccc.find(cp);
    return it == ccc.end() ? 0 : it->second;
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto& t = tables();
  auto it = t.decomp.find(cp);
  if (it == t.decomp.end()) {
    out.push_back(cp);
    return;
  }
  for (uint32_t k = 0; k < it->second.second; k++) out.push_back(nfc_data::kDecompositionChars[it->second.first + k]);
}

// Returns the composite of (a, b), or 0 when they do not compose.
uint32_t compose_pair(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& t = tables();
  auto it = t.compose.find((uint64_t(a) << 32) | b);
  return it == t.compose.end() ? 0 : it->second;
}

}  // namespace

bool nfc_quick_check(std::string_view s) {
  const auto& t = tables();
  size_t i = 0;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) { i++; continue; }  // ASCII never changes nor combines with what follows
    if (t.quick(utf8_next(s, i))) return false;
  }
  return true;
}

std::string nfc_normalize(std::string_view s) {
  if (nfc_quick_check(s)) return std::string(s);
  const auto& t = tables();
  std::vector<uint32_t> cps;
  cps.reserve(s.size());
  for (size_t i = 0; i < s.size();) decompose(utf8_next(s, i), cps);
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < cps.size();) {
    if (t.combining_class(cps[i]) == 0) { i++; continue; }
    size_t j = i;
    while (j < cps.size() && t.combining_class(cps[j]) != 0) j++;
    std::stable_sort(cps.begin() + long(i), cps.begin() + long(j),
                     [&](uint32_t a, uint32_t b) { return t.combining_class(a) < t.combining_class(b); });
    i = j;
  }
  // Canonical composition: a character composes with the last starter unless blocked by an intervening
  // character of equal or higher class (or any starter).
  std::vector<uint32_t> out;
  out.reserve(cps.size());
  long starter = -1;
  int last_ccc = -1;
  for (uint32_t cp : cps) {
    int c = t.combining_class(cp);
    if (starter >= 0) {
      bool blocked = last_ccc != -1 && (last_ccc == 0 || last_ccc >= c);
      if (!blocked) {
        if (uint32_t comp = compose_pair(out[size_t(starter)], cp)) {
          out[size_t(starter)] = comp;
          continue;
        }
      }
    }
    if (c == 0) {
      starter = long(out.size());
      last_ccc = -1;
    } else {
      last_ccc = c;
    }
    out.push_back(cp);
  }
  std::string r;
  r.reserve(s.size());
  for (uint32_t cp : out) utf8_append(r, cp);
  return r;
}

}  // namespace trellm
