#include "quant/hessian.h"

#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "quant/hessian_cuda.h"

namespace trellm::trellis {

HessianAccumulator::HessianAccumulator(int64_t in) : in_(in), sum_(static_cast<size_t>(in * in), 0.0) {
  if (in <= 0) fail("HessianAccumulator: invalid width ", in);
}

void HessianAccumulator::add(const float* x, int64_t rows) {
  std::vector<const float*> good;
  good.reserve(size_t(rows));
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * in_;
    bool finite = true;
    for (int64_t i = 0; i < in_ && finite; i++) finite = std::isfinite(xr[i]);
    if (finite) good.push_back(xr);
    else dropped_++;
  }
  rows_ += int64_t(good.size());
  parallel_for(in_, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      double* si = sum_.data() + i * in_;
      for (const float* xr : good) {
        const double xi = xr[i];
        if (xi == 0.0) continue;
        for (int64_t j = 0; j <= i; j++) si[j] += xi * xr[j];
      }
    }
  });
}

std::vector<float> HessianAccumulator::hessian() const {
  std::vector<float> h(sum_.size(), 0.0f);
  if (rows_ == 0) return h;
  const double inv = 1.0 / double(rows_);
  for (int64_t i = 0; i < in_; i++)
    for (int64_t j = 0; j <= i; j++) h[i * in_ + j] = h[j * in_ + i] = float(sum_[i * in_ + j] * inv);
  return h;
}

uint64_t HessianAccumulatorCuda::device_bytes(int64_t in) {
  return uint64_t(in) * uint64_t(in) * sizeof(double) + uint64_t(kPendingRows) * uint64_t(in) * sizeof(float) + 16;
}

#ifndef TRELLM_HAVE_CUDA
// Without CUDA the GPU context exists as a type (HessianCapture holds one) but cannot be made.
struct HessianCudaContext::Impl {};
HessianCudaContext::HessianCudaContext(void*) { fail("calibration on the GPU: this trellm was built without CUDA"); }
HessianCudaContext::~HessianCudaContext() = default;
#endif

}  // namespace trellm::trellis
