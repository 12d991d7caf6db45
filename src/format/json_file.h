// Reading JSON files (config.json, generation_config.json, ...) with errors that name the file and field.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace trellm {

using json = nlohmann::json;

// Deepest nesting of arrays and objects accepted in JSON input (model files, request bodies). nlohmann::json prints,
// copies and compares values recursively, so a hostile 200 KB "[[[[..." overflowed the stack in an error message
// (found while fuzzing, issue 17); real configs and requests nest fewer than 20 levels.
constexpr int kMaxJsonDepth = 256;
// An Error naming `source` when `text` nests deeper than kMaxJsonDepth (a scan that skips strings; no parse).
void check_json_depth(std::string_view text, const std::string& source);

// Parses a JSON file; malformed JSON, a number out of range or too deep a nesting is an Error naming the file.
json read_json_file(const std::string& path);

// Typed access to one object's fields. Every error names the file and the field and says what was expected.
class JsonFields {
 public:
  JsonFields(const json& obj, std::string file, std::string prefix = "");

  bool has(const std::string& key) const;  // present and not null
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t def) const;
  std::optional<int64_t> get_opt_int(const std::string& key) const;
  double get_num(const std::string& key) const;
  double get_num(const std::string& key, double def) const;
  bool get_bool(const std::string& key, bool def) const;
  std::string get_str(const std::string& key) const;
  std::string get_str(const std::string& key, const std::string& def) const;
  std::vector<int64_t> get_int_list(const std::string& key) const;  // an int or a list of ints
  std::vector<std::string> get_str_list(const std::string& key) const;
  JsonFields sub(const std::string& key) const;  // a nested object
  const json& raw() const { return obj_; }

  // Error for a present field with an unsupported value.
  [[noreturn]] void bad(const std::string& key, const std::string& why) const;
  std::string where(const std::string& key) const { return file_ + ": field \"" + prefix_ + key + "\""; }

 private:
  const json& at(const std::string& key) const;
  const json& obj_;
  std::string file_, prefix_;
};

}  // namespace trellm
