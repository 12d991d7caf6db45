// Reading EXL3 checkpoints: the per-Linear trellis tensors become a TrellisWeight descriptor (K, codebook,
// dims, raw pointers into the mapped checkpoint), and config.json's quantization_config is parsed strictly.
// Layout per TRELLIS.md §1.1 / §1.4; behaviour read from exllamav3 (not copied):
// exllamav3/modules/linear.py (load_exl3, pad_to = 128), exllamav3/modules/quant/exl3.py (LinearEXL3,
// unpack_bf), exllamav3/conversion/compile.py + quant_config.py (quantization_config keys).
//
// What we reject (each with an Error naming the tensor or key): a missing or mistyped tensor, a trellis
// shape that disagrees with the Linear's dims or with suh/svh, K outside 1..8 (including the half-integer
// rates of newer exllamav3: trellis.shape[-1] not a multiple of 16), .mcg/.mul1 values other than the
// fixed multipliers, both markers at once, suh together with legacy su (ambiguous), the retired `.scale`,
// any other tensor under the module key, and in quantization_config an unknown key, a quant_method other
// than "exl3", or any `tile_order` (third-party layouts, TRELLIS.md §8.12).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "quant/trellis_decode.h"

namespace trellm {
class TensorStore;
}

namespace trellm::trellis {

// One quantized Linear, y = x·W + b with W (in x out) = diag(suh) · Hblk · Q · Hblk · diag(svh).
// Non-owning: the pointers live in the checkpoint mapping (or, for legacy sign bitfields, in `owned`).
struct TrellisWeight {
  std::string key;                    // module key, e.g. "model.layers.3.mlp.experts.17.down_proj"
  int K = 0;                          // bits per weight, 1..8
  Codebook codebook = Codebook::Inst3;
  int64_t in = 0, out = 0;            // the model's real dims (what x and y have)
  int64_t in_padded = 0, out_padded = 0;  // stored dims: in/out rounded up to a multiple of 128
  const uint16_t* trellis = nullptr;  // (in_padded/16, out_padded/16, 16K) uint16, row-major tiles
  const uint16_t* suh = nullptr;      // (in_padded,)  fp16 bits: input-channel factor (not just signs)
  const uint16_t* svh = nullptr;      // (out_padded,) fp16 bits: output-channel factor
  TensorView bias;                    // empty, or (out) / (out_padded) of F16, BF16 or F32
  std::shared_ptr<const std::vector<uint16_t>> owned;  // legacy su/sv unpacked to fp16 +-1

  int64_t tiles_k() const { return in_padded / kTileDim; }
  int64_t tiles_n() const { return out_padded / kTileDim; }
  const uint16_t* tile(int64_t tk, int64_t tn) const { return trellis + tile_offset(tk, tn, tiles_n(), K); }
  // Bytes of trellis codes (what a decode streams through): in_padded * out_padded * K / 8.
  int64_t trellis_bytes() const { return in_padded * out_padded * K / 8; }
  bool has_bias() const { return !bias.empty(); }
};

// Finds a checkpoint tensor by full name (e.g. "model.layers.0.mlp.down_proj.trellis"); nullopt when absent.
using TensorFinder = std::function<std::optional<TensorView>(const std::string& name)>;

// True when `key` is stored as EXL3 (has a `.trellis` tensor).
bool is_trellis_module(const std::string& key, const TensorFinder& find);

int64_t round_up_128(int64_t n);

// Builds and validates the descriptor of Linear `key` whose HF weight is (out_features, in_features).
// `names_under_key` (every checkpoint tensor name starting with key + ".") enables the unknown-tensor check;
// pass nullptr when the caller cannot list names.
TrellisWeight read_trellis_weight(const std::string& key, const TensorFinder& find, int64_t in_features,
                                  int64_t out_features, const std::vector<std::string>* names_under_key = nullptr);

// Reads EXL3 Linears from a checkpoint (src/format TensorStore), with the strict unknown-tensor check.
// Caches the sorted tensor names once, so reading every Linear of a model stays O(N log N).
class TrellisReader {
 public:
  explicit TrellisReader(const TensorStore& store);
  bool contains(const std::string& key) const;  // has key + ".trellis"
  // The descriptor of Linear `key` with HF weight (out_features, in_features); pointers into the mapping.
  TrellisWeight read(const std::string& key, int64_t in_features, int64_t out_features) const;
  TensorFinder finder() const;

 private:
  const TensorStore& store_;
  std::vector<std::string> names_;  // sorted
};

// Unpacks a legacy sign bitfield (I16, n/16 words; element i = bit i%16 of word i/16, set => -1) to fp16.
std::vector<uint16_t> unpack_sign_bits(const uint16_t* words, int64_t n);

// config.json's quantization_config (TRELLIS.md §1.4).
struct Exl3QuantConfig {
  std::string version;                  // exllamav3 version that wrote it ("" if absent)
  double bits = 0;                      // average bits per weight of the decoder Linears
  int head_bits = 0;                    // lm_head bits (0 if absent)
  std::optional<Codebook> codebook;     // the default the converter used; per-tensor markers decide
  std::string out_scales;               // "always" | "never" | "auto" | ""
  int64_t calibration_rows = 0, calibration_cols = 0;
  std::optional<int> mtp_bits, vision_bits;
  bool has_original_quantization_config = false;
};

// Parses a quantization_config object; `where` names the file in error messages.
Exl3QuantConfig parse_exl3_quantization_config(const nlohmann::json& qcfg, const std::string& where = "config.json");

// From a whole config.json: nullopt when it has no quantization_config (an unquantized model); an Error
// when it has one that is not EXL3.
std::optional<Exl3QuantConfig> exl3_config_from_model_config(const nlohmann::json& config,
                                                            const std::string& where = "config.json");

Codebook parse_codebook(const std::string& name, const std::string& where);

}  // namespace trellm::trellis
