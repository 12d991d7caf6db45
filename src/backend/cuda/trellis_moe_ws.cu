// MoE prefill, large m: the grouped GEMM on wgmma (sm_90a) with warp specialisation. A block (640 threads) takes
// up to 256 grouped rows of one expert (at 2K tokens every expert fits one tile, so each weight is decoded once per
// layer instead of ~2.3 times with 128-row tiles) and one 128-column group:
//   warpgroup 0, the producer: issues the cp.async copies of each 64-k step (A rows in wgmma's core layout, the
//     trellis words of 4 x 8 tiles) two steps ahead, and decodes the step's 32 trellis tiles into fp16 in shared
//     memory (canonical no-swizzle K-major layout), 8 tiles per warp;
//   warpgroups 1-4, the consumers: rows [64c, 64c + 64), wgmma.m64n128k16 from shared memory.
// They meet only at named barriers per ring stage (FULL: decoded and copied; EMPTY: the stage's wgmma finished), so
// the decode of step s + 1 overlaps the multiplies of step s across warps; there is no block-wide barrier in the
// loop. A 4-stage ring (A 32 KB + words 8 KB + B 16 KB per stage, 224 KB), one block per SM; 640 threads leave 96
// registers per thread (the consumers' wgmma needs ~90; 768 threads would leave 80, ptxas C7602).
// History: a wgmma kernel without specialisation (8458a1b) and one with 128-row tiles and 4-12 decoder warps
// (521aef0) were within +-5 % of the mma.sync kernel (trellis_moe_grouped.cu).
#include <utility>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/trellis_moe.cuh"

namespace trellm::cuda::tk {

namespace {

constexpr int kWsProducerWGs = 1;                           // 4 decoder warps: 640 threads keep 96 registers
constexpr int kWsConsumerWGs = 4;                           // 4 x m64 = 256-row tiles
constexpr int kWsProducers = 128 * kWsProducerWGs;
constexpr int kWsThreads = kWsProducers + 128 * kWsConsumerWGs;
constexpr int kWsRows = 64 * kWsConsumerWGs;              // tile rows
constexpr int kWsStepK = 64;                                // k per step: 4 tile rows, 4 wgmma k16 steps
constexpr int kWsStages = 4;
constexpr size_t kWsABytes = size_t(kWsRows) * kWsStepK * 2;     // 32 KB
constexpr size_t kWsWBytes = size_t(4) * 8 * 32 * 8;             // trellis words of 4 x 8 tiles, K <= 8: 8 KB
constexpr size_t kWsBBytes = size_t(kGroupCols) * kWsStepK * 2;  // 16 KB decoded B
constexpr size_t kWsStageBytes = kWsABytes + kWsWBytes + kWsBBytes;
constexpr size_t kWsRing = kWsStages * kWsStageBytes;            // 224 KB
constexpr size_t kWsYBytes = size_t(kWsRows) * kYPitch * 4;      // epilogue f32 tile (reuses the ring)
constexpr size_t kWsSmem = kWsRing > kWsYBytes ? kWsRing : kWsYBytes;
static_assert(kWsSmem <= 227 * 1024, "wgmma MoE GEMM smem over the sm_90 per-block limit");
// Named barriers (0 is __syncthreads): FULL[stage] 1..4, EMPTY[stage] 5..8, producer-only 9, consumer-only 10.
constexpr int kBarFull = 1, kBarEmpty = 5, kBarProducer = 9, kBarConsumer = 10;

// Canonical no-swizzle K-major layouts (8 rows x 16 bytes = one 128-byte core matrix):
//   A stage: core (r8, k8) at (r8 * 8 + k8) * 128: K-adjacent cores 128 B apart, M-adjacent 1,024 B.
//   B stage: core (n8, k8) at ((k8 / 2) * 16 + n8) * 256 + (k8 % 2) * 128: K-adjacent 128 B, N-adjacent 256 B;
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

__device__ __forceinline__ void bar_sync(int id, int threads) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory"); }

}  // namespace

// grid (out_padded/128, max_tiles, Z) as grouped_gemm_kernel; tiles of <= 128 rows.
template <int K, int CB>
__global__ void __launch_bounds__(kWsThreads, 1)
    grouped_ws_kernel(const MoeArgs a, const __half* A, int64_t a_zstride, int lda, float* Y, int64_t y_zstride, int ldy,
                      int which_base, int chunks) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = blockIdx.y, group = blockIdx.x, zz = blockIdx.z;  // a tile's column blocks run together
  if (t >= *a.n_tiles) return;
  const int4 tile = a.tiles[t];
  const DeviceTrellis w = expert_desc(a, tile.x)[which_base + zz];
  const int rows = tile.z;
  const __half* At = A + zz * a_zstride + int64_t(tile.y) * lda;
  float* Yt = Y + zz * y_zstride + int64_t(tile.y) * ldy;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wg = warp >> 2;
  const int steps = chunks * (kChunk / kWsStepK);
  const uint32_t sbase = smem_addr(smem);

