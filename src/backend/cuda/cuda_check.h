// CUDA error checks: every runtime/cuBLAS call and every launch goes through these. A failure is a bug or
// a broken device, reported with the expression, file and line.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

#define TRELLM_CUDA_CHECK(expr)                                                                       \
  do {                                                                                                \
    cudaError_t e_ = (expr);                                                                          \
    if (e_ != cudaSuccess)                                                                            \
      ::trellm::fail("CUDA error ", cudaGetErrorName(e_), " (", cudaGetErrorString(e_), ") in ", #expr, \
                     " at ", __FILE__, ":", __LINE__);                                                \
  } while (0)

#define TRELLM_CUBLAS_CHECK(expr)                                                                     \
  do {                                                                                                \
    cublasStatus_t s_ = (expr);                                                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                                  \
      ::trellm::fail("cuBLAS error ", cublasGetStatusName(s_), " in ", #expr, " at ", __FILE__, ":", __LINE__); \
  } while (0)

// After a kernel launch: catches bad launch configurations immediately (cheap; no synchronisation).
#define TRELLM_CUDA_LAUNCH_CHECK() TRELLM_CUDA_CHECK(cudaGetLastError())
