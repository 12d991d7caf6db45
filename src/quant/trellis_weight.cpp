#include "quant/trellis_weight.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include <algorithm>

#include "core/error.h"
#include "core/half.h"
#include "core/log.h"
#include "format/safetensors.h"

namespace trellm::trellis {

namespace {

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08" PRIX32, v);
  return buf;
}

// The tensor `name`, which must exist, with dtype `dt` and `ndim` dims.
TensorView need(const TensorFinder& find, const std::string& name, DType dt, int ndim) {
  auto t = find(name);
  if (!t) fail(name, ": missing (an EXL3 Linear needs .trellis, .suh or .su, .svh or .sv)");
  if (t->dtype != dt) fail(name, ": dtype ", dtype_name(t->dtype), ", expected ", dtype_name(dt));
  if (t->ndim != ndim) fail(name, ": shape ", shape_str(*t), " has ", t->ndim, " dims, expected ", ndim);
  if (reinterpret_cast<uintptr_t>(t->data) % dtype_size(dt) != 0) fail(name, ": data not aligned to ", dtype_size(dt), " bytes");
  return *t;
}

void check_len(const TensorView& t, const std::string& name, int64_t want, const char* why) {
  if (t.dim(0) != want) fail(name, ": shape ", shape_str(t), ", expected [", want, "] ", why);
}

// .mcg / .mul1: an I32 scalar whose bit pattern must be the fixed multiplier.
bool read_marker(const TensorFinder& find, const std::string& name, uint32_t expected) {
  auto t = find(name);
  if (!t) return false;
  if (t->dtype != DType::I32 || t->numel() != 1 || t->ndim > 1)
    fail(name, ": expected an I32 scalar, got ", dtype_name(t->dtype), " ", shape_str(*t));
  uint32_t v;
  std::memcpy(&v, t->data, 4);
  if (v != expected)
    fail(name, ": codebook multiplier ", hex32(v), " is not supported (only ", hex32(expected),
         "; checkpoints from before exllamav3 commit 0f2da5d used runtime multipliers)");
  return true;
}

}  // namespace

int64_t round_up_128(int64_t n) { return (n + kPadTo - 1) / kPadTo * kPadTo; }

bool is_trellis_module(const std::string& key, const TensorFinder& find) { return find(key + ".trellis").has_value(); }

std::vector<uint16_t> unpack_sign_bits(const uint16_t* words, int64_t n) {
  std::vector<uint16_t> out(n);
  for (int64_t i = 0; i < n; i++) out[i] = (words[i / 16] >> (i % 16)) & 1 ? 0xBC00 : 0x3C00;  // -1 : +1
  return out;
}

