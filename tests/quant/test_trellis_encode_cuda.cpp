// quantize_linear with the Viterbi on the GPU must write the CPU's EXL3 tensors bit for bit: the scale search,
// plain per-tile Viterbi and LDLQ all go through encode_tiles, and the CUDA Viterbi is the CPU's twin
// (test_trellis_viterbi_cuda.cpp checks single calls; this checks the encoder's use of it, including LDLQ's
// one call per 16-row block whose inputs depend on the codes of the blocks before).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "quant/block_ldl.h"
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
      // The proxy error: plain, a double sum in another order (see test_trellis_viterbi_cuda.cpp); LDLQ, two cuBLAS
      // fp32 GEMMs on the GPU against the CPU's fp32 row sums (relative differences of ~1e-6 expected).
      EXPECT_NEAR(gpu.proxy_err, cpu.proxy_err, (ldlq ? 1e-4 : 1e-9) * cpu.proxy_err) << what;
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

// The batched LDLQ on the GPU (trellis_ldlq.cu) against the CPU's, bit for bit: one and three weights, odd tile
// counts per block row (3, 5), the fast Viterbi (K = 2, 3, 6) and the generic one (K = 1, 7); GPU outputs poisoned.
TEST(EncoderCuda, LdlqBatchMatchesCpu) {
  if (!cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(41);
  struct Case { int64_t k, n; int count, K; };
  for (const Case c : {Case{48, 80, 3, 3}, Case{64, 48, 1, 2}, Case{32, 80, 3, 6}, Case{32, 48, 2, 1}, Case{48, 48, 3, 7}}) {
    std::vector<std::vector<float>> w(size_t(c.count)), l(size_t(c.count));
    for (int b = 0; b < c.count; b++) {
      w[b].resize(size_t(c.k * c.n));
      for (auto& v : w[b]) v = rng.normal() * 1.1f;
      const std::vector<float> h = correlated_hessian(rng, c.k, int(3 * c.k));
      std::vector<double> hd(h.begin(), h.end());
      ASSERT_TRUE(block_ldl(hd, c.k, 0.025f, 4, l[b]));
    }
    std::vector<std::vector<uint16_t>> sc(size_t(c.count)), sg(size_t(c.count));
    std::vector<std::vector<float>> rc(size_t(c.count)), rg(size_t(c.count));
    std::vector<const float*> wp, lp;
    std::vector<uint16_t*> scp, sgp;
    std::vector<float*> rcp, rgp;
    for (int b = 0; b < c.count; b++) {
      sc[b].assign(size_t(c.k * c.n), 0xAAAA), sg[b].assign(size_t(c.k * c.n), 0x5555);
      rc[b].assign(size_t(c.k * c.n), -1e30f), rg[b].assign(size_t(c.k * c.n), 1e30f);
      wp.push_back(w[b].data()), lp.push_back(l[b].data());
      scp.push_back(sc[b].data()), sgp.push_back(sg[b].data()), rcp.push_back(rc[b].data()), rgp.push_back(rg[b].data());
    }
    quantize_ldlq_batch(wp, lp, c.k, c.n, c.K, Codebook::Mcg, scp, rcp, EncodeDevice::Cpu);
    quantize_ldlq_batch(wp, lp, c.k, c.n, c.K, Codebook::Mcg, sgp, rgp, EncodeDevice::Cuda);
    for (int b = 0; b < c.count; b++) {
      const std::string what = "k=" + std::to_string(c.k) + " n=" + std::to_string(c.n) + " K=" + std::to_string(c.K) +
                               " weight " + std::to_string(b);
      EXPECT_EQ(sg[b], sc[b]) << what;
      EXPECT_EQ(rg[b], rc[b]) << what;
    }
  }
}

// quantize_linears on the GPU: a group with and without Hessians gives the CPU's tensors.
TEST(EncoderCuda, QuantizeLinearsMatchesCpu) {
  if (!cuda_encoder_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(42);
  const int64_t out = 136, in = 200;  // padded to 256 x 256
  const std::vector<float> h = correlated_hessian(rng, in, 3 * int(in));
  std::vector<std::vector<float>> w(3);
  for (auto& v : w) {
    v.resize(size_t(out * in));
    for (auto& x : v) x = rng.normal() * 0.02f;
  }
  const float* ws[3] = {w[0].data(), w[1].data(), w[2].data()};
  const float* hs[3] = {h.data(), nullptr, h.data()};
  const uint64_t seeds[3] = {3, 4, 5};
  EncodeOptions o;
  o.K = 3;
  o.device = EncodeDevice::Cpu;
  const std::vector<EncodedLinear> cpu = quantize_linears(ws, out, in, hs, seeds, o);
  o.device = EncodeDevice::Cuda;
  const std::vector<EncodedLinear> gpu = quantize_linears(ws, out, in, hs, seeds, o);
  ASSERT_EQ(gpu.size(), cpu.size());
  for (size_t b = 0; b < cpu.size(); b++) {
    EXPECT_EQ(gpu[b].trellis, cpu[b].trellis) << b;
    EXPECT_EQ(gpu[b].suh, cpu[b].suh) << b;
    EXPECT_EQ(gpu[b].g_scale, cpu[b].g_scale) << b;
    EXPECT_NEAR(gpu[b].proxy_err, cpu[b].proxy_err, 1e-4 * cpu[b].proxy_err) << b;  // GEMMs on the GPU (above)
  }
}
