// Included by the test binaries that encode on the GPU: frees the CUDA Viterbi's kept device buffers when the tests
// end, so compute-sanitizer's leak check (scripts/cuda_sanitize.sh) reports only real leaks.
#pragma once
#include <gtest/gtest.h>

#include "quant/trellis_viterbi_cuda.h"

namespace trellm::trellis {

struct ViterbiCudaRelease : ::testing::Environment {
  void TearDown() override {
    if (viterbi_cuda_available()) viterbi_cuda_release();
  }
};
inline ::testing::Environment* const kViterbiCudaRelease = ::testing::AddGlobalTestEnvironment(new ViterbiCudaRelease);

}  // namespace trellm::trellis