TrellisWeight read_trellis_weight(const std::string& key, const TensorFinder& find, int64_t in_features,
                                  int64_t out_features, const std::vector<std::string>* names_under_key) {
  if (in_features <= 0 || out_features <= 0) fail(key, ": invalid dims in ", in_features, " out ", out_features);
  if (names_under_key) {
    static const char* known[] = {"trellis", "suh", "svh", "su", "sv", "mcg", "mul1", "bias"};
    for (const std::string& n : *names_under_key) {
      if (n.rfind(key + ".", 0) != 0) continue;
      const std::string suffix = n.substr(key.size() + 1);
      bool ok = false;
      for (const char* k : known) ok |= suffix == k;
      if (!ok) fail(n, ": unexpected tensor next to an EXL3 trellis (known: .trellis .suh .svh .su .sv .mcg .mul1 .bias)");
    }
  }
  if (find(key + ".scale"))
    fail(key, ".scale: a global scale tensor is from a retired exllamav3 format and is not supported");

  TrellisWeight w;
  w.key = key;
  w.in = in_features;
  w.out = out_features;
  w.in_padded = round_up_128(in_features);
  w.out_padded = round_up_128(out_features);

  const std::string tn = key + ".trellis";
  const TensorView tr = need(find, tn, DType::I16, 3);
  if (tr.dim(2) % 16 != 0)
    fail(tn, ": last dim ", tr.dim(2), " is not 16*K (half-integer bitrates are not supported)");
  w.K = int(tr.dim(2) / 16);
  if (w.K < kMinK || w.K > kMaxK) fail(tn, ": K = ", w.K, " from shape ", shape_str(tr), ", expected 1..8");
  if (tr.dim(0) * kTileDim != w.in_padded || tr.dim(1) * kTileDim != w.out_padded)
    fail(tn, ": shape ", shape_str(tr), " does not match the Linear (in ", in_features, ", out ", out_features,
         ") padded to (", w.in_padded, ", ", w.out_padded, "): expected [", w.in_padded / 16, ", ", w.out_padded / 16,
         ", ", 16 * w.K, "]");
  w.trellis = tr.ptr<uint16_t>();

  // Input / output channel factors: fp16 suh/svh, or legacy I16 sign bitfields su/sv (unpacked to +-1).
  auto owned = std::make_shared<std::vector<uint16_t>>();
  // Remember where each factor comes from; pointers into `owned` are taken once it stops growing.
  const uint16_t* suh_ext = nullptr;
  const uint16_t* svh_ext = nullptr;
  std::ptrdiff_t suh_at = -1, svh_at = -1;
  auto resolve = [&](const char* h_name, const char* bits_name, int64_t n, const uint16_t*& ext, std::ptrdiff_t& at) {
    const std::string hn = key + "." + h_name, bn = key + "." + bits_name;
    const bool has_h = find(hn).has_value(), has_b = find(bn).has_value();
    if (has_h && has_b) fail(key, ": both .", h_name, " and legacy .", bits_name, " are present (ambiguous)");
    if (has_h) {
      const TensorView t = need(find, hn, DType::F16, 1);
      check_len(t, hn, n, "(the padded dim)");
      ext = t.ptr<uint16_t>();
    } else if (has_b) {
      const TensorView t = need(find, bn, DType::I16, 1);
      check_len(t, bn, n / 16, "(legacy sign bitfield: padded dim / 16 words)");
      const std::vector<uint16_t> s = unpack_sign_bits(t.ptr<uint16_t>(), n);
      at = std::ptrdiff_t(owned->size());
      owned->insert(owned->end(), s.begin(), s.end());
    } else {
      fail(key, ": missing .", h_name, " (or legacy .", bits_name, ")");
    }
  };
  resolve("suh", "su", w.in_padded, suh_ext, suh_at);
  resolve("svh", "sv", w.out_padded, svh_ext, svh_at);
  w.suh = suh_ext ? suh_ext : owned->data() + suh_at;
  w.svh = svh_ext ? svh_ext : owned->data() + svh_at;
  if (!owned->empty()) w.owned = owned;

  const bool mcg = read_marker(find, key + ".mcg", kMcgMul);
  const bool mul1 = read_marker(find, key + ".mul1", kMul1Mul);
  if (mcg && mul1) fail(key, ": both .mcg and .mul1 codebook markers are present");
  w.codebook = mcg ? Codebook::Mcg : mul1 ? Codebook::Mul1 : Codebook::Inst3;

  if (auto b = find(key + ".bias")) {
    const std::string bn = key + ".bias";
    if (b->dtype != DType::F16 && b->dtype != DType::BF16 && b->dtype != DType::F32)
      fail(bn, ": dtype ", dtype_name(b->dtype), ", expected F16 (or BF16/F32)");
    if (b->ndim != 1 || (b->dim(0) != w.out && b->dim(0) != w.out_padded))
      fail(bn, ": shape ", shape_str(*b), ", expected [", w.out, "] or padded [", w.out_padded, "]");
    w.bias = *b;
  }
  return w;
}

TrellisReader::TrellisReader(const TensorStore& store) : store_(store), names_(store.names()) {
  std::sort(names_.begin(), names_.end());
}

TensorFinder TrellisReader::finder() const {
  const TensorStore* store = &store_;  // not `this`: the finder may outlive the reader
  return [store](const std::string& name) -> std::optional<TensorView> {
    const TensorInfo* t = store->find(name);
    if (!t) return std::nullopt;
    return t->view();
  };
}

bool TrellisReader::contains(const std::string& key) const { return store_.contains(key + ".trellis"); }

TrellisWeight TrellisReader::read(const std::string& key, int64_t in_features, int64_t out_features) const {
  const std::string prefix = key + ".";
  std::vector<std::string> under;
  for (auto it = std::lower_bound(names_.begin(), names_.end(), prefix); it != names_.end() && it->rfind(prefix, 0) == 0; ++it)
    under.push_back(*it);
  try {
    return read_trellis_weight(key, finder(), in_features, out_features, &under);
  } catch (const Error& e) {
    fail(store_.path(), ": ", e.what());
  }
}

