#include "core/dtype.h"

namespace trellm {

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16, DType::I8, DType::U8})
    if (dtype_name(t) == name) return t;
  return std::nullopt;
}

}  // namespace trellm
