// Writing EXL3: the checkpoint tensors of an encoded Linear, config.json's quantization_config, and the
// per-module entries of quantization_config.json (TRELLIS.md §1.1, §1.4). The model-directory writer
// (sharding, index, copying tokenizer files, atomic rename) lives with `trellm quantize`; these are the pieces
// that know the format. Read from exllamav3 (not copied): exllamav3/modules/quant/exl3.py (get_tensors),
// exllamav3/conversion/compile.py, exllamav3/conversion/quant_config.py.
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "format/safetensors.h"
#include "quant/trellis_encode.h"
#include "quant/trellis_weight.h"

namespace trellm::trellis {

// fp16 bias padded to out_padded, for EncodedLinear::bias (exllamav3 stores it padded, F16).
std::vector<uint16_t> padded_bias_f16(const float* bias, int64_t out, int64_t out_padded);

// The tensors exllamav3 writes for Linear `key`, in its order: .suh (F16 [in_p]), .svh (F16 [out_p]),
// .trellis (I16 [in_p/16, out_p/16, 16K]), .bias (F16 [out_p], if enc.bias is set), .mcg or .mul1 (I32 scalar
// holding the multiplier's bit pattern). Pointers into `enc` (and static storage for the markers).
std::vector<TensorToWrite> exl3_tensors(const std::string& key, const EncodedLinear& enc);

// quantization_config for config.json: {"quant_method": "exl3", "version", "bits", "head_bits",
// "calibration": {rows, cols} (0, 0: no calibration, plain per-tile Viterbi), "out_scales", "codebook"}.
nlohmann::json quantization_config_json(const Exl3QuantConfig& q);

// Turns a source config.json into the EXL3 one: sets quantization_config; an existing non-EXL3
// quantization_config is kept under original_quantization_config; an EXL3 one is an error (no re-quantizing).
// tie_word_embeddings is left alone: exllamav3 always writes a separate lm_head and flips the flag (true in
// v1.4.1's update_config, false in later ones); we write exactly the tensors the source has.
void apply_exl3_config(nlohmann::json& config, const Exl3QuantConfig& q);

// One module's entry of quantization_config.json's "tensor_storage": stored_tensors {name: {shape, n_bytes,
// dtype}}, quant_format "exl3", bits_per_weight, and mcg_multiplier / mul1_multiplier.
nlohmann::json tensor_storage_entry(const std::string& key, const EncodedLinear& enc);

}  // namespace trellm::trellis