// ---------------------------------------------------------------------------------------------------------

Codebook parse_codebook(const std::string& name, const std::string& where) {
  if (name == "3inst") return Codebook::Inst3;
  if (name == "mcg") return Codebook::Mcg;
  if (name == "mul1") return Codebook::Mul1;
  fail(where, ": unknown codebook \"", name, "\" (expected 3inst, mcg or mul1)");
}

Exl3QuantConfig parse_exl3_quantization_config(const nlohmann::json& q, const std::string& where) {
  const std::string at = where + ": quantization_config";
  if (!q.is_object()) fail(at, " is not an object");
  if (!q.contains("quant_method") || !q["quant_method"].is_string())
    fail(at, ".quant_method is missing (expected \"exl3\")");
  const std::string method = q["quant_method"].get<std::string>();
  if (method != "exl3") fail(at, ".quant_method is \"", method, "\"; trellm reads \"exl3\" only");
  if (q.contains("tile_order"))
    fail(at, ".tile_order = ", q["tile_order"].dump(),
         ": a third-party tile layout (e.g. sm70_colmajor) that is not exllamav3's; not supported");

  Exl3QuantConfig c;
  for (auto it = q.begin(); it != q.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
    auto number = [&]() -> double {
      if (!v.is_number()) fail(at, ".", k, " = ", v.dump(), ": expected a number");
      return v.get<double>();
    };
    auto integer = [&](int lo, int hi) -> int {
      if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
        fail(at, ".", k, " = ", v.dump(), ": expected an integer in ", lo, "..", hi);
      return v.get<int>();
    };
    if (k == "quant_method") continue;
    if (k == "version") {
      if (!v.is_string()) fail(at, ".version = ", v.dump(), ": expected a string");
      c.version = v.get<std::string>();
    } else if (k == "bits") {
      c.bits = number();
      if (!(c.bits > 0 && c.bits <= 16)) fail(at, ".bits = ", v.dump(), ": expected 0 < bits <= 16");
    } else if (k == "head_bits") {
      c.head_bits = integer(1, 16);
    } else if (k == "mtp_bits") {
      c.mtp_bits = integer(1, 16);
    } else if (k == "vision_bits") {
      c.vision_bits = integer(1, 16);
    } else if (k == "codebook") {
      // Informational: every trellis tensor carries its own marker (.mcg, .mul1, or none for 3inst), and the
      // markers decide (TRELLIS.md). An unexpected value here is a warning; an unknown marker stays an error.
      const std::string name = v.is_string() ? v.get<std::string>() : v.dump();
      if (name == "3inst" || name == "mcg" || name == "mul1")
        c.codebook = parse_codebook(name, at + ".codebook");
      else
        log_warn(at, ".codebook = ", v.dump(), " is not one trellm knows (3inst, mcg, mul1); ignored: each "
                 "tensor's own codebook marker decides");
    } else if (k == "out_scales") {
      if (!v.is_string()) fail(at, ".out_scales = ", v.dump(), ": expected a string");
      c.out_scales = v.get<std::string>();
      if (c.out_scales != "always" && c.out_scales != "never" && c.out_scales != "auto")
        fail(at, ".out_scales = \"", c.out_scales, "\": expected always, never or auto");
    } else if (k == "calibration") {
      if (!v.is_object() || !v.contains("rows") || !v.contains("cols") || !v["rows"].is_number_integer() ||
          !v["cols"].is_number_integer())
        fail(at, ".calibration = ", v.dump(), ": expected {\"rows\": int, \"cols\": int}");
      c.calibration_rows = v["rows"].get<int64_t>();
      c.calibration_cols = v["cols"].get<int64_t>();
    } else if (k == "original_quantization_config") {
      c.has_original_quantization_config = true;  // provenance only: the source model's own quantization
    } else if (k == "tensor_storage") {
      // quantization_config.json's per-module listing; informational (the per-tensor markers decide)
    } else {
      fail(at, ".", k, ": unknown key; trellm cannot tell whether it changes the format, so it refuses the model");
    }
  }
  return c;
}

std::optional<Exl3QuantConfig> exl3_config_from_model_config(const nlohmann::json& config, const std::string& where) {
  if (!config.is_object()) fail(where, ": not a JSON object");
  if (!config.contains("quantization_config")) return std::nullopt;
  return parse_exl3_quantization_config(config["quantization_config"], where);
}

}  // namespace trellm::trellis
