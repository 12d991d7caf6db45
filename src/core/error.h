// Errors: a user-facing exception that names what was wrong, and an invariant check that aborts.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace trellm {

// Thrown for bad input (files, configs, requests, CLI arguments). The message names the file, tensor,
// field or parameter and what was expected; callers at the top level print it and carry on or exit 1.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(str_cat(std::forward<Args>(args)...));
}

[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace trellm

// Internal invariant: a bug in trellm, not in the input. Aborts with expression, file and line.
#define TRELLM_ASSERT(cond, ...)                                                                 \
  do {                                                                                           \
    if (!(cond)) ::trellm::assert_fail(#cond, __FILE__, __LINE__, ::trellm::str_cat("" __VA_ARGS__)); \
  } while (0)
