#include "backend/backend.h"

#include "core/error.h"

#ifdef TRELLM_HAVE_CUDA
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#endif

namespace trellm {

bool cuda_available() {
#ifdef TRELLM_HAVE_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
#ifdef TRELLM_HAVE_CUDA
  return std::make_unique<CudaBackend>(device);
#else
  fail("this trellm was built without CUDA (configure with nvcc on the PATH, or -DTRELLM_CUDA=ON)");
#endif
}

}  // namespace trellm
