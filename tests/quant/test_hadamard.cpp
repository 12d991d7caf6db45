// Hadamard: entries against (-1)^popcount(i&j)/sqrt(128), orthogonality, blockwise row/column transforms
// against a straightforward dense product.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <vector>

#include "core/rng.h"
#include "quant/hadamard.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {
double ref_h(int i, int j) { return (std::popcount(unsigned(i & j)) % 2 ? -1.0 : 1.0) / std::sqrt(128.0); }
}  // namespace

TEST(Hadamard, EntriesAndOrthogonality) {
  std::vector<float> H(128 * 128);  // column j = H e_j
  for (int j = 0; j < 128; j++) {
    std::vector<float> e(128, 0.0f);
    e[j] = 1.0f;
    hadamard128(e.data());
    for (int i = 0; i < 128; i++) H[i * 128 + j] = e[i];
  }
  for (int i = 0; i < 128; i++)
    for (int j = 0; j < 128; j++) ASSERT_NEAR(H[i * 128 + j], ref_h(i, j), 1e-7) << i << "," << j;
  double worst = 0;
  for (int i = 0; i < 128; i++)
    for (int j = 0; j < 128; j++) {
      double s = 0;
      for (int k = 0; k < 128; k++) s += double(H[i * 128 + k]) * H[j * 128 + k];
      worst = std::max(worst, std::abs(s - (i == j ? 1.0 : 0.0)));
    }
  EXPECT_LT(worst, 1e-6);
}

TEST(Hadamard, RowsAndColsMatchDenseProduct) {
  Rng rng(11);
  const int64_t R = 3, C = 256;  // rows transform: A (R x C) * blockdiag(H, H)
  std::vector<float> a(R * C), b;
  for (auto& v : a) v = rng.normal();
  b = a;
  hadamard_rows(b.data(), R, C);
  for (int64_t r = 0; r < R; r++)
    for (int64_t c = 0; c < C; c++) {
      double s = 0;
      const int64_t blk = c / 128 * 128;
      for (int k = 0; k < 128; k++) s += double(a[r * C + blk + k]) * ref_h(k, int(c - blk));
      ASSERT_NEAR(b[r * C + c], s, 1e-5) << r << "," << c;
    }
  hadamard_rows(b.data(), R, C);  // H is its own inverse
  for (size_t i = 0; i < a.size(); i++) ASSERT_NEAR(b[i], a[i], 1e-5);

  const int64_t R2 = 256, C2 = 5;  // column transform: blockdiag(H, H) * A (R2 x C2), odd width
  std::vector<float> m(R2 * C2), n;
  for (auto& v : m) v = rng.normal();
  n = m;
  hadamard_cols(n.data(), R2, C2);
  for (int64_t r = 0; r < R2; r++)
    for (int64_t c = 0; c < C2; c++) {
      double s = 0;
      const int64_t blk = r / 128 * 128;
      for (int k = 0; k < 128; k++) s += ref_h(int(r - blk), k) * double(m[(blk + k) * C2 + c]);
      ASSERT_NEAR(n[r * C2 + c], s, 1e-5) << r << "," << c;
    }
}
