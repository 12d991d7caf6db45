// The device side of trellis_decode.h (lane_states, hardware half ops) reproduces exllamav3's own decode of the
// fixture bit for bit, like the host side does (test_trellis_ref.cpp).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "format/safetensors.h"
#include "quant/trellis_reconstruct_cuda.h"
#include "quant/trellis_viterbi_cuda.h"
#include "quant/trellis_weight.h"

using namespace trellm;
using namespace trellm::trellis;

TEST(TrellisCudaDecode, ReproducesExllamaInnerFp16) {
  if (!viterbi_cuda_available()) GTEST_SKIP() << "no CUDA device";
  const TensorStore st = TensorStore::open(TRELLM_TEST_DATA "/exl3/exl3_oracle_w384x128.safetensors");
  const TrellisReader reader(st);
  for (int K : {2, 3, 4, 6})
    for (const char* cb : {"3inst", "mcg", "mul1"}) {
      const std::string key = "w384x128_k" + std::to_string(K) + "_" + cb;
      const TrellisWeight w = read_trellis_weight(key, reader.finder(), 384, 128);
      const size_t n_codes = size_t(w.tiles_k() * w.tiles_n()) * tile_u16(K), n_q = 384 * 128;
      uint16_t *d_codes = nullptr, *d_q = nullptr;
      ASSERT_EQ(cudaMalloc(&d_codes, n_codes * 2), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&d_q, n_q * 2), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d_codes, w.trellis, n_codes * 2, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemset(d_q, 0xFF, n_q * 2), cudaSuccess);  // poison: 0xFFFF is a NaN, never a codebook value
      trellis_reconstruct_cuda(d_codes, w.tiles_k(), w.tiles_n(), K, w.codebook, d_q, 128, nullptr);
      std::vector<uint16_t> q(n_q);
      ASSERT_EQ(cudaMemcpy(q.data(), d_q, n_q * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      cudaFree(d_codes);
      cudaFree(d_q);
      const uint16_t* want = st.get(key + ".inner_fp16").view().ptr<uint16_t>();
      int mismatches = 0;
      for (size_t i = 0; i < n_q; i++) mismatches += q[i] != want[i];
      EXPECT_EQ(mismatches, 0) << key;
    }
}
