#include "quant/exl3_export.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/half.h"

namespace trellm::trellis {

namespace {
// The markers' payloads: the multiplier bit patterns, stored as int32 (safetensors has no U32 in exllamav3's
// writer, which views torch.uint32 as int32).
const uint32_t kMcgPayload = kMcgMul;
const uint32_t kMul1Payload = kMul1Mul;
}  // namespace

std::vector<uint16_t> padded_bias_f16(const float* bias, int64_t out, int64_t out_padded) {
  TRELLM_ASSERT(out <= out_padded);
  std::vector<uint16_t> b(size_t(out_padded), 0);
  for (int64_t j = 0; j < out; j++) b[size_t(j)] = f32_to_f16(bias[j]);
  return b;
}

std::vector<TensorToWrite> exl3_tensors(const std::string& key, const EncodedLinear& enc) {
  TRELLM_ASSERT(int64_t(enc.suh.size()) == enc.in_padded && int64_t(enc.svh.size()) == enc.out_padded);
  TRELLM_ASSERT(int64_t(enc.trellis.size()) == enc.in_padded * enc.out_padded * enc.K / 16);
  std::vector<TensorToWrite> t;
  t.push_back({key + ".suh", DType::F16, {enc.in_padded}, enc.suh.data(), enc.suh.size() * 2});
  t.push_back({key + ".svh", DType::F16, {enc.out_padded}, enc.svh.data(), enc.svh.size() * 2});
  t.push_back({key + ".trellis", DType::I16, {enc.in_padded / 16, enc.out_padded / 16, int64_t(16 * enc.K)},
               enc.trellis.data(), enc.trellis.size() * 2});
  if (!enc.bias.empty()) {
    TRELLM_ASSERT(int64_t(enc.bias.size()) == enc.out_padded);
    t.push_back({key + ".bias", DType::F16, {enc.out_padded}, enc.bias.data(), enc.bias.size() * 2});
  }
  if (enc.codebook == Codebook::Mcg) t.push_back({key + ".mcg", DType::I32, {}, &kMcgPayload, 4});
  if (enc.codebook == Codebook::Mul1) t.push_back({key + ".mul1", DType::I32, {}, &kMul1Payload, 4});
  return t;
}

nlohmann::json quantization_config_json(const Exl3QuantConfig& q) {
  nlohmann::json j = {{"quant_method", "exl3"}, {"version", q.version.empty() ? "trellm-0.1.0" : q.version},
                      {"bits", q.bits}, {"head_bits", q.head_bits}};
  j["calibration"] = {{"rows", q.calibration_rows}, {"cols", q.calibration_cols}};
  if (!q.out_scales.empty()) j["out_scales"] = q.out_scales;
  if (q.codebook) j["codebook"] = codebook_name(*q.codebook);
  if (q.mtp_bits) j["mtp_bits"] = *q.mtp_bits;
  return j;
}

void apply_exl3_config(nlohmann::json& config, const Exl3QuantConfig& q) {
  if (!config.is_object()) fail("config.json: not a JSON object");
  nlohmann::json qc = quantization_config_json(q);
  if (config.contains("quantization_config")) {
    const nlohmann::json& old = config["quantization_config"];
    if (old.is_object() && old.value("quant_method", "") == "exl3")
      fail("config.json: the source model is already EXL3-quantized; re-quantizing it is not supported");
    qc["original_quantization_config"] = old;
  }
  config["quantization_config"] = qc;
}

nlohmann::json tensor_storage_entry(const std::string& key, const EncodedLinear& enc) {
  nlohmann::json stored = nlohmann::json::object();
  for (const TensorToWrite& t : exl3_tensors(key, enc))
    stored[t.name] = {{"shape", t.shape}, {"n_bytes", t.nbytes}, {"dtype", std::string(dtype_name(t.dtype))}};
  nlohmann::json e = {{"stored_tensors", stored}, {"quant_format", "exl3"}, {"bits_per_weight", enc.K}};
  if (enc.codebook == Codebook::Mcg) e["mcg_multiplier"] = kMcgMul;
  if (enc.codebook == Codebook::Mul1) e["mul1_multiplier"] = kMul1Mul;
  return e;
}

}  // namespace trellm::trellis
