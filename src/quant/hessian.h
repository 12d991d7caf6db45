// Calibration statistics for LDLQ (TRELLIS.md §4.1): H = XᵀX / rows over the inputs a Linear sees. Rows with
// Inf or NaN are dropped, as exllamav3 does (exllamav3/modules/linear.py capture_H, quantize.py
// finalize_capture_H). Sums are double; the result is the f32 matrix quantize_linear takes.
#pragma once
#include <cstdint>
#include <vector>

namespace trellm::trellis {

class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t in);
  // x: (rows, in) row-major f32. Multi-threaded over rows of H; rows * in^2 / 2 multiply-adds.
  void add(const float* x, int64_t rows);
  int64_t rows() const { return rows_; }
  int64_t dropped() const { return dropped_; }
  int64_t in() const { return in_; }
  // XᵀX / rows, (in, in) row-major; all zeros when no row was added (quantize_linear then falls back to
  // plain Viterbi, like exllamav3 with a diagonal mean below 1e-20).
  std::vector<float> hessian() const;

 private:
  int64_t in_, rows_ = 0, dropped_ = 0;
  std::vector<double> sum_;  // lower triangle used
};

}  // namespace trellm::trellis
