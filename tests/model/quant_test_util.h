// Helpers shared by the quantizer tests of tests/model (test_quantize.cpp, test_quantize_mtp.cpp,
// test_calibrate_layers.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/rng.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite.h"

namespace trellm::testing {

// rows x len token ids drawn uniformly from [0, vocab), reproducible from seed.
inline std::vector<std::vector<int32_t>> random_rows(int rows, int len, int64_t vocab, uint64_t seed) {
  Rng r(seed);
  std::vector<std::vector<int32_t>> v(static_cast<size_t>(rows));
  for (auto& row : v) {
    row.resize(size_t(len));
    for (auto& t : row) t = int32_t(r.next_u32() % uint32_t(vocab));
  }
  return v;
}

// Element i of a mapped F32 / F16 / BF16 tensor as f32.
inline float value(const TensorInfo& t, int64_t i) {
  switch (t.dtype) {
    case DType::F32: return static_cast<const float*>(t.data)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
  }
}

// Every position's logits ([ids, vocab]) of the model in `dir` on the CPU, the ids as one sequence.
inline std::vector<float> model_logits(const std::string& dir, const std::vector<int32_t>& ids) {
  auto b = make_cpu_backend();
  auto m = Model::load(dir, *b);
  RunState rs = m->make_run_state(int(ids.size()));
  KvCache kv = m->make_kv_cache(int(ids.size()));
  m->forward(rs, kv, ids.data(), int(ids.size()), 0, true);
  const float* p = rs.logits.ptr<float>();
  return std::vector<float>(p, p + ids.size() * size_t(m->config().vocab_size));
}

}  // namespace trellm::testing
