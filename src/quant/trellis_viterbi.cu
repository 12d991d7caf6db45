// CUDA tail-biting Viterbi; see trellis_viterbi_cuda.h. Two kernels compute the same function as the CPU encoder
// (trellis_viterbi.cpp) bit for bit: the same fp32 arithmetic per branch (d = cb - w, c = fma(d, d, pred)), the
// first strict minimum over ascending k, the lowest end node on ties, the same two-pass tail-biting scheme.
//  - K = 2..6: the fast path (trellis_viterbi_fast.h holds its thread decomposition, shared with a CPU emulation
//    test): one tile per 1024-thread block, each thread owning 64 fixed states whose codebook values live in
//    registers (fp16 pairs), node costs double-buffered in shared memory, predecessor costs loaded once per
//    group, no argmin in the step (the node costs are written to rows in global memory instead, every step or
//    every second), and the traceback, which recomputes the winning branch on the path from those rows, with the
//    reconstruction and squared error in separate one-warp-per-tile kernels, so their dependent loads overlap
//    across tiles instead of stalling a block. Design and bound: docs/kernels.md.
//  - K = 1, 7, 8: the generic kernel (costs and codebook through global memory, byte backpointers, serial
//    traceback in the block). K = 1's 2 x 128 KB of costs do not fit in shared memory with double buffering, and
//    K = 7, 8 have fewer than 64 states per predecessor group slice.
// exllamav3's kernel (ext/quant/quantize_tiles_kernel.cuh, read, not copied) keeps fp16 costs; ours are fp32 to
// match the CPU encoder exactly.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/half.h"
#include "quant/quant_cuda_check.h"
#include "quant/trellis_viterbi.h"
#include "quant/trellis_viterbi_cuda.h"
#include "quant/trellis_viterbi_fast.h"

namespace trellm::trellis {

namespace {

// ---------------------------------------------------------------------------------------------------------
// Generic kernel (K = 1, 7, 8): one block per tile, everything through global memory.

constexpr int kGenericThreads = 1024;

// One forward pass of `steps` values for the tile of this block; cost_in holds the initial node costs.
template <int K>
__device__ void generic_forward(const float* __restrict__ cb, const float* w, float* cost_a, float* cost_b,
                             uint8_t* __restrict__ bp) {
  constexpr int kNodes = 1 << (16 - K), kBranch = 1 << K;
  float* cost = cost_a;
  float* next = cost_b;
  for (int p = 0; p < kTileElems; p++) {
    const float wv = w[p];
    for (int o = threadIdx.x; o < kNodes; o += blockDim.x) {
      float best = INFINITY;
      int bk = 0;
      for (int k = 0; k < kBranch; k++) {
        const uint32_t s = (uint32_t(k) << (16 - K)) | uint32_t(o);
        const float d = __fsub_rn(__ldg(cb + s), wv);
        const float c = __fmaf_rn(d, d, cost[s >> K]);
        if (c < best) best = c, bk = k;
      }
      next[o] = best;
      bp[size_t(p) * kNodes + o] = uint8_t(bk);
    }
    __syncthreads();
    float* t = cost;
    cost = next;
    next = t;
  }
  // kTileElems is even, so the final costs are back in cost_a.
}

template <int K>
__device__ void generic_traceback(const uint8_t* bp, uint32_t end, uint16_t* states) {
  constexpr int kNodes = 1 << (16 - K);
  uint32_t o = end;
  for (int p = kTileElems - 1; p >= 0; p--) {
    const uint32_t k = bp[size_t(p) * kNodes + o];
    const uint32_t s = (k << (16 - K)) | o;
    states[p] = uint16_t(s);
    o = s >> K;
  }
}

template <int K>
__global__ void __launch_bounds__(kGenericThreads) generic_kernel(const float* __restrict__ cb, const float* __restrict__ w,
                                                           uint16_t* __restrict__ states, float* __restrict__ recon,
                                                           float* __restrict__ costs, uint8_t* __restrict__ bps) {
  constexpr int kNodes = 1 << (16 - K);
  const int tile = blockIdx.x;
  const float* tw = w + size_t(tile) * kTileElems;
  float* cost_a = costs + size_t(tile) * 2 * kNodes;
  float* cost_b = cost_a + kNodes;
  uint8_t* bp = bps + size_t(tile) * kTileElems * kNodes;
  __shared__ float seq[kTileElems];
  __shared__ uint16_t path[kTileElems];
  __shared__ float red_v[kGenericThreads];
  __shared__ uint32_t red_i[kGenericThreads];

  // Pass 1: unconstrained, rotated by 128.
  for (int i = threadIdx.x; i < kTileElems; i += blockDim.x) seq[i] = tw[(i + kTileElems / 2) % kTileElems];
  for (int o = threadIdx.x; o < kNodes; o += blockDim.x) cost_a[o] = 0.0f;
  __syncthreads();
  generic_forward<K>(cb, seq, cost_a, cost_b, bp);
  // argmin over nodes, lowest index on ties (as the CPU's first strict minimum)
  float bv = INFINITY;
  uint32_t bi = 0xFFFFFFFFu;
  for (int o = threadIdx.x; o < kNodes; o += blockDim.x)
    if (cost_a[o] < bv) bv = cost_a[o], bi = uint32_t(o);
  red_v[threadIdx.x] = bv;
  red_i[threadIdx.x] = bi;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) {
      const float v2 = red_v[threadIdx.x + stride];
      const uint32_t i2 = red_i[threadIdx.x + stride];
      if (v2 < red_v[threadIdx.x] || (v2 == red_v[threadIdx.x] && i2 < red_i[threadIdx.x]))
        red_v[threadIdx.x] = v2, red_i[threadIdx.x] = i2;
    }
    __syncthreads();
  }
  // no finite cost anywhere (non-finite targets): node 0, as the CPU's scan, never the out-of-range sentinel
  if (threadIdx.x == 0) generic_traceback<K>(bp, red_i[0] < uint32_t(kNodes) ? red_i[0] : 0u, path);
  __syncthreads();
  const uint32_t e = uint32_t(path[kTileElems / 2]) >> K;

