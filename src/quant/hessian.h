// Calibration statistics for LDLQ (TRELLIS.md §4.1): H = XᵀX / rows over the inputs a Linear sees. Rows with
// Inf or NaN are dropped, as exllamav3 does (exllamav3/modules/linear.py capture_H, quantize.py
// finalize_capture_H). Sums are double; the result is the f32 matrix quantize_linear takes.
#pragma once
#include <cstdint>
#include <vector>

namespace trellm::trellis {

// What a calibration capture feeds: the host accumulator below or the GPU's (hessian_cuda.h), whose rows live in
// device memory.
class HessianSum {
 public:
  virtual ~HessianSum() = default;
  // x: (rows, in) row-major f32, in the accumulator's memory (host or device).
  virtual void add(const float* x, int64_t rows) = 0;
  virtual int64_t rows() const = 0;     // rows summed (the dropped ones not counted)
  virtual int64_t dropped() const = 0;  // rows dropped for an Inf or NaN
  virtual int64_t in() const = 0;
  // XᵀX / rows, (in, in) row-major; all zeros when no row was added (quantize_linear then falls back to
  // plain Viterbi, like exllamav3 with a diagonal mean below 1e-20).
  virtual std::vector<float> hessian() const = 0;
};

class HessianAccumulator final : public HessianSum {
 public:
  explicit HessianAccumulator(int64_t in);
  // Multi-threaded over rows of H; rows * in^2 / 2 multiply-adds.
  void add(const float* x, int64_t rows) override;
  int64_t rows() const override { return rows_; }
  int64_t dropped() const override { return dropped_; }
  int64_t in() const override { return in_; }
  std::vector<float> hessian() const override;

 private:
  int64_t in_, rows_ = 0, dropped_ = 0;
  std::vector<double> sum_;  // lower triangle used
};

}  // namespace trellm::trellis
