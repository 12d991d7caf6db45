// Shared by the libFuzzer targets: a scratch directory on tmpfs for loaders that read files, and the rule that a
// trellm::Error is a normal rejection. Anything else that escapes (another exception type, an assert, a sanitizer
// report, a signal) is a finding: libFuzzer records the input that caused it.
#pragma once
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

#include "core/error.h"
#include "core/log.h"

namespace trellm::fuzz {

// Warnings (e.g. a config.json whose first_k_dense_replace disagrees with mlp_layer_types) are not findings and
// would flood the fuzzer's output.
inline const bool kQuietLogs = (set_log_level(LogLevel::Quiet), true);

// A private directory (on /dev/shm when there is one: every iteration writes its input there), removed at exit.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path().string();
    std::string tmpl = base + "/trellm_fuzz_XXXXXX";
    if (!mkdtemp(tmpl.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    static std::string keep = tmpl;
    std::atexit([] { std::error_code ec; std::filesystem::remove_all(keep, ec); });
    return tmpl;
  }();
  return dir;
}

// Writes the bytes to `path` (replacing it). A failure here is the harness's, not the library's: abort.
inline void write_bytes(const std::string& path, const void* data, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  const char* p = static_cast<const char*>(data);
  while (size) {
    ssize_t n = ::write(fd, p, size);
    if (n <= 0) {
      std::perror("write");
      std::abort();
    }
    p += n;
    size -= size_t(n);
  }
  ::close(fd);
}

// Runs fn; a trellm::Error (bad input, clearly reported) is the expected way to refuse it.
template <typename Fn>
bool accepts(Fn&& fn) {
  try {
    fn();
    return true;
  } catch (const trellm::Error&) {
    return false;
  }
}

// Splits "a\0b" at the first NUL: a = the part before, b = the rest (empty, has_rest = false, without a NUL).
struct Split {
  std::string_view first, rest;
  bool has_rest = false;
};
inline Split split_at_nul(const uint8_t* data, size_t size) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  size_t z = all.find('\0');
  if (z == std::string_view::npos) return {all, {}, false};
  return {all.substr(0, z), all.substr(z + 1), true};
}

}  // namespace trellm::fuzz
