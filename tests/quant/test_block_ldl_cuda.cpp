// block_ldl_batch_cuda against the CPU's block_ldl: the factors must be equal bit for bit (the same Crout order and
// the same double operations on both sides), and a Hessian whose undamped Cholesky fails on the CPU must be reported
// as failed by the GPU. Fresh random Hessians of several sizes (16, 48, 272, 1040: one block of 1024 lanes, a few
// blocks with a barrier between columns, not a multiple of 32), several in one batch, also while the encoder's
// Viterbi holds the SMs, the outputs poisoned first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <atomic>
#include <limits>
#include <thread>
#include <vector>

#include "core/rng.h"
#include "quant/block_ldl.h"
#include "quant/block_ldl_cuda.h"
#include "quant/trellis_viterbi_cuda.h"
#include "viterbi_cuda_env.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// H = A·Aᵀ / r + diag(d): positive definite, with the spread of a real Hessian's diagonal (d in [0.01, 2)).
std::vector<float> random_spd(Rng& rng, int64_t n) {
  const int64_t r = n / 2 + 3;
  std::vector<float> a(size_t(n * r)), h(size_t(n * n));
  for (auto& v : a) v = rng.normal() * (rng.uniform() < 0.1f ? 5.0f : 1.0f);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j <= i; j++) {
      double s = 0;
      for (int64_t k = 0; k < r; k++) s += double(a[i * r + k]) * a[j * r + k];
      h[i * n + j] = h[j * n + i] = float(s / double(r));
    }
  for (int64_t i = 0; i < n; i++) h[i * n + i] += 0.01f + 2.0f * rng.uniform();
  return h;
}

// Every Hessian of the batch against the CPU's block_ldl, bit for bit; `bad` ones must be reported as failed.
void expect_cpu_factors(const std::vector<std::vector<float>>& hs, int64_t n) {
  std::vector<std::vector<float>> ls(hs.size(), std::vector<float>(size_t(n * n), std::numeric_limits<float>::quiet_NaN()));
  std::vector<const float*> hp;
  std::vector<float*> lp;
  for (size_t b = 0; b < hs.size(); b++) hp.push_back(hs[b].data()), lp.push_back(ls[b].data());
  const std::vector<bool> ok = block_ldl_batch_cuda(hp, n, lp);
  ASSERT_EQ(ok.size(), hs.size());
  for (size_t b = 0; b < hs.size(); b++) {
    SCOPED_TRACE("n = " + std::to_string(n) + ", Hessian " + std::to_string(b) + " of " + std::to_string(hs.size()));
    std::vector<float> cpu;
    const bool cpu_ok = block_ldl(std::vector<double>(hs[b].begin(), hs[b].end()), n, 0.025f, 0, cpu);
    ASSERT_EQ(bool(ok[b]), cpu_ok);
    if (!cpu_ok) continue;
    int64_t differ = 0, first = -1;
    for (int64_t i = 0; i < n * n; i++)
      if (std::memcmp(&cpu[size_t(i)], &ls[b][size_t(i)], sizeof(float)) != 0 && differ++ == 0) first = i;
    EXPECT_EQ(differ, 0) << "first at (" << first / n << ", " << first % n << "): CPU " << cpu[size_t(first)]
                         << ", GPU " << ls[b][size_t(first)];
  }
}

}  // namespace

TEST(BlockLdlCuda, FactorsEqualTheCpuBitForBit) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(20261203);
  // A few Hessians: 16, 48 in one block each; 272 in 2 blocks each (1084 lanes in column 0).
  for (int64_t n : {16, 48, 272}) {
    std::vector<std::vector<float>> hs;
    for (int b = 0; b < 3; b++) hs.push_back(random_spd(rng, n));
    expect_cpu_factors(hs, n);
  }
}

TEST(BlockLdlCuda, ABlockPerHessianEqualsTheCpuToo) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(31);
  // 16 and more at once: 17 x 48 a block each; 16 x 272 in 2 blocks each, then 160 x 48 (more than the SMs) a block
  // each with the rows in several passes of its lanes; one indefinite Hessian among them.
  for (auto [n, count] : {std::pair<int64_t, int>{48, 17}, {272, 16}, {272, 160}}) {
    std::vector<std::vector<float>> hs;
    for (int b = 0; b < count; b++) hs.push_back(random_spd(rng, n));
    hs[5][size_t(20 * n + 20)] = -2.0f;
    expect_cpu_factors(hs, n);
  }
}

TEST(BlockLdlCuda, EqualsTheCpuWhileTheViterbiHoldsTheSms) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(1203);
  // The encoder's case: a lone Hessian split over 5 blocks (1040: o_proj's kind), two of 272, factored while another
  // thread keeps the GPU full of Viterbi blocks on its own lane (the blocks of one Hessian wait at each column for
  // each other, so each of them has to find an SM among those).
  std::vector<float> w(size_t(4096) * 256);
  for (auto& v : w) v = rng.normal();
  std::atomic<bool> stop = false;
  std::atomic<int> rounds = 0;
  std::thread busy([&] {
    std::vector<uint16_t> st(w.size());
    while (!stop) viterbi_encode_tiles_cuda(w.data(), 4096, 3, Codebook::Mcg, st.data(), nullptr), rounds++;
  });
  while (rounds == 0) std::this_thread::yield();
  expect_cpu_factors({random_spd(rng, 1040)}, 1040);
  expect_cpu_factors({random_spd(rng, 272), random_spd(rng, 272)}, 272);
  stop = true;
  busy.join();
}

TEST(BlockLdlCuda, ReportsTheHessiansWhosePivotFails) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  Rng rng(7);
  const int64_t n = 64;
  std::vector<float> good = random_spd(rng, n), indefinite = random_spd(rng, n), nan = random_spd(rng, n);
  indefinite[40 * n + 40] = -1.0f;  // pivot 40 negative: the Cholesky stops there
  nan[5 * n + 3] = std::numeric_limits<float>::quiet_NaN();  // lower triangle: read
  const std::vector<const float*> hp = {indefinite.data(), good.data(), nan.data()};
  std::vector<std::vector<float>> ls(3, std::vector<float>(size_t(n * n), 0.0f));
  const std::vector<float*> lp = {ls[0].data(), ls[1].data(), ls[2].data()};
  const std::vector<bool> ok = block_ldl_batch_cuda(hp, n, lp);
  for (int b = 0; b < 3; b++) {
    std::vector<float> cpu;
    const bool cpu_ok = block_ldl(std::vector<double>(hp[b], hp[b] + n * n), n, 0.025f, 0, cpu);
    EXPECT_EQ(bool(ok[b]), cpu_ok) << "Hessian " << b;
    if (cpu_ok) {
      EXPECT_EQ(0, std::memcmp(cpu.data(), ls[b].data(), cpu.size() * sizeof(float)));
    }
  }
  EXPECT_FALSE(ok[0]);
  EXPECT_TRUE(ok[1]);
  EXPECT_FALSE(ok[2]);
}
