// A PCRE2 regex compiled once (UTF + UCP, JIT when available) and matched from any thread. PCRE2 gives the
// Unicode properties (\p{L}, \p{N}) and lookaheads that tokenizer pre-split patterns use.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace trellm {

class Regex {
 public:
  // `where` names the pattern's origin (file and JSON path) in the error thrown for a bad pattern.
  Regex(const std::string& pattern, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Finds the first match in subject at or after byte `start`. The subject must be valid UTF-8 (not checked
  // again here) and is matched alone: lookarounds never see text outside it.
  bool find(std::string_view subject, size_t start, size_t& match_begin, size_t& match_end) const;

  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code*
  bool jit_ = false;
};

}  // namespace trellm
