// Element types of tensors as they appear in checkpoints (safetensors names) and in memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace trellm {

enum class DType : uint8_t { F32, F16, BF16, I64, I32, I16, I8, U8 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: return 1;
  }
  return 0;
}

// Safetensors spelling ("F32", "BF16", ...).
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name);

constexpr bool dtype_is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

}  // namespace trellm
