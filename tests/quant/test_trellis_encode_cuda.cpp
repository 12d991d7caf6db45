// quantize_linear with the Viterbi on the GPU must write the CPU's EXL3 tensors bit for bit: the scale search,
// plain per-tile Viterbi and LDLQ all go through encode_tiles, and the CUDA Viterbi is the CPU's twin
// (test_trellis_viterbi_cuda.cpp checks single calls; this checks the encoder's use of it, including LDLQ's
// one call per 16-row block whose inputs depend on the codes of the blocks before).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "quant/hessian.h"
#include "quant/trellis_encode.h"
#include "quant/trellis_viterbi.h"
#include "viterbi_cuda_env.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// H = XᵀX / rows of correlated rows x = z·A (a few large z), like a Linear's input statistics.
std::vector<float> correlated_hessian(Rng& rng, int64_t in, int rows) {
  std::vector<float> a(size_t(in * in)), x(size_t(rows * in));
  for (auto& v : a) v = rng.normal() / std::sqrt(float(in));
  for (int64_t i = 0; i < in; i++) a[i * in + i] += 1.0f;
  std::vector<float> z(static_cast<size_t>(in));
  for (int r = 0; r < rows; r++) {
    for (auto& v : z) v = rng.normal() * (rng.uniform() < 0.05f ? 4.0f : 1.0f);
    for (int64_t j = 0; j < in; j++) {
      double s = 0;
      for (int64_t i = 0; i < in; i++) s += z[i] * a[i * in + j];
      x[r * in + j] = float(s);
    }
  }
  HessianAccumulator acc(in);
  acc.add(x.data(), rows);
  return acc.hessian();
}

}  // namespace

TEST(EncoderCuda, QuantizeLinearMatchesCpuPlainAndLdlq) {
  if (!cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(2026);
  // Odd dims: padded to 256 x 256 (in 136 -> 256, out 200 -> 256), so zero rows and columns are encoded too.
  const int64_t out = 200, in = 136;
  std::vector<float> w(size_t(out * in));
  for (auto& v : w) v = rng.normal() * 0.02f;
  for (int64_t i = 0; i < in; i++) w[11 * in + i] *= 8.0f;  // one loud output channel
  const std::vector<float> h = correlated_hessian(rng, in, 4 * int(in));
  for (int K : {2, 4})
    for (bool ldlq : {false, true}) {
      EncodeOptions o;
      o.K = K;
      o.seed = 7;  // default scale search on: its batched calls are part of what is compared
      o.device = EncodeDevice::Cpu;
      const EncodedLinear cpu = quantize_linear(w.data(), out, in, ldlq ? h.data() : nullptr, o);
      o.device = EncodeDevice::Cuda;
      const EncodedLinear gpu = quantize_linear(w.data(), out, in, ldlq ? h.data() : nullptr, o);
      const std::string what = "K=" + std::to_string(K) + (ldlq ? " LDLQ" : " plain");
      EXPECT_EQ(cpu.used_hessian, ldlq) << what;
      EXPECT_EQ(gpu.used_hessian, ldlq) << what;
      EXPECT_EQ(gpu.g_scale, cpu.g_scale) << what;
      EXPECT_EQ(gpu.suh, cpu.suh) << what;
      EXPECT_EQ(gpu.svh, cpu.svh) << what;
      ASSERT_EQ(gpu.trellis.size(), cpu.trellis.size()) << what;
      EXPECT_EQ(gpu.trellis, cpu.trellis) << what;
      // The proxy error is a double sum in another order on each side (see test_trellis_viterbi_cuda.cpp).
      EXPECT_NEAR(gpu.proxy_err, cpu.proxy_err, 1e-9 * cpu.proxy_err) << what;
    }
}

// Many calls of a few tiles, then one large one, then a few again: the kept device buffers grow and are reused.
TEST(EncoderCuda, ReusedScratchAcrossCallSizes) {
  if (!cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(5);
  for (int64_t n : {1, 3, 200, 2}) {
    const int K = n == 200 ? 2 : 6;
    std::vector<float> x(size_t(n * 256));
    for (auto& v : x) v = rng.normal() * 1.1f;
    std::vector<uint16_t> s_cpu(x.size(), 0xAAAA), s_gpu(x.size(), 0x5555);
    std::vector<float> r_cpu(x.size()), r_gpu(x.size(), -1e30f);
    encode_tiles(x.data(), n, K, Codebook::Mcg, EncodeDevice::Cpu, s_cpu.data(), r_cpu.data());
    encode_tiles(x.data(), n, K, Codebook::Mcg, EncodeDevice::Cuda, s_gpu.data(), r_gpu.data());
    EXPECT_EQ(s_gpu, s_cpu) << n << " tiles";
    EXPECT_EQ(r_gpu, r_cpu) << n << " tiles";
  }
}