  // Pass 2: from position 0, start and end in node e.
  for (int i = threadIdx.x; i < kTileElems; i += blockDim.x) seq[i] = tw[i];
  for (int o = threadIdx.x; o < kNodes; o += blockDim.x) cost_a[o] = o == int(e) ? 0.0f : INFINITY;
  __syncthreads();
  generic_forward<K>(cb, seq, cost_a, cost_b, bp);
  if (threadIdx.x == 0) generic_traceback<K>(bp, e, path);
  __syncthreads();
  for (int p = threadIdx.x; p < kTileElems; p += blockDim.x) {
    states[size_t(tile) * kTileElems + p] = path[p];
    recon[size_t(tile) * kTileElems + p] = __ldg(cb + path[p]);
  }
}

template <int K>
void launch_generic(const float* cb, const float* w, uint16_t* states, float* recon, float* costs, uint8_t* bps, int tiles,
                    cudaStream_t stream) {
  generic_kernel<K><<<tiles, kGenericThreads, 0, stream>>>(cb, w, states, recon, costs, bps);
}


// ---------------------------------------------------------------------------------------------------------
// Fast path (K = 2..6).

constexpr float kInfF = __builtin_huge_valf();
constexpr int kTracebackThreads = 128;

// Shared memory of the forward kernel: two cost vectors, the tile's 256 targets, the argmin scratch (32 + 32).
template <int K>
constexpr size_t fast_smem_bytes() {
  return (2 * size_t(vfast::Layout<K>::kNodes) + kTileElems + 64) * sizeof(float);
}
static_assert(fast_smem_bytes<2>() <= 227 * 1024, "K = 2: 2 x 64 KB of costs + 1.25 KB fit an H100/H200 block");

