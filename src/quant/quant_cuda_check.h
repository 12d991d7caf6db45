// The encoder's CUDA error check (trellis_viterbi.cu, trellis_ldlq.cu): a failed runtime call or launch becomes a
// trellm::Error naming the expression, file and line. The backend has its own (backend/cuda/cuda_check.h), which
// this layer may not include (quant sits above backend).
#pragma once
#include <cuda_runtime.h>

#include "core/error.h"

#define TRELLM_QUANT_CUDA_CHECK(expr)                                                                \
  do {                                                                                               \
    const cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                         \
      ::trellm::fail(#expr, " failed at ", __FILE__, ":", __LINE__, ": ", cudaGetErrorString(err_)); \
  } while (0)
