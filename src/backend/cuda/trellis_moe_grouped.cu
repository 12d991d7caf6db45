// MoE prefill variant: grouped tensor-core GEMM. grid (out_padded/128, max_tiles, Z): block (group, t, z) takes
// tile tiles[t] = (expert, first grouped row, rows <= 16·MT) when t < *n_tiles (the tile list is built on the
// device, so the grid is sized by its host-side bound and surplus blocks exit at once); z selects gate/up (Z = 2)
// or down (Z = 1, which_base = 2). The column groups are the fastest grid dimension, so the blocks of one tile run
// together and read its A rows while they are in L2 (at 2K tokens the transformed A of one layer is 67 MB, more
// than the L2). No k-split: prefill grids are large.
//
// Instances: MT = kMT (128-row tiles, 2 blocks per SM) or MT = 1 (16-row tiles, 4 blocks per SM, when experts
// average <= kSmallTileMaxRowsPerExpert rows); and per (K, codebook) for layers whose experts all share them
// (every GLM layer), with the k-step loop unrolled by two: its own register allocation per path (the kernel that
// switches on K per tile spills 48-144 bytes at 128 registers, a specialised one none) and two decode chains in
// flight per warp. Measured on the H200 (MoE layer, 4 of 64 experts + shared, 128-row tiles): 32 tokens 615 ->
// 447 us, 128 tokens 736 -> 604 us, but 2,048 tokens 1,774 -> 1,837 us (unroll 1: 2,217 us), so the host uses it
// below kMoeSpecialMaxRows only. K = 0 is the generic kernel, for layers that mix K or codebooks and for large m.
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/trellis_moe.cuh"

namespace trellm::cuda::tk {

template <int K, int CB, int UNROLL, int MT>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 4 : 2)
    grouped_gemm_kernel(const MoeArgs a, const __half* A, int64_t a_zstride, int lda, float* Y, int64_t y_zstride,
                        int ldy, int which_base, int chunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int t = blockIdx.y, group = blockIdx.x, zz = blockIdx.z;  // see the grid note above
  if (t >= *a.n_tiles) return;
  const int4 tile = a.tiles[t];
  const DeviceTrellis w = expert_desc(a, tile.x)[which_base + zz];
  const int rows = tile.z;
  const __half* At = A + zz * a_zstride + int64_t(tile.y) * lda;
  float* Yt = Y + zz * y_zstride + int64_t(tile.y) * ldy;
  float acc[MT][2][4];
  if constexpr (K == 0) {
    with_k(w.K, [&](auto kc) {
      gemm_mainloop<decltype(kc)::value, MT, kGroupedStages>(w, At, lda, rows, group, 0, chunks, smem, acc);
    });
  } else {
    if (w.K != K || w.codebook != CB) __trap();  // the host's uniform codes disagree with a descriptor: fail loudly
    gemm_mainloop_cb<K, Codebook(CB), MT, kGroupedStages, UNROLL>(w, At, lda, rows, group, 0, chunks, smem, acc);
  }
  float* Ys = reinterpret_cast<float*>(smem);
  store_acc_tile<MT>(acc, Ys, kYPitch, rows);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < rows; r += kWarps) {
    const float4 q = *reinterpret_cast<const float4*>(Ys + r * kYPitch + 4 * lane);
    float v[4] = {q.x, q.y, q.z, q.w};
    out_transform(v, w, group * kGroupCols);
    store_row4(Yt + int64_t(r) * ldy, group * kGroupCols + 4 * lane, w.out, v);
  }
}

namespace {

// The kernel with its > 48 KB dynamic shared memory opted in (once per instance).
template <int K, int CB, int U, int MT>
GroupedGemmFn set_up() {
  static const GroupedGemmFn f = [] {
    GroupedGemmFn g = grouped_gemm_kernel<K, CB, U, MT>;
    TRELLM_CUDA_CHECK(cudaFuncSetAttribute(g, cudaFuncAttributeMaxDynamicSharedMemorySize, int(gemm_smem_bytes<8, MT, kGroupedStages>())));
    return g;
  }();
  return f;
}

// The instance for (k, codebook), or the generic one (K = 0) when the codes are mixed (k outside 2..8 or codebook
// outside 0..2).
template <int MT>
GroupedGemmFn pick(int k, int cb) {
  if (k < 2 || k > 8 || cb < 0 || cb > 2) return set_up<0, 0, 1, MT>();
  GroupedGemmFn f = nullptr;
  with_k(k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    f = cb == 0 ? set_up<K, 0, 2, MT>() : cb == 1 ? set_up<K, 1, 2, MT>() : set_up<K, 2, 2, MT>();
  });
  return f;
}

}  // namespace

GroupedGemmFn grouped_gemm_for(int k, int codebook, int mt) { return mt == 1 ? pick<1>(k, codebook) : pick<kMT>(k, codebook); }

size_t grouped_smem_bytes(int mt) { return mt == 1 ? gemm_smem_bytes<8, 1, kGroupedStages>() : gemm_smem_bytes<8, kMT, kGroupedStages>(); }

}  // namespace trellm::cuda::tk