// One forward pass per block (tile). Pass 1 (kSecond = false): positions 128..255, 0..127 from all-zero costs;
// writes the cost rows its traceback reads (after steps 127..254) and the argmin end node in ends[tile].
// Pass 2: positions 0..255 from node ends[tile] (= e, written by pass 1's traceback); rows after steps 0..254.
template <int K, bool kSecond>
__global__ void __launch_bounds__(vfast::kThreads, 1)
    fast_forward_kernel(const float* __restrict__ w, Codebook cb, uint32_t* __restrict__ ends,
                        float* __restrict__ rows) {
  using L = vfast::Layout<K>;
  extern __shared__ __align__(16) float smem[];  // float4 stores of the cost rows
  float* const cost_a = smem;
  float* const cost_b = smem + L::kNodes;
  float* const seq = cost_b + L::kNodes;
  float* const red_v = seq + kTileElems;
  uint32_t* const red_i = reinterpret_cast<uint32_t*>(red_v + 32);
  const int t = int(threadIdx.x), tile = int(blockIdx.x);
  const float* tw = w + size_t(tile) * kTileElems;

  uint32_t cbh[vfast::kCbRegs];
  vfast::codebook_regs<K>(t, cb, cbh);
  if (t < kTileElems) seq[t] = kSecond ? tw[t] : tw[(t + kTileElems / 2) % kTileElems];
  const uint32_t e = kSecond ? ends[tile] : 0u;
  for (int o = t; o < L::kNodes; o += vfast::kThreads) cost_a[o] = !kSecond || uint32_t(o) == e ? 0.0f : kInfF;
  __syncthreads();

  // 32-bit offset of the tile's rows (a chunk is < 2^32 floats of rows, asserted by fast_chunk)
  const uint32_t row0 = uint32_t(tile) * uint32_t(vfast::kCostRows<K> * L::kNodes);
  // Even steps read cost_a and write cost_b, odd steps the other way, selected from p's parity: with swapped
  // pointers live across the loop, pass 2 at K = 3 spilled (-Xptxas -v: 12 bytes, 2 LDL a step); unrolling two
  // steps to make both addresses constant spilled 300-440 bytes at every K.
#pragma unroll 1
  for (int p = 0; p < kTileElems; p++) {
    // The codebook registers are loop-invariant; this empty asm makes them look rewritten each step so the
    // compiler cannot hoist the 64 fp16 -> fp32 conversions out of the loop (64 more live registers: spills).
#pragma unroll
    for (int r = 0; r < vfast::kCbRegs; r++) asm volatile("" : "+r"(cbh[r]));
    const bool odd = p & 1;
    // cost_row(p) is inside the tile's rows for every p (kept or not)
    float* const row = rows + (row0 + uint32_t(vfast::cost_row<K>(p)) * uint32_t(L::kNodes));
    vfast::step<K>(t, cbh, seq[p], odd ? cost_b : cost_a, odd ? cost_a : cost_b, row, vfast::keeps_costs<K>(kSecond, p));
    __syncthreads();  // next is complete; cost may be overwritten by the following step
  }
  const float* const cost = cost_a;  // 256 steps: the final costs are back in cost_a

  if constexpr (!kSecond) {
    // argmin over the end nodes, lowest index on ties (the CPU's first strict minimum)
    float bv = kInfF;
    uint32_t bi = 0xFFFFFFFFu;
    for (int o = t; o < L::kNodes; o += vfast::kThreads)
      if (cost[o] < bv) bv = cost[o], bi = uint32_t(o);
    const int lane = t & 31, warp = t >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float v2 = __shfl_down_sync(0xFFFFFFFFu, bv, off);
      const uint32_t i2 = __shfl_down_sync(0xFFFFFFFFu, bi, off);
      if (v2 < bv || (v2 == bv && i2 < bi)) bv = v2, bi = i2;
    }
    if (lane == 0) red_v[warp] = bv, red_i[warp] = bi;
    __syncthreads();
    if (warp == 0) {
      bv = red_v[lane];
      bi = red_i[lane];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float v2 = __shfl_down_sync(0xFFFFFFFFu, bv, off);
        const uint32_t i2 = __shfl_down_sync(0xFFFFFFFFu, bi, off);
        if (v2 < bv || (v2 == bv && i2 < bi)) bv = v2, bi = i2;
      }
      // no finite cost anywhere (only with non-finite targets): node 0, as the CPU's scan, and never out of range
      if (lane == 0) ends[tile] = bi < uint32_t(L::kNodes) ? bi : 0u;
    }
  }
}

