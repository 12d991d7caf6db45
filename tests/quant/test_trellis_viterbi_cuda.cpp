// The CUDA Viterbi must agree with the CPU encoder bit for bit (same fp32 arithmetic and tie-breaking), for every K
// (the fast kernels for K = 2..6, the generic one for K = 1, 7, 8) and tile count: 1 (a grid of one block), odd
// counts that leave a partial traceback block and a partial wave (7, 133), and 1000 (more than one wave on any
// GPU; on an H200 the chunk is 924 tiles, so two chunks).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "quant/trellis_pack.h"
#include "quant/trellis_viterbi.h"
#include "viterbi_cuda_env.h"
#include "quant/trellis_viterbi_cuda.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

void check(int K, Codebook cb, int64_t n, Rng& rng) {
  std::vector<float> w(size_t(n) * 256);
  for (auto& v : w) v = rng.normal() * 1.2f;
  std::vector<uint16_t> s_cpu(w.size(), 0xAAAA), s_gpu(w.size(), 0x5555);  // poisoned differently
  std::vector<float> r_cpu(w.size()), r_gpu(w.size(), -1e30f);
  const double e_cpu = viterbi_encode_tiles(w.data(), n, K, cb, s_cpu.data(), r_cpu.data());
  const double e_gpu = viterbi_encode_tiles_cuda(w.data(), n, K, cb, s_gpu.data(), r_gpu.data());
  const std::string what = "K=" + std::to_string(K) + " " + codebook_name(cb) + " tiles=" + std::to_string(n);
  EXPECT_EQ(s_gpu, s_cpu) << what;
  EXPECT_EQ(r_gpu, r_cpu) << what;
  // Codes and reconstructions are bit-identical (above); the total squared error is a double sum in another
  // order on each side (seen on the H100: relative differences of ~1e-14).
  EXPECT_NEAR(e_gpu, e_cpu, 1e-10 * e_cpu) << what;
  for (int64_t t = 0; t < n; t++) EXPECT_TRUE(is_tail_biting(s_gpu.data() + t * 256, K)) << what << " tile " << t;
  // without recon, the states and the error are the same
  std::vector<uint16_t> s2(w.size(), 0x1234);
  const double e2 = viterbi_encode_tiles_cuda(w.data(), n, K, cb, s2.data(), nullptr);
  EXPECT_EQ(s2, s_cpu) << what << " (recon = nullptr)";
  EXPECT_EQ(e2, e_gpu) << what << " (recon = nullptr)";
}

}  // namespace

TEST(ViterbiCuda, AgreesWithCpuEveryKAndCodebook) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(31);
  for (int K = 1; K <= 8; K++)
    for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1})
      for (int64_t n : {1, 7, 12}) check(K, cb, n, rng);
}

TEST(ViterbiCuda, AgreesWithCpuManyTiles) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(32);
  // 133 tiles for every K (one codebook each, rotating), 1000 for the Ks the encoder uses most
  const Codebook cbs[3] = {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1};
  for (int K = 1; K <= 8; K++) check(K, cbs[K % 3], 133, rng);
  for (int K : {2, 3, 4}) check(K, cbs[(K + 1) % 3], 1000, rng);
}

// One tile at every K: the smallest grid of each kernel (fast K = 2..6, generic 1, 7, 8), and a run short enough
// for compute-sanitizer's racecheck, which instruments every shared-memory access of the 1024-thread blocks.
TEST(ViterbiCuda, OneTileEveryK) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(33);
  for (int K = 1; K <= 8; K++) check(K, Codebook::Mcg, 1, rng);
}

// Non-finite targets (NaN, inf, a value whose square overflows fp32) in some tiles: the fast kernels keep only the
// running minimum and recompute the winners in the traceback, which must follow the CPU's comparisons there too.
TEST(ViterbiCuda, NonFiniteTargetsAsTheCpu) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(34);
  for (int K = 1; K <= 8; K++) {
    const int64_t n = 5;
    std::vector<float> w(size_t(n) * 256);
    for (auto& v : w) v = rng.normal();
    w[37] = NAN;
    w[256 + 90] = 3e19f;
    w[512 + 150] = INFINITY;
    w[768 + 0] = -INFINITY;  // tile 4 stays finite
    std::vector<uint16_t> s_cpu(w.size(), 0xAAAA), s_gpu(w.size(), 0x5555);
    viterbi_encode_tiles(w.data(), n, K, Codebook::Mcg, s_cpu.data(), nullptr);
    viterbi_encode_tiles_cuda(w.data(), n, K, Codebook::Mcg, s_gpu.data(), nullptr);
    EXPECT_EQ(s_gpu, s_cpu) << "K=" << K;
  }
}
