// TRELLM_HD marks functions compiled for both host and device (one definition, e.g. the trellis decode).
#pragma once
#if defined(__CUDACC__)
#define TRELLM_HD __host__ __device__ __forceinline__
#else
#define TRELLM_HD inline
#endif