// One warp per tile: the dependent loads of many tiles are in flight together, and at each step lane k recomputes
// branch k of the node on the path (K = 6: lanes k and k + 32) from the cost rows; a shuffle argmin with the lowest
// k on ties is the CPU's first strict minimum (every lane's value has NaN mapped to +inf by first_best, which the
// strict comparison treats alike). Pass 1: trace from the end node down to step 128 (position 0 of the rotated
// pass) and replace ends[tile] by the overlap e = state(128) >> K. Pass 2: trace from e over all 256 steps, then
// write the states, the reconstruction and the tile's squared error (summed over p = 0..255 in double without
// contraction, as the CPU).
template <int K, bool kSecond>
__global__ void __launch_bounds__(kTracebackThreads)
    fast_traceback_kernel(int tiles, const float* __restrict__ rows, uint32_t* __restrict__ ends, Codebook cb,
                          const float* __restrict__ w, uint16_t* __restrict__ states, float* __restrict__ recon,
                          double* __restrict__ err) {
  using L = vfast::Layout<K>;
  constexpr int kWarps = kTracebackThreads / 32;
  __shared__ float seqs[kWarps][kTileElems];
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int tile = int(blockIdx.x) * kWarps + warp;
  if (tile >= tiles) return;  // whole warps: no block-wide barrier below
  const float* tw = w + size_t(tile) * kTileElems;
  float* seq = seqs[warp];
  for (int i = lane; i < kTileElems; i += 32) seq[i] = kSecond ? tw[i] : tw[(i + kTileElems / 2) % kTileElems];
  __syncwarp();
  const uint32_t start = ends[tile];
  const vfast::TracePass tp{cb, seq, rows + size_t(tile) * vfast::kCostRows<K> * L::kNodes, kSecond, start};
  uint16_t* ts = states + size_t(tile) * kTileElems;
  uint32_t o = start;
  for (int p = kTileElems - 1; p >= (kSecond ? 0 : kTileElems / 2); p--) {
    float bv = kInfF;
    uint32_t bk = 0xFFFFFFFFu;  // idle lanes (k >= 2^K) lose every tie
#pragma unroll
    for (int k = lane; k < L::kBranch; k += 32) {
      const float c = vfast::traced_branch<K>(tp, p, o, k);
      if (k == lane) bv = vfast::first_best(c), bk = uint32_t(k);
      else if (c < bv) bv = c, bk = uint32_t(k);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float v2 = __shfl_xor_sync(0xFFFFFFFFu, bv, off);
      const uint32_t k2 = __shfl_xor_sync(0xFFFFFFFFu, bk, off);
      if (v2 < bv || (v2 == bv && k2 < bk)) bv = v2, bk = k2;
    }
    const uint32_t s = (bk << (16 - K)) | o;
    if (kSecond && lane == 0) ts[p] = uint16_t(s);
    o = s >> K;
  }
  if (lane != 0) return;
  if constexpr (!kSecond) {
    ends[tile] = o;
  } else {
    double e = 0;
    for (int p = 0; p < kTileElems; p++) {
      const float v = f16_to_f32(decode_state(cb, ts[p]));
      recon[size_t(tile) * kTileElems + p] = v;
      const double d = __dsub_rn(double(v), double(tw[p]));
      e = __dadd_rn(e, __dmul_rn(d, d));
    }
    err[tile] = e;
  }
}

