// Instances of the dense trellis kernels (GEMV, GEMM, dequantize) for K = 5: one K per translation unit
// so CI's 2-core build compiles them in parallel.
#include "backend/cuda/trellis_linear.cuh"

namespace trellm::cuda::tk {
TRELLM_INSTANTIATE_LINEAR(5)
}  // namespace trellm::cuda::tk
