// TensorView: a non-owning view of a dense, row-major tensor (data pointer, dtype, shape).
// Device tensors use the same struct; where the data lives is the owner's business.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace trellm {

constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};  // row-major, contiguous

  TensorView() = default;
  TensorView(void* d, DType t, std::initializer_list<int64_t> dims) : data(d), dtype(t) {
    TRELLM_ASSERT(dims.size() <= kMaxDims);
    for (int64_t s : dims) shape[ndim++] = s;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
  }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[i < 0 ? ndim + i : i]; }
  bool empty() const { return data == nullptr; }

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }

  // Rows of a 2-D (or flattened leading dims) tensor.
  int64_t rows() const { return ndim == 0 ? 1 : numel() / shape[ndim - 1]; }
  int64_t cols() const { return ndim == 0 ? 1 : shape[ndim - 1]; }

  // Sub-tensor [i] along the first dimension.
  TensorView operator[](int64_t i) const {
    TRELLM_ASSERT(ndim >= 1 && i >= 0 && i < shape[0]);
    TensorView v;
    v.dtype = dtype;
    v.ndim = ndim - 1;
    for (int d = 1; d < ndim; d++) v.shape[d - 1] = shape[d];
    v.data = static_cast<char*>(data) + i * v.nbytes();
    return v;
  }
};

std::string shape_str(const TensorView& t);

}  // namespace trellm