template <int K>
void launch_fast(const float* w, Codebook cb, uint32_t* ends, float* rows, uint16_t* states, float* recon,
                 double* err, int tiles, cudaStream_t stream) {
  constexpr size_t smem = fast_smem_bytes<K>();
  // above 48 KB a block needs the raised dynamic limit (K = 2: 129 KB, K = 3: 65 KB)
  TRELLM_QUANT_CUDA_CHECK(cudaFuncSetAttribute(fast_forward_kernel<K, false>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  TRELLM_QUANT_CUDA_CHECK(cudaFuncSetAttribute(fast_forward_kernel<K, true>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  constexpr int kTilesPerBlock = kTracebackThreads / 32;
  const int tb_blocks = (tiles + kTilesPerBlock - 1) / kTilesPerBlock;
  fast_forward_kernel<K, false><<<tiles, vfast::kThreads, smem, stream>>>(w, cb, ends, rows);
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  fast_traceback_kernel<K, false><<<tb_blocks, kTracebackThreads, 0, stream>>>(tiles, rows, ends, cb, w, states, recon, err);
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  fast_forward_kernel<K, true><<<tiles, vfast::kThreads, smem, stream>>>(w, cb, ends, rows);
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  fast_traceback_kernel<K, true><<<tb_blocks, kTracebackThreads, 0, stream>>>(tiles, rows, ends, cb, w, states, recon, err);
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

bool viterbi_cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}


namespace {

// Device buffers kept from one call to the next: `trellm quantize` makes thousands of small calls (LDLQ encodes one
// 16-row block of a Linear per call: out/16 tiles, 8-16 on the built-in model), and a cudaMalloc + cudaFree of the
// cost rows (up to 4 GiB) per call would cost more than the kernel. Buffers grow to the largest call seen and
// live until the process exits (the driver frees them then) or viterbi_cuda_release.
// One set per lane: a lane is a non-blocking stream and the scratch of the calls on it, held by one caller at a time,
// so the scale search of one group and the LDLQ of the one before run side by side (each alone leaves SMs idle in
// its tracebacks and copies).
struct DeviceScratch {
  cudaStream_t stream = nullptr;
  bool urgent = false;  // the stream's priority class (ViterbiLane)
  bool busy = false;
  const float* cb[3] = {};  // the codebook tables (generic kernel), uploaded once each
  float *w = nullptr, *recon = nullptr, *costs = nullptr;
  uint16_t* states = nullptr;
  uint8_t* trace = nullptr;  // what the tracebacks read: generic: 1-byte backpointers; fast: the cost rows
  uint32_t* ends = nullptr;  // fast: end node, then e, per tile
  double* err = nullptr;     // fast: squared error per tile
  size_t w_bytes = 0, recon_bytes = 0, states_bytes = 0, costs_bytes = 0, trace_bytes = 0, ends_bytes = 0, err_bytes = 0;
  std::vector<float> rec;     // host copy of the reconstruction (generic path's error sum)
  std::vector<double> terr;   // host copy of the per-tile errors (fast path)
  int sms = 0;
  int64_t fast_budget = 0;  // bytes of cost rows per chunk (fast path), from the device's memory
};

// Lanes are made on demand, up to kMaxLanes of each priority class (the quantizer holds up to three urgent ones, the
// LDLQ of the groups in flight, and two others: the scale search working ahead, a plain Viterbi); a caller finding all
// of its class taken waits.
constexpr size_t kMaxLanes = 3;

struct Lanes {
  std::mutex mu;
  std::condition_variable freed;
  std::vector<std::unique_ptr<DeviceScratch>> all;
  int device = 0;  // the CUDA device every lane runs on (viterbi_cuda_use_device)
};

Lanes& lanes() {
  static Lanes* l = new Lanes;  // never destroyed: no CUDA calls after the runtime shuts down
  return *l;
}

// Takes a free lane of the class (waiting while kMaxLanes of it are taken) and puts the calling thread on the lanes'
// device. Urgent lanes' streams have the priority under the device's greatest (kept for the block LDL, whose factors
// the quantizer's main thread waits for): when both classes have blocks waiting, the SMs go to the urgent ones first
// (the LDLQ is the critical path; the scale search ahead of it only fills the SMs it leaves idle).
DeviceScratch& acquire_lane(bool urgent) {
  Lanes& ls = lanes();
  std::unique_lock<std::mutex> lock(ls.mu);
  DeviceScratch* got = nullptr;
  while (!got) {
    size_t of_class = 0;
    for (auto& sc : ls.all) {
      if (sc->urgent != urgent) continue;
      of_class++;
      if (!sc->busy) {
        got = sc.get();
        break;
      }
    }
    if (!got && of_class < kMaxLanes) {
      TRELLM_QUANT_CUDA_CHECK(cudaSetDevice(ls.device));
      int least = 0, greatest = 0;
      TRELLM_QUANT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      auto sc = std::make_unique<DeviceScratch>();
      sc->urgent = urgent;
      const int below_greatest = greatest + 1 < least ? greatest + 1 : greatest;  // numerically lower is greater
      TRELLM_QUANT_CUDA_CHECK(
          cudaStreamCreateWithPriority(&sc->stream, cudaStreamNonBlocking, urgent ? below_greatest : least));
      ls.all.push_back(std::move(sc));
      got = ls.all.back().get();
    }
    if (!got) ls.freed.wait(lock);
  }
  TRELLM_QUANT_CUDA_CHECK(cudaSetDevice(ls.device));  // per host thread: the pool's workers call this too
  got->busy = true;
  return *got;
}

void release_lane(DeviceScratch& sc) {
  Lanes& ls = lanes();
  {
    std::lock_guard<std::mutex> lock(ls.mu);
    sc.busy = false;
  }
  ls.freed.notify_all();  // waiters of both classes
}

// Holds a lane for the lifetime of the object.
struct HeldLane {
  DeviceScratch& sc;
  explicit HeldLane(bool urgent) : sc(acquire_lane(urgent)) {}
  ~HeldLane() { release_lane(sc); }
  HeldLane(const HeldLane&) = delete;
  HeldLane& operator=(const HeldLane&) = delete;
};

template <typename T>
void grow(T*& p, size_t& have, size_t need) {
  if (need <= have) return;
  if (p) TRELLM_QUANT_CUDA_CHECK(cudaFree(p));
  p = nullptr;
  have = 0;
  TRELLM_QUANT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), need));
  have = need;
}

constexpr int64_t kBpBudget = int64_t(1) << 30;  // backpointer bytes per chunk

// Each path in two halves: *_chunk sizes the scratch for the largest chunk of an n-tile call and returns that chunk;
// *_launch encodes `tiles` <= chunk tiles from device pointers (states and recon written, both required) on the lane's
// stream. The host entry copies chunks through sc.w / sc.states / sc.recon; the device entry passes the caller's
// buffers.

int64_t generic_chunk(DeviceScratch& sc, int64_t n, int K, Codebook cb) {
  const int64_t nodes = int64_t(1) << (16 - K);
  // Chunk so backpointers stay under ~1 GiB (K = 1: 8 MiB a tile -> 128 tiles; K = 8: 64 KiB -> 16384).
  const int64_t chunk = std::min<int64_t>(n, std::max<int64_t>(1, kBpBudget / (kTileElems * nodes)));
  const int ci = int(cb);
  if (!sc.cb[ci]) {
    float* d = nullptr;
    TRELLM_QUANT_CUDA_CHECK(cudaMalloc(&d, 65536 * sizeof(float)));
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpy(d, codebook_table(cb), 65536 * sizeof(float), cudaMemcpyHostToDevice));
    sc.cb[ci] = d;
  }
  grow(sc.costs, sc.costs_bytes, size_t(chunk) * 2 * size_t(nodes) * sizeof(float));
  grow(sc.trace, sc.trace_bytes, size_t(chunk) * kTileElems * size_t(nodes));
  return chunk;
}

void generic_launch(DeviceScratch& sc, int K, Codebook cb, const float* w, uint16_t* states, float* recon, int tiles) {
  const float* d_cb = sc.cb[int(cb)];
  switch (K) {
    case 1: launch_generic<1>(d_cb, w, states, recon, sc.costs, sc.trace, tiles, sc.stream); break;
    case 7: launch_generic<7>(d_cb, w, states, recon, sc.costs, sc.trace, tiles, sc.stream); break;
    case 8: launch_generic<8>(d_cb, w, states, recon, sc.costs, sc.trace, tiles, sc.stream); break;
    default: fail("viterbi_encode_tiles_cuda: no generic kernel for K = ", K);
  }
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
}

// Cost rows per tile: kCostRows<K> x 2^(16-K) floats (K = 2: 8 MiB, 3 and 4: 4 MiB, 5: 2 MiB, 6: 1 MiB). One block
// per SM at a time (1024 threads x <= 64 registers fill the register file), so a chunk is a whole number of waves
// (K = 3 on 132 SMs: 924 tiles = 7 waves, 3.6 GiB) within a budget of 4 GiB a lane, or 1/16 of a smaller GPU's memory.
int64_t fast_rows_per_tile(int K) {
  return int64_t(K >= 4 ? 256 : 128) * (int64_t(1) << (16 - K)) * int64_t(sizeof(float));
}

int64_t fast_chunk(DeviceScratch& sc, int64_t n, int K) {
  if (sc.sms == 0) {
    int dev = 0;
    TRELLM_QUANT_CUDA_CHECK(cudaGetDevice(&dev));
    TRELLM_QUANT_CUDA_CHECK(cudaDeviceGetAttribute(&sc.sms, cudaDevAttrMultiProcessorCount, dev));
    size_t free_b = 0, total_b = 0;
    TRELLM_QUANT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    sc.fast_budget = std::clamp<int64_t>(int64_t(total_b / 16), int64_t(256) << 20, int64_t(4) << 30);
  }
  const int64_t per_tile = fast_rows_per_tile(K);
  const int64_t fit = std::max<int64_t>(1, sc.fast_budget / per_tile);
  const int64_t chunk = std::min<int64_t>(n, fit >= sc.sms ? fit / sc.sms * sc.sms : fit);
  TRELLM_ASSERT(chunk * per_tile / int64_t(sizeof(float)) <= int64_t(UINT32_MAX));  // the kernel's 32-bit offsets
  grow(sc.trace, sc.trace_bytes, size_t(chunk * per_tile));
  grow(sc.ends, sc.ends_bytes, size_t(chunk) * sizeof(uint32_t));
  grow(sc.err, sc.err_bytes, size_t(chunk) * sizeof(double));
  return chunk;
}

void fast_launch(DeviceScratch& sc, int K, Codebook cb, const float* w, uint16_t* states, float* recon, int tiles) {
  float* const rows = reinterpret_cast<float*>(sc.trace);  // cudaMalloc: 256-byte aligned
  switch (K) {
    case 2: launch_fast<2>(w, cb, sc.ends, rows, states, recon, sc.err, tiles, sc.stream); break;
    case 3: launch_fast<3>(w, cb, sc.ends, rows, states, recon, sc.err, tiles, sc.stream); break;
    case 4: launch_fast<4>(w, cb, sc.ends, rows, states, recon, sc.err, tiles, sc.stream); break;
    case 5: launch_fast<5>(w, cb, sc.ends, rows, states, recon, sc.err, tiles, sc.stream); break;
    case 6: launch_fast<6>(w, cb, sc.ends, rows, states, recon, sc.err, tiles, sc.stream); break;
    default: fail("viterbi_encode_tiles_cuda: no fast kernel for K = ", K);
  }
}

// Host to device and back on the lane's stream (pageable memory: each copy returns once the host side is done).
void to_device(DeviceScratch& sc, void* d, const void* h, size_t bytes) {
  TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, sc.stream));
}
void to_host(DeviceScratch& sc, void* h, const void* d, size_t bytes) {
  TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(h, d, bytes, cudaMemcpyDeviceToHost, sc.stream));
}

