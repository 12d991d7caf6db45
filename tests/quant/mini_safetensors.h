// Test-only: a minimal safetensors reader (whole file in memory) so the quant tests can read the exllamav3
// fixture before/independently of src/format. Trusts the file (it is a committed fixture).
#pragma once
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace trellm::testdata {

struct MiniSafetensors {
  std::vector<char> bytes;
  std::map<std::string, TensorView> tensors;

  explicit MiniSafetensors(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, ": cannot open");
    bytes.assign(std::istreambuf_iterator<char>(f), {});
    uint64_t n;
    std::memcpy(&n, bytes.data(), 8);
    auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + n);
    // keep the data 8-byte aligned in memory: move it into an aligned buffer
    data.resize((bytes.size() - 8 - n + 7) / 8 + 1);
    std::memcpy(data.data(), bytes.data() + 8 + n, bytes.size() - 8 - n);
    for (auto& [name, v] : header.items()) {
      if (name == "__metadata__") continue;
      TensorView t;
      t.dtype = *dtype_from_name(v["dtype"].get<std::string>());
      for (auto& d : v["shape"]) t.shape[t.ndim++] = d.get<int64_t>();
      t.data = reinterpret_cast<char*>(data.data()) + v["data_offsets"][0].get<size_t>();
      tensors[name] = t;
    }
  }
  std::optional<TensorView> find(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) return std::nullopt;
    return it->second;
  }
  const TensorView& at(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("fixture has no tensor ", name);
    return it->second;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (auto& [k, t] : tensors) v.push_back(k);
    return v;
  }

 private:
  std::vector<uint64_t> data;
};

}  // namespace trellm::testdata
