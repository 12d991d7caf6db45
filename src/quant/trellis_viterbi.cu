// CUDA tail-biting Viterbi; see trellis_viterbi_cuda.h. Not tuned: it exists so the encoder can run on a GPU
// and so the CPU path has a twin to agree with. exllamav3's kernel (ext/quant/quantize_tiles_kernel.cuh, read,
// not copied) keeps fp16 costs; ours are fp32 to match the CPU encoder exactly.
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "core/half.h"
#include "quant/trellis_viterbi.h"
#include "quant/trellis_viterbi_cuda.h"

#define TRELLM_QUANT_CUDA_CHECK(expr)                                                                \
  do {                                                                                               \
    const cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                         \
      ::trellm::fail(#expr, " failed at ", __FILE__, ":", __LINE__, ": ", cudaGetErrorString(err_)); \
  } while (0)

namespace trellm::trellis {

namespace {

constexpr int kThreads = 1024;

// One forward pass of `steps` values for the tile of this block; cost_in holds the initial node costs.
template <int K>
__device__ void forward_pass(const float* __restrict__ cb, const float* w, float* cost_a, float* cost_b,
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
__device__ void traceback(const uint8_t* bp, uint32_t end, uint16_t* states) {
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
__global__ void __launch_bounds__(kThreads) viterbi_kernel(const float* __restrict__ cb, const float* __restrict__ w,
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
  __shared__ float red_v[kThreads];
  __shared__ uint32_t red_i[kThreads];

  // Pass 1: unconstrained, rotated by 128.
  for (int i = threadIdx.x; i < kTileElems; i += blockDim.x) seq[i] = tw[(i + kTileElems / 2) % kTileElems];
  for (int o = threadIdx.x; o < kNodes; o += blockDim.x) cost_a[o] = 0.0f;
  __syncthreads();
  forward_pass<K>(cb, seq, cost_a, cost_b, bp);
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
  if (threadIdx.x == 0) traceback<K>(bp, red_i[0], path);
  __syncthreads();
  const uint32_t e = uint32_t(path[kTileElems / 2]) >> K;

  // Pass 2: from position 0, start and end in node e.
  for (int i = threadIdx.x; i < kTileElems; i += blockDim.x) seq[i] = tw[i];
  for (int o = threadIdx.x; o < kNodes; o += blockDim.x) cost_a[o] = o == int(e) ? 0.0f : INFINITY;
  __syncthreads();
  forward_pass<K>(cb, seq, cost_a, cost_b, bp);
  if (threadIdx.x == 0) traceback<K>(bp, e, path);
  __syncthreads();
  for (int p = threadIdx.x; p < kTileElems; p += blockDim.x) {
    states[size_t(tile) * kTileElems + p] = path[p];
    recon[size_t(tile) * kTileElems + p] = __ldg(cb + path[p]);
  }
}

template <int K>
void launch(const float* cb, const float* w, uint16_t* states, float* recon, float* costs, uint8_t* bps, int tiles) {
  viterbi_kernel<K><<<tiles, kThreads>>>(cb, w, states, recon, costs, bps);
}

}  // namespace

bool viterbi_cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

namespace {

// Device buffers kept from one call to the next: `trellm quantize` makes thousands of small calls (LDLQ encodes one
// 16-row block of a Linear per call: out/16 tiles, 8-16 on the built-in model), and a cudaMalloc + cudaFree of the
// backpointers (up to 1 GiB) per call would cost more than the kernel. Buffers grow to the largest call seen and
// live until the process exits (the driver frees them then); calls are serialised by the mutex.
struct DeviceScratch {
  std::mutex mu;
  const float* cb[3] = {};  // the codebook tables, uploaded once each
  float *w = nullptr, *recon = nullptr, *costs = nullptr;
  uint16_t* states = nullptr;
  uint8_t* bp = nullptr;
  size_t w_bytes = 0, recon_bytes = 0, states_bytes = 0, costs_bytes = 0, bp_bytes = 0;
  std::vector<float> rec;  // host copy of the reconstruction (for the error sum)
};

DeviceScratch& device_scratch() {
  static DeviceScratch* s = new DeviceScratch;  // never destroyed: no CUDA calls after the runtime shuts down
  return *s;
}

template <typename T>
void grow(T*& p, size_t& have, size_t need) {
  if (need <= have) return;
  if (p) TRELLM_QUANT_CUDA_CHECK(cudaFree(p));
  p = nullptr;
  have = 0;
  TRELLM_QUANT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), need));
  have = need;
}

}  // namespace

double viterbi_encode_tiles_cuda(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon) {
  if (K < kMinK || K > kMaxK) fail("viterbi_encode_tiles_cuda: K = ", K, " is outside 1..8");
  if (n <= 0) return 0.0;
  const int64_t nodes = int64_t(1) << (16 - K);
  // Chunk so backpointers stay under ~1 GiB (K = 1: 8 MiB a tile -> 128 tiles; K = 8: 64 KiB -> 16384).
  const int64_t chunk = std::min<int64_t>(n, std::max<int64_t>(1, (int64_t(1) << 30) / (kTileElems * nodes)));
  DeviceScratch& sc = device_scratch();
  std::lock_guard<std::mutex> lock(sc.mu);
  const int ci = int(cb);
  if (!sc.cb[ci]) {
    float* d = nullptr;
    TRELLM_QUANT_CUDA_CHECK(cudaMalloc(&d, 65536 * sizeof(float)));
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpy(d, codebook_table(cb), 65536 * sizeof(float), cudaMemcpyHostToDevice));
    sc.cb[ci] = d;
  }
  const size_t chunk_elems = size_t(chunk) * kTileElems;
  grow(sc.w, sc.w_bytes, chunk_elems * sizeof(float));
  grow(sc.recon, sc.recon_bytes, chunk_elems * sizeof(float));
  grow(sc.states, sc.states_bytes, chunk_elems * sizeof(uint16_t));
  if (sc.rec.size() < chunk_elems) sc.rec.resize(chunk_elems);
  grow(sc.costs, sc.costs_bytes, size_t(chunk) * 2 * size_t(nodes) * sizeof(float));
  grow(sc.bp, sc.bp_bytes, size_t(chunk) * kTileElems * size_t(nodes));
  const float* d_cb = sc.cb[ci];
  double err = 0;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int tiles = int(std::min(chunk, n - t0));
    const size_t elems = size_t(tiles) * kTileElems;
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpy(sc.w, w + t0 * kTileElems, elems * sizeof(float), cudaMemcpyHostToDevice));
    switch (K) {
      case 1: launch<1>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      case 2: launch<2>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      case 3: launch<3>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      case 4: launch<4>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      case 5: launch<5>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      case 6: launch<6>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      case 7: launch<7>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
      default: launch<8>(d_cb, sc.w, sc.states, sc.recon, sc.costs, sc.bp, tiles); break;
    }
    TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpy(states + t0 * kTileElems, sc.states, elems * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpy(sc.rec.data(), sc.recon, elems * sizeof(float), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < elems; i++) {
      const double d = double(sc.rec[i]) - w[t0 * kTileElems + int64_t(i)];
      err += d * d;
      if (recon) recon[t0 * kTileElems + int64_t(i)] = sc.rec[i];
    }
  }
  return err;
}

}  // namespace trellm::trellis