double encode_generic(DeviceScratch& sc, const float* w, int64_t n, int K, Codebook cb, uint16_t* states,
                      float* recon) {
  const int64_t chunk = generic_chunk(sc, n, K, cb);
  const size_t chunk_elems = size_t(chunk) * kTileElems;
  grow(sc.w, sc.w_bytes, chunk_elems * sizeof(float));
  grow(sc.recon, sc.recon_bytes, chunk_elems * sizeof(float));
  grow(sc.states, sc.states_bytes, chunk_elems * sizeof(uint16_t));
  if (sc.rec.size() < chunk_elems) sc.rec.resize(chunk_elems);
  double err = 0;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int tiles = int(std::min(chunk, n - t0));
    const size_t elems = size_t(tiles) * kTileElems;
    to_device(sc, sc.w, w + t0 * kTileElems, elems * sizeof(float));
    generic_launch(sc, K, cb, sc.w, sc.states, sc.recon, tiles);
    to_host(sc, states + t0 * kTileElems, sc.states, elems * sizeof(uint16_t));
    to_host(sc, sc.rec.data(), sc.recon, elems * sizeof(float));
    TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(sc.stream));
    for (size_t i = 0; i < elems; i++) {
      const double d = double(sc.rec[i]) - w[t0 * kTileElems + int64_t(i)];
      err += d * d;
      if (recon) recon[t0 * kTileElems + int64_t(i)] = sc.rec[i];
    }
  }
  return err;
}

