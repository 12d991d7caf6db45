// CUDA decode of trellis codes to the rotated-domain fp16 weight Q (exllamav3's `reconstruct`): the device side
// of trellis_decode.h (lane_states + decode_state with hardware half ops), one warp per 16x16 tile, lane t
// decoding positions 8t..8t+7 exactly as an mma B fragment would. A reference for fast kernels and the
// dequantize -> cuBLAS path. Device pointers, asynchronous on `stream`. Only when TRELLM_HAVE_CUDA.
#pragma once
#include <cstdint>

#include "quant/trellis_decode.h"

typedef struct CUstream_st* cudaStream_t;  // as cuda_runtime_api.h declares it

namespace trellm::trellis {

// trellis: (tiles_k, tiles_n, 16K) uint16; q: (16·tiles_k) x ldq fp16 bits, row-major, columns [0, 16·tiles_n)
// written. Throws trellm::Error if the launch fails.
void trellis_reconstruct_cuda(const uint16_t* trellis, int64_t tiles_k, int64_t tiles_n, int K, Codebook cb,
                              uint16_t* q, int64_t ldq, cudaStream_t stream);

}  // namespace trellm::trellis
