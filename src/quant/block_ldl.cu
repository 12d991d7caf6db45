// block_ldl on the GPU; see block_ldl_cuda.h. The CPU's algorithm step for step:
//  1. C = Cholesky(H) in Crout order: column j after column j - 1, C[i][j] = (H[i][j] - dot(C[i][:j], C[j][:j])) /
//     C[j][j] for every row i > j at once, dot being block_ldl.cpp's four chains over k % 4: a lane per chain (the
//     chains are independent serial sums), the blocks of a Hessian looping over the columns with a barrier between them.
//  2. The inverse of each 16 x 16 diagonal block by forward substitution (a thread per block).
//  3. L[r][16b + j] = Σ_{k >= j} C[r][16b + k] · inv_b[k][j] for the rows r below block b.
// C is held transposed (ct[k][i] = C[i][k]) so that the lanes of a column, four per row i, read ct[k][i] nearly
// coalesced and ct[k][j] as a broadcast. Every multiply and add is its own rounding (__dmul_rn / __dadd_rn), as on
// the CPU. Work per Hessian: n^3 / 6 multiply-adds (2048: 1.4 G) and as many 8-byte loads, mostly from L2.
#include <cuda/atomic>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "quant/block_ldl_cuda.h"
#include "quant/device_array_cuda.h"
#include "quant/quant_cuda_check.h"
#include "quant/trellis_viterbi_cuda.h"