double encode_fast(DeviceScratch& sc, const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon) {
  const int64_t chunk = fast_chunk(sc, n, K);
  const size_t chunk_elems = size_t(chunk) * kTileElems;
  grow(sc.w, sc.w_bytes, chunk_elems * sizeof(float));
  grow(sc.recon, sc.recon_bytes, chunk_elems * sizeof(float));
  grow(sc.states, sc.states_bytes, chunk_elems * sizeof(uint16_t));
  if (sc.terr.size() < size_t(chunk)) sc.terr.resize(size_t(chunk));
  double err = 0;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int tiles = int(std::min(chunk, n - t0));
    const size_t elems = size_t(tiles) * kTileElems;
    to_device(sc, sc.w, w + t0 * kTileElems, elems * sizeof(float));
    fast_launch(sc, K, cb, sc.w, sc.states, sc.recon, tiles);
    to_host(sc, states + t0 * kTileElems, sc.states, elems * sizeof(uint16_t));
    if (recon) to_host(sc, recon + t0 * kTileElems, sc.recon, elems * sizeof(float));
    to_host(sc, sc.terr.data(), sc.err, size_t(tiles) * sizeof(double));
    TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(sc.stream));
    for (int i = 0; i < tiles; i++) err += sc.terr[size_t(i)];
  }
  return err;
}

