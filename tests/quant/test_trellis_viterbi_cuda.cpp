// The CUDA Viterbi must agree with the CPU encoder bit for bit (same fp32 arithmetic and tie-breaking).
#include <gtest/gtest.h>

#include <vector>

#include "core/rng.h"
#include "quant/trellis_pack.h"
#include "quant/trellis_viterbi.h"
#include "quant/trellis_viterbi_cuda.h"

using namespace trellm;
using namespace trellm::trellis;

TEST(ViterbiCuda, AgreesWithCpuEveryKAndCodebook) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(31);
  const int64_t n = 12;
  for (int K = 1; K <= 8; K++)
    for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1}) {
      std::vector<float> w(n * 256);
      for (auto& v : w) v = rng.normal() * 1.2f;
      std::vector<uint16_t> s_cpu(w.size(), 0xAAAA), s_gpu(w.size(), 0x5555);  // poisoned differently
      std::vector<float> r_cpu(w.size()), r_gpu(w.size(), -1e30f);
      const double e_cpu = viterbi_encode_tiles(w.data(), n, K, cb, s_cpu.data(), r_cpu.data());
      const double e_gpu = viterbi_encode_tiles_cuda(w.data(), n, K, cb, s_gpu.data(), r_gpu.data());
      EXPECT_EQ(s_gpu, s_cpu) << "K=" << K << " " << codebook_name(cb);
      EXPECT_EQ(r_gpu, r_cpu) << "K=" << K << " " << codebook_name(cb);
      // Codes and reconstructions are bit-identical (above); the total squared error is a double sum in another
      // order on each side (seen on the H100: relative differences of ~1e-14).
      EXPECT_NEAR(e_gpu, e_cpu, 1e-10 * e_cpu);
      for (int64_t t = 0; t < n; t++) EXPECT_TRUE(is_tail_biting(s_gpu.data() + t * 256, K));
    }
}
