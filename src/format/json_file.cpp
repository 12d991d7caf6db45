#include "format/json_file.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace trellm {

void check_json_depth(std::string_view text, const std::string& source) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); i++) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') i++;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth)
        fail(source, ": JSON nested deeper than ", kMaxJsonDepth, " levels (at byte ", i, ")");
    } else if (c == ']' || c == '}') {
      depth--;
    }
  }
}

json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  check_json_depth(text, path);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    fail(path, ": invalid JSON at byte ", e.byte, ": ", e.what());
  } catch (const json::exception& e) {  // out_of_range.406: a number too large for a double
    fail(path, ": invalid JSON: ", e.what());
  }
}

JsonFields::JsonFields(const json& obj, std::string file, std::string prefix)
    : obj_(obj), file_(std::move(file)), prefix_(std::move(prefix)) {
  if (!obj_.is_object()) fail(file_, ": ", prefix_.empty() ? "top level" : "\"" + prefix_ + "\"", " is not a JSON object");
}

bool JsonFields::has(const std::string& key) const { return obj_.contains(key) && !obj_[key].is_null(); }

const json& JsonFields::at(const std::string& key) const {
  if (!has(key)) fail(where(key), " is missing");
  return obj_[key];
}

void JsonFields::bad(const std::string& key, const std::string& why) const {
  std::string val = obj_.contains(key) ? obj_[key].dump() : "(missing)";
  if (val.size() > 80) val = val.substr(0, 77) + "...";
  fail(where(key), " = ", val, ": ", why);
}

int64_t JsonFields::get_int(const std::string& key) const {
  const json& v = at(key);
  if (!v.is_number_integer()) bad(key, "expected an integer");
  return v.get<int64_t>();
}
int64_t JsonFields::get_int(const std::string& key, int64_t def) const { return has(key) ? get_int(key) : def; }
std::optional<int64_t> JsonFields::get_opt_int(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  return get_int(key);
}

double JsonFields::get_num(const std::string& key) const {
  const json& v = at(key);
  if (!v.is_number()) bad(key, "expected a number");
  return v.get<double>();
}
double JsonFields::get_num(const std::string& key, double def) const { return has(key) ? get_num(key) : def; }

bool JsonFields::get_bool(const std::string& key, bool def) const {
  if (!has(key)) return def;
  const json& v = obj_[key];
  if (!v.is_boolean()) bad(key, "expected true or false");
  return v.get<bool>();
}

std::string JsonFields::get_str(const std::string& key) const {
  const json& v = at(key);
  if (!v.is_string()) bad(key, "expected a string");
  return v.get<std::string>();
}
std::string JsonFields::get_str(const std::string& key, const std::string& def) const {
  return has(key) ? get_str(key) : def;
}

std::vector<int64_t> JsonFields::get_int_list(const std::string& key) const {
  const json& v = at(key);
  std::vector<int64_t> out;
  if (v.is_number_integer()) return {v.get<int64_t>()};
  if (!v.is_array()) bad(key, "expected an integer or a list of integers");
  for (const json& e : v) {
    if (!e.is_number_integer()) bad(key, "expected a list of integers");
    out.push_back(e.get<int64_t>());
  }
  return out;
}

std::vector<std::string> JsonFields::get_str_list(const std::string& key) const {
  const json& v = at(key);
  if (!v.is_array()) bad(key, "expected a list of strings");
  std::vector<std::string> out;
  for (const json& e : v) {
    if (!e.is_string()) bad(key, "expected a list of strings");
    out.push_back(e.get<std::string>());
  }
  return out;
}

JsonFields JsonFields::sub(const std::string& key) const {
  const json& v = at(key);
  if (!v.is_object()) bad(key, "expected an object");
  return JsonFields(v, file_, prefix_ + key + ".");
}

}  // namespace trellm
