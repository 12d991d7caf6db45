// Test fixture: tiny_a with every linear layer replaced by random trellis codes (mixed K = 2..8, all three
// codebooks), and its dense twin holding exactly the weights those codes decode to (via the CPU reference).
#pragma once
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/rng.h"
#include "format/json_file.h"
#include "format/safetensors.h"
#include "quant/trellis_ref.h"
#include "test_util.h"

namespace trellm::testing {

inline const std::string kFixture = std::string(TRELLM_TEST_DATA) + "/hf/tiny_a";

inline bool is_linear(const std::string& name) {
  auto ends = [&](const char* s) { return name.size() > strlen(s) && name.compare(name.size() - strlen(s), strlen(s), s) == 0; };
  return ends("_proj.weight") || ends("_mqa.weight") || name == "lm_head.weight";
}

struct Buffers {
  std::deque<std::vector<uint16_t>> u16;  // deque: references stay valid as it grows
  std::deque<std::vector<float>> f32;
  std::vector<int32_t> scalars = std::vector<int32_t>(4096);
  size_t n_scalars = 0;
};

// Writes `exl3_dir` (trellis codes) and `dense_dir` (their dequantization as F32 .weight tensors).
// fixed_k = 0: K cycles through 2..8 over the layers; else every Linear gets K = fixed_k.
inline void write_exl3_and_dense(const std::string& exl3_dir, const std::string& dense_dir, int fixed_k = 0) {
  auto src = SafetensorsFile::open(kFixture + "/model.safetensors");
  Rng rng(2024);
  Buffers buf;
  std::vector<TensorToWrite> exl3, dense;
  int idx = 0;
  for (const TensorInfo& t : src->tensors()) {
    if (!is_linear(t.name)) {
      exl3.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
      dense.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
      continue;
    }
    dense.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});  // replaced by the decoded weight below
    const std::string key = t.name.substr(0, t.name.size() - 7);  // drop ".weight"
    const int64_t out = t.shape[0], in = t.shape[1];
    const int64_t inp = trellis::round_up_128(in), outp = trellis::round_up_128(out);
    const int K = fixed_k ? fixed_k : 2 + idx % 7;  // 2..8
    const int cb = (idx / 7) % 3;                 // 3INST, MCG, MUL1
    idx++;
    auto& codes = buf.u16.emplace_back(size_t(inp / 16 * outp / 16 * 16 * K));
    for (auto& c : codes) c = uint16_t(rng.next_u32());
    // Channel scales sized so W has entries of about 1/sqrt(in), like the dense fixture.
    auto& suh = buf.u16.emplace_back(size_t(inp));
    for (auto& s : suh) s = f32_to_f16((rng.next_u32() & 1 ? -1.0f : 1.0f) * rng.uniform(0.5f, 1.5f) / std::sqrt(float(in)) / 1.24f);
    auto& svh = buf.u16.emplace_back(size_t(outp));
    for (auto& s : svh) s = f32_to_f16((rng.next_u32() & 1 ? -1.0f : 1.0f) * rng.uniform(0.5f, 1.5f));
    exl3.push_back({key + ".trellis", DType::I16, {inp / 16, outp / 16, 16 * K}, codes.data(), codes.size() * 2});
    exl3.push_back({key + ".suh", DType::F16, {inp}, suh.data(), suh.size() * 2});
    exl3.push_back({key + ".svh", DType::F16, {outp}, svh.data(), svh.size() * 2});
    if (cb) {
      int32_t& m = buf.scalars[buf.n_scalars++];
      m = int32_t(cb == 1 ? trellis::kMcgMul : trellis::kMul1Mul);
      exl3.push_back({key + (cb == 1 ? ".mcg" : ".mul1"), DType::I32, {}, &m, 4});
    }
  }
  std::filesystem::create_directories(exl3_dir);
  std::filesystem::create_directories(dense_dir);
  write_safetensors(exl3_dir + "/model.safetensors", exl3);
  json cfg = read_json_file(kFixture + "/config.json");
  trellm::testing::write_file(dense_dir + "/config.json", cfg.dump(1));
  cfg["quantization_config"] = {{"quant_method", "exl3"}, {"version", "trellm-test"}, {"bits", 5.0}, {"head_bits", 6},
                                {"codebook", "mcg"}, {"out_scales", "always"}};
  trellm::testing::write_file(exl3_dir + "/config.json", cfg.dump(1));

  // The dense twin: what each trellis Linear decodes to, via the reference decoder.
  TensorStore st = TensorStore::open(exl3_dir);
  trellis::TensorFinder find = [&](const std::string& n) -> std::optional<TensorView> {
    const TensorInfo* t = st.find(n);
    return t ? std::optional<TensorView>(t->view()) : std::nullopt;
  };
  for (auto& t : dense) {
    if (!is_linear(t.name)) continue;
    const std::string key = t.name.substr(0, t.name.size() - 7);
    trellis::TrellisWeight w = trellis::read_trellis_weight(key, find, t.shape[1], t.shape[0]);
    auto& f = buf.f32.emplace_back(size_t(t.shape[0] * t.shape[1]));
    trellis::dequantize_hf_f32(w, f.data());
    t.dtype = DType::F32;
    t.data = f.data();
    t.nbytes = f.size() * 4;
  }
  write_safetensors(dense_dir + "/model.safetensors", dense);
}

}  // namespace trellm::testing