// Frees a lane's buffers and stream (on the lanes' device; the caller holds the lanes' mutex).
void release_scratch(DeviceScratch& sc) {
  for (auto& t : sc.cb) {
    if (t) TRELLM_QUANT_CUDA_CHECK(cudaFree(const_cast<float*>(t)));
    t = nullptr;
  }
  auto drop = [](auto*& p, size_t& have) {
    if (p) TRELLM_QUANT_CUDA_CHECK(cudaFree(p));
    p = nullptr;
    have = 0;
  };
  drop(sc.w, sc.w_bytes);
  drop(sc.recon, sc.recon_bytes);
  drop(sc.costs, sc.costs_bytes);
  drop(sc.states, sc.states_bytes);
  drop(sc.trace, sc.trace_bytes);
  drop(sc.ends, sc.ends_bytes);
  drop(sc.err, sc.err_bytes);
  if (sc.stream) TRELLM_QUANT_CUDA_CHECK(cudaStreamDestroy(sc.stream));
  sc.stream = nullptr;
}

// Every lane's buffers; the caller holds the lanes' mutex. A lane in use is a caller's bug.
void release_locked(Lanes& ls) {
  for (const auto& sc : ls.all) TRELLM_ASSERT(!sc->busy, "viterbi_cuda_release while a lane is in use");
  if (ls.all.empty()) return;
  TRELLM_QUANT_CUDA_CHECK(cudaSetDevice(ls.device));
  for (auto& sc : ls.all) release_scratch(*sc);
  ls.all.clear();
}

}  // namespace

void viterbi_cuda_release() {
  Lanes& ls = lanes();
  std::lock_guard<std::mutex> lock(ls.mu);
  release_locked(ls);
}

int viterbi_cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

void viterbi_cuda_use_device(int gpu) {
  const int n = viterbi_cuda_device_count();
  if (gpu < 0 || gpu >= n)
    fail("CUDA device ", gpu, " does not exist (", n, n == 1 ? " device: cuda:0)" : " devices: cuda:0..cuda:",
         n == 1 ? "" : std::to_string(n - 1), n == 1 ? "" : ")");
  Lanes& ls = lanes();
  std::lock_guard<std::mutex> lock(ls.mu);
  if (gpu == ls.device) return;
  release_locked(ls);
  ls.device = gpu;
}

int viterbi_cuda_current_device() {
  Lanes& ls = lanes();
  std::lock_guard<std::mutex> lock(ls.mu);
  return ls.device;
}

double viterbi_encode_tiles_cuda(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon) {
  if (K < kMinK || K > kMaxK) fail("viterbi_encode_tiles_cuda: K = ", K, " is outside 1..8");
  if (n <= 0) return 0.0;
  HeldLane lane(/*urgent=*/false);
  return vfast::fast_k(K) ? encode_fast(lane.sc, w, n, K, cb, states, recon)
                          : encode_generic(lane.sc, w, n, K, cb, states, recon);
}

ViterbiLane::ViterbiLane(bool urgent) : lane_(new HeldLane(urgent)) {}

ViterbiLane::~ViterbiLane() { delete static_cast<HeldLane*>(lane_); }

void* ViterbiLane::stream() const { return static_cast<HeldLane*>(lane_)->sc.stream; }

void ViterbiLane::encode(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon) {
  if (K < kMinK || K > kMaxK) fail("ViterbiLane::encode: K = ", K, " is outside 1..8");
  if (n <= 0) return;
  DeviceScratch& sc = static_cast<HeldLane*>(lane_)->sc;
  const bool fast = vfast::fast_k(K);
  const int64_t chunk = fast ? fast_chunk(sc, n, K) : generic_chunk(sc, n, K, cb);
  if (!recon) grow(sc.recon, sc.recon_bytes, size_t(chunk) * kTileElems * sizeof(float));
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int tiles = int(std::min(chunk, n - t0));
    float* r = recon ? recon + t0 * kTileElems : sc.recon;
    if (fast) fast_launch(sc, K, cb, w + t0 * kTileElems, states + t0 * kTileElems, r, tiles);
    else generic_launch(sc, K, cb, w + t0 * kTileElems, states + t0 * kTileElems, r, tiles);
  }
}

}  // namespace trellm::trellis
