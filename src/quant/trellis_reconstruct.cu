// See trellis_reconstruct_cuda.h. Read from exllamav3 (not copied): ext/quant/reconstruct.cu, exl3_dq.cuh.
#include <cuda_runtime.h>

#include "core/error.h"
#include "quant/trellis_reconstruct_cuda.h"

namespace trellm::trellis {

namespace {

constexpr int kWarpsPerBlock = 8;

template <int K, Codebook CB>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    reconstruct_kernel(const uint16_t* __restrict__ trellis, int64_t tiles_k, int64_t tiles_n, uint16_t* __restrict__ q,
                       int64_t ldq) {
  __shared__ uint32_t words[kWarpsPerBlock][8 * K];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (tile >= tiles_k * tiles_n) return;  // whole warps exit together: no __syncwarp below is left waiting
  const uint16_t* t = trellis + tile * tile_u16(K);
  for (int m = lane; m < 8 * K; m += 32) words[warp][m] = tile_word(t, m);
  __syncwarp();
  uint32_t s[8];
  lane_states(words[warp], K, lane, s);
  const int64_t row0 = (tile / tiles_n) * kTileDim, col0 = (tile % tiles_n) * kTileDim;
  for (int j = 0; j < 8; j++) {
    const int p = 8 * lane + j;
    q[(row0 + walk_k(p)) * ldq + col0 + walk_n(p)] = decode_state<CB>(s[j]);
  }
}

template <int K>
void launch_k(const uint16_t* trellis, int64_t tiles_k, int64_t tiles_n, Codebook cb, uint16_t* q, int64_t ldq,
              cudaStream_t stream) {
  const int64_t tiles = tiles_k * tiles_n;
  const unsigned blocks = unsigned((tiles + kWarpsPerBlock - 1) / kWarpsPerBlock);
  switch (cb) {
    case Codebook::Inst3:
      reconstruct_kernel<K, Codebook::Inst3><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(trellis, tiles_k, tiles_n, q, ldq);
      break;
    case Codebook::Mcg:
      reconstruct_kernel<K, Codebook::Mcg><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(trellis, tiles_k, tiles_n, q, ldq);
      break;
    case Codebook::Mul1:
      reconstruct_kernel<K, Codebook::Mul1><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(trellis, tiles_k, tiles_n, q, ldq);
      break;
    default: fail("trellis_reconstruct_cuda: unknown codebook ", int(cb));
  }
}

}  // namespace

void trellis_reconstruct_cuda(const uint16_t* trellis, int64_t tiles_k, int64_t tiles_n, int K, Codebook cb,
                              uint16_t* q, int64_t ldq, cudaStream_t stream) {
  if (tiles_k <= 0 || tiles_n <= 0) return;
  if (ldq < tiles_n * kTileDim) fail("trellis_reconstruct_cuda: ldq ", ldq, " < ", tiles_n * kTileDim);
  switch (K) {
    case 1: launch_k<1>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 2: launch_k<2>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 3: launch_k<3>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 4: launch_k<4>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 5: launch_k<5>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 6: launch_k<6>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 7: launch_k<7>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    case 8: launch_k<8>(trellis, tiles_k, tiles_n, cb, q, ldq, stream); break;
    default: fail("trellis_reconstruct_cuda: K = ", K, " is outside 1..8");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail("trellis_reconstruct_cuda: launch failed: ", cudaGetErrorString(err));
}

}  // namespace trellm::trellis