namespace trellm::trellis {

namespace {

constexpr int kThreads = 256;

// dst[c][r] = src[r][c] for r, c < n, converted; blockIdx.z = Hessian. 32 x 32 tiles through shared memory.
template <typename In, typename Out>
__global__ void transpose_kernel(const In* __restrict__ src, Out* __restrict__ dst, int64_t n) {
  __shared__ Out tile[32][33];
  const size_t off = size_t(blockIdx.z) * size_t(n) * size_t(n);
  const int64_t c0 = int64_t(blockIdx.x) * 32, r0 = int64_t(blockIdx.y) * 32;
  for (int dy = int(threadIdx.y); dy < 32; dy += 8) {
    const int64_t r = r0 + dy, c = c0 + threadIdx.x;
    if (r < n && c < n) tile[dy][threadIdx.x] = Out(src[off + size_t(r * n + c)]);
  }
  __syncthreads();
  for (int dy = int(threadIdx.y); dy < 32; dy += 8) {
    const int64_t c = c0 + dy, r = r0 + threadIdx.x;
    if (r < n && c < n) dst[off + size_t(c * n + r)] = tile[threadIdx.x][dy];
  }
}

// C's entries written by another block of the same Hessian are read around L1 (not coherent across SMs): __ldcg.
template <bool kParts>
__device__ double load(const double* p) {
  if constexpr (kParts) return __ldcg(p);
  else return *p;
}

// Pivot j from d = H[j][j] - dot, dot = block_ldl.cpp's dot(C[j][:j], C[j][:j]): C[j][j] = sqrt(d), or the Hessian
// marked bad.
template <bool kParts>
__device__ void crout_pivot(double* ct, int64_t n, int64_t j, double dot, int* bad) {
  const double d = __dsub_rn(load<kParts>(ct + j * n + j), dot);
  if (!(d > 0.0) || !isfinite(d)) *bad = 1;
  else ct[j * n + j] = __dsqrt_rn(d);
}

// Entry C[i][j] (i > j) by the four lanes of row i, lane c = threadIdx.x % 4 summing block_ldl.cpp's chain c (the
// products of k = c, c + 4, ... below the main loop's end E = 4 floor(j / 4)), each a serial sum whose loads do not
// depend on it (unrolled: many in flight). The row's first lane gathers the chains, adds the tail [E, j), combines
// them as (a0 + a1) + (a2 + a3) and stores C[i][j]. The row j + 1 also sums C[j+1][k]^2 in the same pass: the next
// pivot's dot (its main loop ends at 4 floor((j + 1) / 4); its last term is C[j+1][j]), and sets pivot j + 1. Every
// lane of the warp calls it (the shuffles), `live` false past the last row.
template <bool kParts>
__device__ void crout_entry(double* ct, int64_t n, int64_t j, int64_t i, bool live, int* bad) {
  const int c = int(threadIdx.x % 4), base = int(threadIdx.x & 31) & ~3;
  const int64_t e_end = j / 4 * 4;
  double ae = 0, ap = 0;  // chain c of dot(C[i], C[j]) and of dot(C[i], C[i])
  if (live) {
#pragma unroll 8
    for (int64_t k = c; k < e_end; k += 4) {
      const double x = load<kParts>(ct + k * n + i);
      ae = __dadd_rn(ae, __dmul_rn(x, load<kParts>(ct + k * n + j)));
      ap = __dadd_rn(ap, __dmul_rn(x, x));
    }
  }
  const unsigned full = 0xFFFFFFFFu;
  double e[4], p[4];
#pragma unroll
  for (int q = 0; q < 4; q++) {
    e[q] = __shfl_sync(full, ae, base + q);
    p[q] = __shfl_sync(full, ap, base + q);
  }
  if (!live || c != 0) return;
  for (int64_t k = e_end; k < j; k++)
    e[0] = __dadd_rn(e[0], __dmul_rn(load<kParts>(ct + k * n + i), load<kParts>(ct + k * n + j)));
  const double dot = __dadd_rn(__dadd_rn(e[0], e[1]), __dadd_rn(e[2], e[3]));
  const double inv = __ddiv_rn(1.0, load<kParts>(ct + j * n + j));
  const double v = __dmul_rn(__dsub_rn(ct[j * n + i], dot), inv);
  ct[j * n + i] = v;
  if (i != j + 1) return;
  const int64_t p_end = (j + 1) / 4 * 4;  // e_end or e_end + 4
  auto x_at = [&](int64_t k) { return k == j ? v : load<kParts>(ct + k * n + i); };
  for (int64_t k = e_end; k < p_end; k++) {
    const double x = x_at(k);
    p[k - e_end] = __dadd_rn(p[k - e_end], __dmul_rn(x, x));
  }
  for (int64_t k = p_end; k <= j; k++) {
    const double x = x_at(k);
    p[0] = __dadd_rn(p[0], __dmul_rn(x, x));
  }
  crout_pivot<kParts>(ct, n, i, __dadd_rn(__dadd_rn(p[0], p[1]), __dadd_rn(p[2], p[3])), bad);
}

// The barrier between columns of the kParts blocks (gridDim.x) of one Hessian: a count in global memory, raised by
// each block when its part of the column is stored, waited for by every block. The blocks of a launch never exceed
// the SMs (block_ldl_batch_cuda), so all of them are resident once the kernels beside them (the encoder's Viterbi
// waves, ~1 ms a block) free their SMs; the waiting block sleeps between polls so as not to slow those down.
__device__ void parts_barrier(unsigned* count, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> c(*count);
    c.fetch_add(1u, cuda::memory_order_release);
    while (c.load(cuda::memory_order_acquire) < target) __nanosleep(64);
  }
  __syncthreads();
}

// The whole Cholesky of Hessian blockIdx.y by the gridDim.x blocks of that row of the grid (kParts: more than one),
// the columns one after another with a barrier between them. Column j's rows i > j take 4 (n - j - 1) lanes, spread
// over the blocks' threads in passes. Neither a launch per column (each waited ~0.5-1 ms for an SM when the Viterbi's
// blocks held them all: 2 s for the 64 experts' 2048 columns; o_proj's 5120 would wait ~5 s) nor one block for a lone
// Hessian (one SM streams a 2048 x 2048 factor's 11 GB of loads in ~0.3 s; o_proj's 5120 x 5120 would take ~4.7 s).
// A failed pivot only marks the Hessian: its blocks run on (the results are not used) so that every thread meets
// every barrier.
constexpr int kCroutThreads = 1024;
template <bool kParts>
__global__ void __launch_bounds__(kCroutThreads) crout_kernel(double* ct_all, int64_t n, int* bad_all,
                                                               unsigned* counts) {
  double* ct = ct_all + size_t(blockIdx.y) * size_t(n * n);
  int* bad = bad_all + blockIdx.y;
  unsigned* count = counts + blockIdx.y;
  const unsigned parts = gridDim.x;
  auto column_done = [&](unsigned columns) {
    if constexpr (kParts) parts_barrier(count, parts * columns);
    else __syncthreads();
  };
  if (blockIdx.x == 0 && threadIdx.x == 0) crout_pivot<kParts>(ct, n, 0, 0.0, bad);
  column_done(1);
  const int64_t lane = int64_t(blockIdx.x) * kCroutThreads + threadIdx.x, stride = int64_t(parts) * kCroutThreads;
  for (int64_t j = 0; j + 1 < n; j++) {
    for (int64_t t0 = 0; t0 < 4 * (n - j - 1); t0 += stride) {  // the same trip count in every thread
      const int64_t i = j + 1 + (t0 + lane) / 4;                 // stride % 4 == 0: the lane's chain is threadIdx.x % 4
      crout_entry<kParts>(ct, n, j, i, i < n, bad);
    }
    column_done(unsigned(j) + 2);  // column j and pivot j + 1 complete before column j + 1 reads them
  }
}

// inv_b = C_bb^-1 (lower triangular, forward substitution in block_ldl.cpp's order): a thread per 16-row block.
__global__ void block_inverse_kernel(const double* ct_all, int64_t n, double* inv_all, const int* bad_all) {
  const int64_t blocks = n / 16, bb = int64_t(blockIdx.x) * 64 + threadIdx.x;
  if (bb >= blocks || bad_all[blockIdx.y]) return;
  const double* ct = ct_all + size_t(blockIdx.y) * size_t(n * n);
  double* iv = inv_all + (size_t(blockIdx.y) * size_t(blocks) + size_t(bb)) * 256;
  const int64_t o = bb * 16;
  auto c = [&](int r, int k) { return ct[(o + k) * n + o + r]; };  // C[o + r][o + k]
  for (int col = 0; col < 16; col++)
    for (int i = 0; i < 16; i++) {
      double s = i == col ? 1.0 : 0.0;
      for (int k = col; k < i; k++) s = __dsub_rn(s, __dmul_rn(c(i, k), iv[k * 16 + col]));
      iv[i * 16 + col] = i < col ? 0.0 : __ddiv_rn(s, c(i, i));
    }
}

// lt[c][r] = L[r][c] (f32): for column c = 16 b + j, rows r below block b; zero elsewhere (the diagonal blocks too).
__global__ void ldl_rows_kernel(const double* ct_all, const double* inv_all, int64_t n, float* lt_all,
                                const int* bad_all) {
  const int64_t r = int64_t(blockIdx.x) * kThreads + threadIdx.x, c = blockIdx.y;
  if (r >= n) return;
  const int64_t bb = c / 16, o = bb * 16;
  const int j = int(c % 16);
  float out = 0.0f;
  if (!bad_all[blockIdx.z] && r >= o + 16) {
    const double* ct = ct_all + size_t(blockIdx.z) * size_t(n * n);
    const double* iv = inv_all + (size_t(blockIdx.z) * size_t(n / 16) + size_t(bb)) * 256;
    double s = 0;
    for (int k = j; k < 16; k++) s = __dadd_rn(s, __dmul_rn(ct[(o + k) * n + r], iv[k * 16 + j]));
    out = __double2float_rn(s);
  }
  lt_all[size_t(blockIdx.z) * size_t(n * n) + size_t(c * n + r)] = out;
}

// The quantizer's critical path (its main thread waits for the factors): the device's greatest stream priority, above
// the encoder's urgent lanes (trellis_viterbi.cu). Beside running LDLQs a 64-expert factorization still took 1-9.6 s
// against ~1 s alone, with this priority as with equal ones (bench/results/quantize_full.md): the wait is elsewhere.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() {
    int least = 0, greatest = 0;
    TRELLM_QUANT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    TRELLM_QUANT_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
  }
  ~Stream() { cudaStreamDestroy(s); }
};

}  // namespace

