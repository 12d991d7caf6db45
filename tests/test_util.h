// Shared helpers for tests: temporary directories, expecting an Error whose message contains a phrase.
#pragma once
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>

#include "core/error.h"

namespace trellm::testing {

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("trellm_test_" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string str() const { return path_.string(); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// Runs fn and expects a trellm::Error whose message contains `needle`.
inline void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

}  // namespace trellm::testing

// Expects `stmt` to throw trellm::Error whose message contains every given phrase.
#define EXPECT_ERROR_CONTAINS(stmt, ...)                                                       \
  do {                                                                                         \
    bool thrown_ = false;                                                                      \
    try {                                                                                      \
      stmt;                                                                                    \
    } catch (const ::trellm::Error& e_) {                                                      \
      thrown_ = true;                                                                          \
      std::string msg_ = e_.what();                                                            \
      for (const char* p_ : {__VA_ARGS__})                                                     \
        EXPECT_NE(msg_.find(p_), std::string::npos) << "error message: " << msg_ << "\nmissing: " << p_; \
    }                                                                                          \
    EXPECT_TRUE(thrown_) << #stmt " did not throw trellm::Error";                              \
  } while (0)
