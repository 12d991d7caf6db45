// MoE prefill variant: grouped tensor-core GEMM. grid (max_tiles, out_padded/128, Z): block t takes tile
// tiles[t] = (expert, first grouped row, rows <= 128) when t < *n_tiles (the tile list is built on the device,
// so the grid is sized by its host-side bound and surplus blocks exit at once). z selects gate/up (Z = 2) or
// down (Z = 1, which_base = 2). No k-split: prefill grids are large.
#include "backend/cuda/trellis_moe.cuh"

namespace trellm::cuda::tk {

__global__ void __launch_bounds__(kThreads, 2)
    grouped_gemm_kernel(const MoeArgs a, const __half* A, int64_t a_zstride, int lda, float* Y, int64_t y_zstride,
                        int ldy, int which_base, int chunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int t = blockIdx.x, group = blockIdx.y, zz = blockIdx.z;
  if (t >= *a.n_tiles) return;
  const int4 tile = a.tiles[t];
  const DeviceTrellis w = expert_desc(a, tile.x)[which_base + zz];
  const int rows = tile.z;
  const __half* At = A + zz * a_zstride + int64_t(tile.y) * lda;
  float* Yt = Y + zz * y_zstride + int64_t(tile.y) * ldy;
  float acc[kMT][2][4];
  with_k(w.K, [&](auto kc) {
    gemm_mainloop<decltype(kc)::value, kMT, kGroupedStages>(w, At, lda, rows, group, 0, chunks, smem, acc);
  });
  float* Ys = reinterpret_cast<float*>(smem);
  store_acc_tile<kMT>(acc, Ys, kYPitch, rows);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < rows; r += kWarps) {
    const float4 q = *reinterpret_cast<const float4*>(Ys + r * kYPitch + 4 * lane);
    float v[4] = {q.x, q.y, q.z, q.w};
    out_transform(v, w, group * kGroupCols);
    store_row4(Yt + int64_t(r) * ldy, group * kGroupCols + 4 * lane, w.out, v);
  }
}

}  // namespace trellm::cuda::tk
