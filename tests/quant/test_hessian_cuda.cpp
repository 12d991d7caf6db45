// HessianAccumulatorCuda (quant/hessian_cuda.h) against the CPU's HessianAccumulator on the same rows: odd widths,
// adds of odd sizes that straddle the pending buffer (kPendingRows), rows holding an Inf or NaN (dropped by both),
// no rows at all. Both sum in double; only the order of the additions differs, so each element of H must agree to
// f32 rounding. Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/rng.h"
#include "quant/hessian.h"
#include "quant/hessian_cuda.h"
#include "quant/trellis_viterbi_cuda.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

TEST(HessianCuda, SameSumsAsTheCpu) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(20261203);
  HessianCudaContext ctx(nullptr);  // the legacy default stream, which cudaMemcpy orders with
  for (int64_t in : {1, 37, 300, 1030}) {
    for (const std::vector<int64_t>& adds : std::vector<std::vector<int64_t>>{{}, {1}, {5, 1023, 1500, 3}, {2048}}) {
      HessianAccumulator cpu(in);
      HessianAccumulatorCuda gpu(ctx, in);
      int64_t bad = 0;
      for (int64_t rows : adds) {
        std::vector<float> x(size_t(rows * in));
        for (auto& v : x) v = rng.normal() * 2.0f + 0.5f;  // a mean: off-diagonal sums of both signs
        for (int64_t r = 3; r < rows; r += 97, bad++)      // every 97th row from the 4th: an Inf or a NaN
          x[size_t(r * in + (r % in))] = r % 2 ? std::numeric_limits<float>::infinity() : std::nanf("");
        cpu.add(x.data(), rows);
        float* d = nullptr;
        ASSERT_EQ(cudaMalloc(&d, x.size() * sizeof(float) + 4), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(d, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
        gpu.add(d, rows);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        cudaFree(d);  // add has copied the rows
      }
      ASSERT_EQ(gpu.rows(), cpu.rows()) << "in=" << in;
      ASSERT_EQ(gpu.dropped(), cpu.dropped()) << "in=" << in;
      EXPECT_EQ(cpu.dropped(), bad);
      const std::vector<float> want = cpu.hessian(), got = gpu.hessian();
      ASSERT_EQ(got.size(), want.size());
      size_t off = 0;
      for (size_t i = 0; i < want.size(); i++)
        if (!(std::fabs(got[i] - want[i]) <= 2.5e-7f * std::fabs(want[i]) + 1e-30f)) off++;
      EXPECT_EQ(off, 0u) << "in=" << in << ", " << adds.size() << " adds: elements beyond f32 rounding";
      if (adds.empty()) {
        EXPECT_EQ(got, std::vector<float>(size_t(in * in), 0.0f));
      }
    }
  }
}

}  // namespace
