// HessianAccumulator on the GPU, for calibration on the GPU (issue 18, docs/quantize_gpu.md): the rows a Linear
// sees stay in device memory and are summed by cuBLAS DSYRK, whose FP64 tensor-core rate on Hopper (67 TFLOPs on
// the H200, the same as FP32 on CUDA cores) makes exact double sums as cheap as f32 ones. The sum is the CPU's
// (double, rows holding an Inf or NaN dropped) up to the order of the additions, so hessian() equals the CPU
// accumulator's to f32 rounding (tests/quant/test_hessian_cuda.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "quant/hessian.h"

namespace trellm::trellis {

// What the accumulators of one capture share: the stream their rows come in on, a cuBLAS handle on it and the
// double conversion buffer. One per capture; it must outlive its accumulators.
class HessianCudaContext {
 public:
  // stream: the cudaStream_t the observed rows are produced on (0: the legacy default stream); the current device.
  explicit HessianCudaContext(void* stream);
  ~HessianCudaContext();
  HessianCudaContext(const HessianCudaContext&) = delete;
  HessianCudaContext& operator=(const HessianCudaContext&) = delete;
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

class HessianAccumulatorCuda final : public HessianSum {
 public:
  // Rows are copied into a pending f32 buffer of this many rows and summed a buffer at a time (routed experts see
  // a few rows per forward step; DSYRK wants hundreds).
  static constexpr int64_t kPendingRows = 1024;
  HessianAccumulatorCuda(HessianCudaContext& ctx, int64_t in);
  ~HessianAccumulatorCuda() override;
  // x: device f32 (rows, in), ordered on the context's stream; copied before add returns (in stream order).
  void add(const float* x, int64_t rows) override;
  int64_t rows() const override;     // these two synchronise the stream
  int64_t dropped() const override;
  int64_t in() const override { return in_; }
  std::vector<float> hessian() const override;
  // Device bytes one accumulator of width `in` holds: the double sum and the pending rows (defined in hessian.cpp:
  // window sizing needs it in builds without CUDA too).
  static uint64_t device_bytes(int64_t in);

 private:
  void flush() const;
  std::pair<int64_t, int64_t> counts() const;  // rows kept, rows dropped (flushes, synchronises)
  HessianCudaContext& ctx_;
  int64_t in_;
  double* sum_ = nullptr;         // (in, in): the row-major lower triangle (DSYRK's column-major upper)
  float* pending_ = nullptr;      // (kPendingRows, in)
  long long* counts_ = nullptr;   // device [2]: rows kept, rows dropped
  mutable int64_t pending_rows_ = 0;
};

}  // namespace trellm::trellis
