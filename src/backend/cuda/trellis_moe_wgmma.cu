// MoE prefill, large tiles: grouped GEMM on wgmma (sm_90a). A block takes up to 256 grouped rows of one
// expert (kWgRows: at 2K tokens every expert fits one tile, so each weight is decoded once per layer instead of
// ~2.3 times with 128-row tiles) and one 128-column group:
//   16 warps decode the step's 32 trellis tiles (64 k x 128 columns) into fp16 in shared memory, in wgmma's
//   canonical K-major layout, once for all rows; 4 warpgroups (64 rows each) multiply with
//   wgmma.m64n128k16 reading A (the transformed activations) and B from shared memory.
// Pipeline per 64-k step s: cp.async ring of 4 stages (A + trellis words, two steps ahead), B decoded into one
// of two fp16 buffers, two barriers per step; the wgmma of step s runs asynchronously while the block decodes step s + 1.
// Why: the mma.sync kernel (trellis_moe_grouped.cu) reached ~100 TFLOP/s at 2K tokens (ncu, H200: 1.0 ms for
// the gate/up GEMM of one layer), issue-bound on decoding each expert once per 128-row tile and on every warp
// re-reading the A tile with ldmatrix; here decoding and A reads happen once per block.
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/trellis_moe.cuh"

namespace trellm::cuda::tk {

namespace {

constexpr int kWgThreads = 512;                        // 4 warpgroups
constexpr int kWgStepK = 64;                           // k per pipeline step: 4 tile rows, 4 wgmma k16 steps
constexpr int kWgStages = 4;                           // loads two steps ahead; the stage refilled was read two steps back
constexpr size_t kWgABytes = size_t(kWgRows) * kWgStepK * 2;   // 32 KB: A rows x 64 k, fp16, core-matrix layout
constexpr size_t kWgWBytes = size_t(4) * 8 * 32 * 8;           // trellis words of 4 x 8 tiles at K <= 8: 8 KB
constexpr size_t kWgStageBytes = kWgABytes + kWgWBytes;
constexpr size_t kWgBBytes = size_t(kGroupCols) * kWgStepK * 2;  // 16 KB decoded B per step
constexpr size_t kWgRing = kWgStages * kWgStageBytes + 2 * kWgBBytes;
constexpr size_t kWgYBytes = size_t(kWgRows) * kYPitch * 4;     // epilogue f32 tile, reuses the ring
constexpr size_t kWgSmem = kWgRing > kWgYBytes ? kWgRing : kWgYBytes;
static_assert(kWgSmem <= 227 * 1024, "wgmma MoE GEMM smem over the sm_90 per-block limit");

// Canonical no-swizzle K-major layouts (8 rows x 16 bytes = one 128-byte core matrix):
//   A stage: core (r8, k8) at (r8 * 8 + k8) * 128: K-adjacent cores 128 B apart, M-adjacent 1,024 B.
//   B buffer: core (n8, k8) at ((k8 / 2) * 16 + n8) * 256 + (k8 % 2) * 128: K-adjacent 128 B, N-adjacent 256 B;
//   one k16 step (k8 pair) is a contiguous 4 KB.
constexpr uint32_t kALbo = 128, kASbo = 1024, kBLbo = 128, kBSbo = 256;

__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((saddr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) | (uint64_t((sbo >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to the async proxy (wgmma operands).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d[64] += A(64 x 16, smem) · B(16 x 128, smem); scale_d = 0 ignores d (first product).
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7,"
        "%8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23,"
        "%24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39,"
        "%40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55,"
        "%56, %57, %58, %59, %60, %61, %62, %63},"
        " %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// One step's loads, with every per-thread address fixed once per block (the generic loop spent ~20 instructions
// per 16-byte copy on index arithmetic): thread t copies A row t / 8 + 64 j, 16-byte column t % 8 (j < 4, rows
// below the active warpgroups only; rows >= rows zero-filled), and trellis piece t of the 4 x 8 tiles
// ([row][tile][8K words]) when t < 4 * 16K.
template <int K>
struct WgLoader {
  const __half* a_src[4];
  uint32_t a_dst[4];
  bool a_on[4], a_ok[4];
  const uint16_t* w_src;
  uint32_t w_dst;
  int64_t w_step;  // uint16 per 64-k step: 4 tile rows
  bool w_on;

  __device__ __forceinline__ WgLoader(const __half* A, int64_t lda, int rows, int rows_active, const DeviceTrellis& w, int group,
                                      uint32_t smem_base) {
    const int t = threadIdx.x, c = t & 7;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int r = (t >> 3) + 64 * j;
      a_on[j] = r < rows_active;
      a_ok[j] = r < rows;
      a_src[j] = A + int64_t(a_ok[j] ? r : 0) * lda + c * 8;
      a_dst[j] = smem_base + ((r >> 3) * 8 + c) * 128 + (r & 7) * 16;
    }
    constexpr int kRow16 = 16 * K;  // 16-byte pieces per tile row of 8 tiles
    const int tiles_n = w.out_padded / 16;
    const int r = t / kRow16, o = t - r * kRow16;
    w_on = t < 4 * kRow16;
    w_src = w.trellis + (int64_t(r) * tiles_n + group * 8) * (16 * K) + o * 8;
    w_dst = smem_base + uint32_t(kWgABytes) + (r * (64 * K) + o * 4) * 4;
    w_step = int64_t(4) * tiles_n * (16 * K);
  }
  __device__ __forceinline__ void load(int step, uint32_t stage_off) const {
#pragma unroll
    for (int j = 0; j < 4; j++)
      if (a_on[j])
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a_dst[j] + stage_off),
                     "l"(a_src[j] + (a_ok[j] ? step * kWgStepK : 0)), "r"(a_ok[j] ? 16 : 0));
    if (w_on)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(w_dst + stage_off), "l"(w_src + step * w_step));
  }
};
static_assert(kWgThreads >= 4 * 16 * 8, "one trellis piece per thread covers 4 x 8 tiles up to K = 8");

}  // namespace

// grid (max_tiles, out_padded/128, Z) as grouped_gemm_kernel; tiles of <= kWgRows rows.
template <int K, int CB>
__global__ void __launch_bounds__(kWgThreads, 1)
    grouped_wgmma_kernel(const MoeArgs a, const __half* A, int64_t a_zstride, int lda, float* Y, int64_t y_zstride,
                         int ldy, int which_base, int chunks) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = blockIdx.x, group = blockIdx.y, zz = blockIdx.z;
  if (t >= *a.n_tiles) return;
  const int4 tile = a.tiles[t];
  const DeviceTrellis w = expert_desc(a, tile.x)[which_base + zz];
  const int rows = tile.z, rows_active = (rows + 63) / 64 * 64;
  const __half* At = A + zz * a_zstride + int64_t(tile.y) * lda;
  float* Yt = Y + zz * y_zstride + int64_t(tile.y) * ldy;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wg = warp >> 2;
  const bool mma_on = wg * 64 < rows;  // this warpgroup holds rows of the tile (epilogue)
  unsigned char* bbuf = smem + kWgStages * kWgStageBytes;
  const int steps = chunks * (kChunk / kWgStepK);