  if (wg < kWsProducerWGs) {
    // ---- producers ----
    const int pt = threadIdx.x;  // 0 .. kWsProducers - 1
    // Fixed per-thread copies: A row pt % 128, 16-byte columns c0 .. c0 + kCols - 1 of the step's 8, and trellis
    // pieces pt, pt + kWsProducers, ... of the 4 x 8 tiles.
    constexpr int kARows = kWsRows / kWsProducers;  // rows per thread: pt + kWsProducers * j, all 8 columns
    bool a_ok[kARows];
    const __half* a_src[kARows];
    uint32_t a_dst[kARows];
#pragma unroll
    for (int j = 0; j < kARows; j++) {
      const int ar = pt + kWsProducers * j;
      a_ok[j] = ar < rows;
      a_src[j] = At + int64_t(a_ok[j] ? ar : 0) * lda;
      a_dst[j] = sbase + ((ar >> 3) * 8) * 128 + (ar & 7) * 16;
    }
    constexpr int kRow16 = 16 * K, kPieces = 4 * kRow16;
    const int tiles_n = w.out_padded / 16;
    const int64_t w_step = int64_t(4) * tiles_n * (16 * K);
    auto load = [&](int s) {
      const uint32_t st = uint32_t((s % kWsStages) * kWsStageBytes);
#pragma unroll
      for (int j = 0; j < kARows; j++)
#pragma unroll
        for (int c = 0; c < 8; c++)
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a_dst[j] + st + c * 128),
                       "l"(a_src[j] + (a_ok[j] ? s * kWsStepK + c * 8 : 0)), "r"(a_ok[j] ? 16 : 0));
      for (int i = pt; i < kPieces; i += kWsProducers) {
        const int r = i / kRow16, o = i - r * kRow16;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sbase + st + uint32_t(kWsABytes) + (r * (64 * K) + o * 4) * 4),
                     "l"(w.trellis + (int64_t(r) * tiles_n + group * 8) * (16 * K) + o * 8 + s * w_step));
      }
    };
    load(0);
    cp_commit();
    if (steps > 1) load(1);
    cp_commit();
    for (int s = 0; s < steps; s++) {
      const int nxt = s + 2;
      if (nxt < steps) {
        if (nxt >= kWsStages) bar_sync(kBarEmpty + nxt % kWsStages, kWsThreads);  // step nxt - 4 released its stage
        load(nxt);
      }
      cp_commit();
      cp_wait<2>();                        // this thread's copies of step s are in
      bar_sync(kBarProducer, kWsProducers);  // ... and every producer thread's (the words are decoded across warps)
      unsigned char* st = smem + (s % kWsStages) * kWsStageBytes;
      const uint32_t* wd = reinterpret_cast<const uint32_t*>(st + kWsABytes);
      unsigned char* bs = st + kWsABytes + kWsWBytes;
#pragma unroll
      for (int i = warp; i < 32; i += kWsProducers / 32) {
        const int kk = i >> 3, ct = i & 7;
        uint32_t sv[8], b[4];
        trellis::lane_states(wd + kk * 64 * K + ct * 8 * K, K, lane, sv);
        decode8<Codebook(CB)>(sv, b);
        // b[0]: n = g, k = 2c..2c+1; b[1]: k + 8; b[2], b[3]: n + 8  (g = lane / 4, c = lane % 4)
        unsigned char* core = bs + (kk * 16 + 2 * ct) * 256 + (lane >> 2) * 16 + (lane & 3) * 4;
        *reinterpret_cast<uint32_t*>(core) = b[0];
        *reinterpret_cast<uint32_t*>(core + 128) = b[1];
        *reinterpret_cast<uint32_t*>(core + 256) = b[2];
        *reinterpret_cast<uint32_t*>(core + 384) = b[3];
      }
      fence_async_smem();                  // this thread's A copies and B stores, for the async proxy
      bar_arrive(kBarFull + s % kWsStages, kWsThreads);
    }
    cp_wait<0>();
    return;
  }

  // ---- consumers: warpgroup c holds rows [64c, 64c + 64) ----
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; i++) d[i] = 0.f;
  const int cw = wg - kWsProducerWGs;
  for (int s = 0; s < steps; s++) {
    const int stg = s % kWsStages;
    bar_sync(kBarFull + stg, kWsThreads);
    wg_fence();
    const uint32_t st = sbase + uint32_t(stg * kWsStageBytes);
    const uint32_t a_base = st + cw * 8 * 8 * 128, b_base = st + uint32_t(kWsABytes + kWsWBytes);
#pragma unroll
    for (int kk = 0; kk < kWsStepK / 16; kk++)
      wgmma_m64n128k16(d, wg_desc(a_base + kk * 2 * 128, kALbo, kASbo), wg_desc(b_base + kk * 4096, kBLbo, kBSbo), 1);
    wg_commit();
    wg_wait<1>();  // step s - 1 is done: release its stage if the producer will refill it
    if (s >= 1 && s - 1 + kWsStages < steps) bar_arrive(kBarEmpty + (s - 1) % kWsStages, kWsThreads);
  }
  wg_wait<0>();
  bar_sync(kBarConsumer, 128 * kWsConsumerWGs);  // the consumers are done with the ring (the producer before them)
  float* Ys = reinterpret_cast<float*>(smem);
  const int r0 = cw * 64 + (warp & 3) * 16 + (lane >> 2);