std::vector<bool> block_ldl_batch_cuda(std::span<const float* const> h, int64_t n, std::span<float* const> l) {
  TRELLM_ASSERT(h.size() == l.size() && n > 0 && n % 16 == 0, "block_ldl_batch_cuda: n = ", n);
  const size_t count = h.size();
  std::vector<bool> ok(count, true);
  if (count == 0) return ok;
  TRELLM_QUANT_CUDA_CHECK(cudaSetDevice(viterbi_cuda_current_device()));
  const Stream stream;
  const cudaStream_t s = stream.s;
  const size_t nn = size_t(n) * size_t(n), blocks = size_t(n / 16);
  // Per Hessian: C (f64), a f32 buffer (H in, then Lᵀ), the block inverses, a flag; as many at once as fit 4 GiB
  // (64 experts' 2048 x 2048 in one launch: a block each).
  const size_t per = nn * 12 + blocks * 256 * 8 + sizeof(int);
  const size_t batch = std::clamp<size_t>((size_t(4) << 30) / per, 1, count);
  const DeviceArray<double> ct_b(batch * nn, s, "the block LDL's Cholesky factors");
  const DeviceArray<float> f_b(batch * nn, s, "the block LDL's Hessians");
  const DeviceArray<double> inv_b(batch * blocks * 256, s, "the block LDL's block inverses");
  const DeviceArray<int> bad_b(batch, s, "the block LDL's pivot flags");
  const DeviceArray<unsigned> counts_b(batch, s, "the block LDL's column counts");
  double* ct = ct_b.p;
  float* f = f_b.p;
  double* inv = inv_b.p;
  int* bad = bad_b.p;
  unsigned* counts = counts_b.p;
  // Blocks per Hessian: enough for column 0's 4 (n - 1) lanes, as many as leave every block of the launch resident at
  // once (their barriers wait for each other), one an SM: o_proj's lone 5120 x 5120 takes 20 blocks, two 2048 x 2048
  // take 8 each, the 64 experts' 2 each.
  int dev = 0, sms = 0, per_sm = 0;
  TRELLM_QUANT_CUDA_CHECK(cudaGetDevice(&dev));
  TRELLM_QUANT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  TRELLM_QUANT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, crout_kernel<true>, kCroutThreads, 0));
  TRELLM_ASSERT(per_sm >= 1, "block LDL on the GPU: a block of ", kCroutThreads, " threads does not fit an SM");
  const unsigned resident = unsigned(sms);  // one block an SM: the Viterbi's blocks hold the rest of each SM
  const unsigned needed = unsigned((4 * (n - 1) + kCroutThreads - 1) / kCroutThreads);
  std::vector<int> bad_h(batch);
  for (size_t b0 = 0; b0 < count; b0 += batch) {
    const unsigned m = unsigned(std::min(batch, count - b0));
    const unsigned parts = std::clamp(resident / m, 1u, std::max(needed, 1u));
    for (unsigned i = 0; i < m; i++)
      TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(f + i * nn, h[b0 + i], nn * sizeof(float), cudaMemcpyHostToDevice, s));
    const dim3 tgrid(unsigned((n + 31) / 32), unsigned((n + 31) / 32), m), tblock(32, 8);
    transpose_kernel<float, double><<<tgrid, tblock, 0, s>>>(f, ct, n);
    TRELLM_QUANT_CUDA_CHECK(cudaMemsetAsync(bad, 0, m * sizeof(int), s));
    TRELLM_QUANT_CUDA_CHECK(cudaMemsetAsync(counts, 0, m * sizeof(unsigned), s));
    if (parts == 1) crout_kernel<false><<<dim3(1, m), kCroutThreads, 0, s>>>(ct, n, bad, counts);
    else crout_kernel<true><<<dim3(parts, m), kCroutThreads, 0, s>>>(ct, n, bad, counts);
    block_inverse_kernel<<<dim3(unsigned((blocks + 63) / 64), m), 64, 0, s>>>(ct, n, inv, bad);
    ldl_rows_kernel<<<dim3(unsigned((n + kThreads - 1) / kThreads), unsigned(n), m), kThreads, 0, s>>>(ct, inv, n, f, bad);
    float* l_dev = reinterpret_cast<float*>(ct);  // C is done with: L row-major in its first half
    transpose_kernel<float, float><<<tgrid, tblock, 0, s>>>(f, l_dev, n);
    TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
    for (unsigned i = 0; i < m; i++)
      TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(l[b0 + i], l_dev + i * nn, nn * sizeof(float), cudaMemcpyDeviceToHost, s));
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(bad_h.data(), bad, m * sizeof(int), cudaMemcpyDeviceToHost, s));
    TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(s));
    for (unsigned i = 0; i < m; i++) ok[b0 + i] = bad_h[i] == 0;
  }
  return ok;
}

}  // namespace trellm::trellis
