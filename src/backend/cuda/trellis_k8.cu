// Instances of the dense trellis kernels (GEMV, GEMM, dequantize) for K = 8: one K per translation unit
// so CI's 2-core build compiles them in parallel.
#include "backend/cuda/trellis_linear.cuh"

namespace trellm::cuda::tk {
TRELLM_INSTANTIATE_LINEAR(8)
}  // namespace trellm::cuda::tk