#pragma unroll
  for (int j = 0; j < 16; j++) {
    const int col = j * 8 + 2 * (lane & 3);
    if (r0 < rows) *reinterpret_cast<float2*>(Ys + r0 * kYPitch + col) = make_float2(d[4 * j], d[4 * j + 1]);
    if (r0 + 8 < rows) *reinterpret_cast<float2*>(Ys + (r0 + 8) * kYPitch + col) = make_float2(d[4 * j + 2], d[4 * j + 3]);
  }
  bar_sync(kBarConsumer, 128 * kWsConsumerWGs);
  for (int r = warp - kWsProducers / 32; r < rows; r += 4 * kWsConsumerWGs) {
    const float4 q = *reinterpret_cast<const float4*>(Ys + r * kYPitch + 4 * lane);
    float v[4] = {q.x, q.y, q.z, q.w};
    out_transform(v, w, group * kGroupCols);
    store_row4(Yt + int64_t(r) * ldy, group * kGroupCols + 4 * lane, w.out, v);
  }
}

namespace {

template <int K, int CB>
GroupedGemmFn ws_set_up() {
  static const GroupedGemmFn f = [] {
    GroupedGemmFn g = grouped_ws_kernel<K, CB>;
    TRELLM_CUDA_CHECK(cudaFuncSetAttribute(g, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kWsSmem)));
    return g;
  }();
  return f;
}

template <int... Ks>
GroupedGemmFn ws_pick(int k, int cb, std::integer_sequence<int, Ks...>) {
  GroupedGemmFn f = nullptr;
  ((k == Ks ? (f = cb == 0 ? ws_set_up<Ks, 0>() : cb == 1 ? ws_set_up<Ks, 1>() : ws_set_up<Ks, 2>()) : nullptr), ...);
  return f;
}

}  // namespace

GroupedGemmFn grouped_ws_for(int k, int codebook) {
  if (k < 2 || k > 8 || codebook < 0 || codebook > 2) return nullptr;
  return ws_pick(k, codebook, std::integer_sequence<int, 2, 3, 4, 5, 6, 7, 8>{});
}

size_t grouped_ws_smem_bytes() { return kWsSmem; }

}  // namespace trellm::cuda::tk