  float d[64];
#pragma unroll
  for (int i = 0; i < 64; i++) d[i] = 0.f;

  const WgLoader<K> ld(At, lda, rows, rows_active, w, group, smem_addr(smem));
  for (int s = 0; s < 2; s++) {
    if (s < steps) ld.load(s, s * uint32_t(kWgStageBytes));
    cp_commit();
  }
  for (int s = 0; s < steps; s++) {
    unsigned char* stage = smem + (s % kWgStages) * kWgStageBytes;
    cp_wait<1>();
    // One barrier: step s's words and A are in; every warpgroup has passed wg_wait<1> of step s - 1, so the
    // wgmma of step s - 2 (last reader of B buffer s % 2 and of ring stage (s + 2) % 4) is complete.
    __syncthreads();
    const int nxt = s + 2;
    if (nxt < steps) ld.load(nxt, (nxt % kWgStages) * uint32_t(kWgStageBytes));
    cp_commit();
    // Decode the step's 32 tiles (kk = i / 8, column tile ct = i % 8), two per warp, into B buffer s % 2.
    const uint32_t* wd = reinterpret_cast<const uint32_t*>(stage + kWgABytes);
    unsigned char* bs = bbuf + (s & 1) * kWgBBytes;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int i = warp + 16 * h, kk = i >> 3, ct = i & 7;
      uint32_t st[8], b[4];
      trellis::lane_states(wd + kk * 64 * K + ct * 8 * K, K, lane, st);
      decode8<Codebook(CB)>(st, b);
      // b[0]: n = g, k = 2c..2c+1; b[1]: k + 8; b[2], b[3]: n + 8  (g = lane / 4, c = lane % 4)
      unsigned char* core = bs + (kk * 16 + 2 * ct) * 256 + (lane >> 2) * 16 + (lane & 3) * 4;
      *reinterpret_cast<uint32_t*>(core) = b[0];
      *reinterpret_cast<uint32_t*>(core + 128) = b[1];
      *reinterpret_cast<uint32_t*>(core + 256) = b[2];
      *reinterpret_cast<uint32_t*>(core + 384) = b[3];
    }
    fence_async_smem();  // this thread's cp.async A rows and decoded B, for the async proxy (wgmma)
    __syncthreads();
    // Every warpgroup multiplies, also past the tile's rows (their A rows hold stale data; those rows are never
    // stored): a branch around wgmma makes ptxas serialize every wgmma (C7518, "WG.DP in divergent path"), and
    // the tensor cores have slack here: the block is bound by the decode.
    wg_fence();
    const uint32_t a_base = smem_addr(stage) + wg * 8 * 8 * 128, b_base = smem_addr(bs);
#pragma unroll
    for (int kk = 0; kk < kWgStepK / 16; kk++)
      wgmma_m64n128k16(d, wg_desc(a_base + kk * 2 * 128, kALbo, kASbo), wg_desc(b_base + kk * 4096, kBLbo, kBSbo), 1);
    wg_commit();
    wg_wait<1>();  // step s - 1 is done
  }
  wg_wait<0>();
  cp_wait<0>();
  __syncthreads();  // the ring is free: stage the f32 tile

  float* Ys = reinterpret_cast<float*>(smem);
  if (mma_on) {
    const int r0 = wg * 64 + (warp & 3) * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < 16; j++) {
      const int col = j * 8 + 2 * (lane & 3);
      if (r0 < rows) *reinterpret_cast<float2*>(Ys + r0 * kYPitch + col) = make_float2(d[4 * j], d[4 * j + 1]);
      if (r0 + 8 < rows) *reinterpret_cast<float2*>(Ys + (r0 + 8) * kYPitch + col) = make_float2(d[4 * j + 2], d[4 * j + 3]);
    }
  }
  __syncthreads();
  for (int r = warp; r < rows; r += kWgThreads / 32) {
    const float4 q = *reinterpret_cast<const float4*>(Ys + r * kYPitch + 4 * lane);
    float v[4] = {q.x, q.y, q.z, q.w};
    out_transform(v, w, group * kGroupCols);
    store_row4(Yt + int64_t(r) * ldy, group * kGroupCols + 4 * lane, w.out, v);
  }
}

namespace {

template <int K, int CB>
GroupedGemmFn wg_set_up() {
  static const GroupedGemmFn f = [] {
    GroupedGemmFn g = grouped_wgmma_kernel<K, CB>;
    TRELLM_CUDA_CHECK(cudaFuncSetAttribute(g, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kWgSmem)));
    return g;
  }();
  return f;
}

template <int... Ks>
GroupedGemmFn wg_pick(int k, int cb, std::integer_sequence<int, Ks...>) {
  GroupedGemmFn f = nullptr;
  ((k == Ks ? (f = cb == 0 ? wg_set_up<Ks, 0>() : cb == 1 ? wg_set_up<Ks, 1>() : wg_set_up<Ks, 2>()) : nullptr), ...);
  return f;
}

}  // namespace

GroupedGemmFn grouped_wgmma_for(int k, int codebook) {
  if (k < 2 || k > 8 || codebook < 0 || codebook > 2) return nullptr;
  return wg_pick(k, codebook, std::integer_sequence<int, 2, 3, 4, 5, 6, 7, 8>{});
}

size_t grouped_wgmma_smem_bytes() { return kWgSmem; }

}  // namespace trellm::cuda::tk
