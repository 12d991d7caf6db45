// Batched LDLQ on the GPU; see trellis_ldlq_cuda.h. Per 16-row block r (from the last): a gather kernel builds every
// weight's block tiles from w + prod, one Viterbi call encodes all of them, a scatter kernel stores codes and
// reconstruction and forms the block's error, an update kernel adds L[r0+j, i]·err[j] to the running product of every
// row i < r0. Only the Viterbi is heavy (~1.2 ms a wave of 132 tiles); the update streams the running product once a
// step (64 experts of 2048 x 1536: 0.8 GB at the step in the middle, ~0.25 ms at the H200's bandwidth).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "quant/device_array_cuda.h"
#include "quant/quant_cuda_check.h"
#include "quant/trellis_ldlq_cuda.h"
#include "quant/trellis_viterbi_cuda.h"

namespace trellm::trellis {

namespace {

constexpr int kThreads = 256;

// in[(b, tn), p] = (w + prod)[b][r0 + walk_k(p)][16 tn + walk_n(p)]
__global__ void ldlq_gather_kernel(const float* __restrict__ w, const float* __restrict__ prod, int64_t k, int64_t n,
                                   int64_t r0, int64_t tiles_n, float* __restrict__ in) {
  const int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // over count x tiles_n x 256
  const int64_t per_b = tiles_n * kTileElems;
  const int64_t b = blockIdx.y;
  if (t >= per_b) return;
  const int64_t tn = t / kTileElems, p = t % kTileElems;
  const size_t at = size_t(b) * size_t(k * n) + size_t(r0 + walk_k(int(p))) * size_t(n) + size_t(tn * kTileDim + walk_n(int(p)));
  in[size_t(b) * per_b + t] = __fadd_rn(w[at], prod[at]);
}

// Codes of block r into states[b] (tiles_k x tiles_n x 256), the reconstruction into recon[b] (k x n), and the block's
// error err[b][j][c] = w - recon for j < 16.
__global__ void ldlq_scatter_kernel(const float* __restrict__ w, const uint16_t* __restrict__ st,
                                    const float* __restrict__ out, int64_t k, int64_t n, int64_t r, int64_t tiles_n,
                                    uint16_t* __restrict__ states, float* __restrict__ recon, float* __restrict__ err) {
  const int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_b = tiles_n * kTileElems;
  const int64_t b = blockIdx.y;
  if (t >= per_b) return;
  const int64_t tn = t / kTileElems;
  const int p = int(t % kTileElems);
  const float v = out[size_t(b) * per_b + t];
  states[size_t(b) * size_t(k * n) + size_t(r * per_b + t)] = st[size_t(b) * per_b + t];
  const int64_t row = r * kTileDim + walk_k(p), col = tn * kTileDim + walk_n(p);
  const size_t at = size_t(b) * size_t(k * n) + size_t(row) * size_t(n) + size_t(col);
  recon[at] = v;
  err[size_t(b) * size_t(kTileDim * n) + size_t(walk_k(p)) * size_t(n) + size_t(col)] = __fsub_rn(w[at], v);
}

// prod[b][i][c] += Σ_j L_b[r0 + j][i] · err[b][j][c] for i < r0 (blockIdx.y = i), one fma a term in j order.
__global__ void ldlq_update_kernel(const float* __restrict__ l, const float* __restrict__ err, int64_t k, int64_t n,
                                   int64_t r0, float* __restrict__ prod) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i = blockIdx.y, b = blockIdx.z;
  if (c >= n) return;
  const float* lb = l + size_t(b) * size_t(k * k);
  const float* eb = err + size_t(b) * size_t(kTileDim * n);
  float* pp = prod + size_t(b) * size_t(k * n) + size_t(i) * size_t(n) + size_t(c);
  float acc = *pp;
#pragma unroll
  for (int j = 0; j < kTileDim; j++) {
    const float lji = lb[size_t(r0 + j) * size_t(k) + size_t(i)];
    if (lji != 0.0f) acc = __fmaf_rn(lji, eb[size_t(j) * size_t(n) + size_t(c)], acc);
  }
  *pp = acc;
}

// Partial sums of a[i]·b[i] in double, one per block (summed on the host in block order: deterministic).
constexpr int kDotBlocks = 1024;
__global__ void dot_partials_kernel(const float* __restrict__ a, const float* __restrict__ b, size_t n,
                                    double* __restrict__ partial) {
  __shared__ double red[kThreads];
  double s = 0;
  for (size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += size_t(gridDim.x) * kThreads)
    s += double(a[i]) * double(b[i]);
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

__global__ void sub_kernel(const float* __restrict__ a, const float* __restrict__ b, size_t n, float* __restrict__ out) {
  for (size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += size_t(gridDim.x) * kThreads)
    out[i] = a[i] - b[i];
}

struct Cublas {
  cublasHandle_t h = nullptr;
  explicit Cublas(cudaStream_t s) {
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) fail("batched LDLQ: cublasCreate failed");
    if (cublasSetStream(h, s) != CUBLAS_STATUS_SUCCESS) fail("batched LDLQ: cublasSetStream failed");
    cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);  // fp32 FMA, no TF32: the proxy compares errors of ~1e-3 relative
  }
  ~Cublas() { cublasDestroy(h); }
};

// tr(Aᵀ H A) for row-major A (k x n) and H (k x k) on the device: C = H·A by one GEMM (column-major: Cᵀ = Aᵀ·Hᵀ),
// then Σ A∘C.
double quadratic_trace(cublasHandle_t cb, cudaStream_t s, const float* a, const float* hd, int64_t k, int64_t n,
                       float* c, double* partial_d, std::vector<double>& partial) {
  const float one = 1.0f, zero = 0.0f;
  if (cublasSgemm(cb, CUBLAS_OP_N, CUBLAS_OP_N, int(n), int(k), int(k), &one, a, int(n), hd, int(k), &zero, c, int(n)) !=
      CUBLAS_STATUS_SUCCESS)
    fail("batched LDLQ: the proxy-error GEMM (", k, " x ", k, " by ", k, " x ", n, ") failed");
  dot_partials_kernel<<<kDotBlocks, kThreads, 0, s>>>(a, c, size_t(k * n), partial_d);
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(partial.data(), partial_d, kDotBlocks * sizeof(double), cudaMemcpyDeviceToHost, s));
  TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(s));
  double sum = 0;
  for (double v : partial) sum += v;
  return sum;
}

}  // namespace

void quantize_ldlq_batch_cuda(std::span<const float* const> w, std::span<const float* const> l, int64_t k, int64_t n,
                              int K, Codebook cb, std::span<uint16_t* const> states, std::span<float* const> recon,
                              std::span<const float* const> h, std::span<double> proxy) {
  const int64_t count = int64_t(w.size());
  TRELLM_ASSERT(l.size() == w.size() && states.size() == w.size() && recon.size() == w.size());
  TRELLM_ASSERT(h.empty() || (h.size() == w.size() && proxy.size() == w.size()));
  TRELLM_ASSERT(k % kTileDim == 0 && n % kTileDim == 0 && k > 0 && n > 0, "LDLQ of a ", k, " x ", n, " weight");
  if (count == 0) return;
  TRELLM_ASSERT(count <= 65535 && k / kTileDim <= 65535 * kTileDim, "batched LDLQ: ", count, " weights of ", k, " rows");
  // The whole LDLQ on one urgent lane of the encoder (its stream and Viterbi scratch): another group's LDLQ runs beside
  // it on another, the scale search of later groups on lanes of lower priority.
  ViterbiLane lane(/*urgent=*/true);
  const auto s = static_cast<cudaStream_t>(lane.stream());
  const int64_t tiles_k = k / kTileDim, tiles_n = n / kTileDim;
  const size_t kn = size_t(k * n), step = size_t(count * tiles_n * kTileElems);
  const double gb = double(count) * (4.0 * 4.0 * double(kn) + 4.0 * double(k * k)) / 1e9;
  const std::string hint = "; its " + std::to_string(count) + " weights need ~" + std::to_string(int(gb + 0.5)) +
                           " GB on the GPU: quantize fewer Linears at once";
  DeviceArray<float> d_w(s), d_l(s), d_prod(s), d_recon(s), d_err(s), d_in(s), d_out(s);
  DeviceArray<uint16_t> d_states(s), d_st(s);
  d_w.alloc(count * kn, "the weights of the batched LDLQ", hint);
  d_l.alloc(size_t(count) * size_t(k * k), "the LDL factors of the batched LDLQ", hint);
  d_prod.alloc(count * kn, "the running products of the batched LDLQ", hint);
  d_recon.alloc(count * kn, "the reconstructions of the batched LDLQ", hint);
  d_states.alloc(count * kn, "the codes of the batched LDLQ", hint);
  d_err.alloc(size_t(count * kTileDim * n), "the block errors of the batched LDLQ", hint);
  d_in.alloc(step, "a step's tiles of the batched LDLQ", hint);
  d_out.alloc(step, "a step's reconstruction of the batched LDLQ", hint);
  d_st.alloc(step, "a step's codes of the batched LDLQ", hint);
  auto up = [&](void* d, const void* h, size_t bytes) {
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s));
  };
  auto down = [&](void* h, const void* d, size_t bytes) {
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(h, d, bytes, cudaMemcpyDeviceToHost, s));
  };
  for (int64_t b = 0; b < count; b++) {
    up(d_w.p + b * kn, w[b], kn * sizeof(float));
    up(d_l.p + size_t(b) * size_t(k * k), l[b], size_t(k * k) * sizeof(float));
  }
  TRELLM_QUANT_CUDA_CHECK(cudaMemsetAsync(d_prod.p, 0, count * kn * sizeof(float), s));
  const dim3 tile_grid(unsigned((tiles_n * kTileElems + kThreads - 1) / kThreads), unsigned(count));
  for (int64_t r = tiles_k - 1; r >= 0; r--) {
    const int64_t r0 = r * kTileDim;
    ldlq_gather_kernel<<<tile_grid, kThreads, 0, s>>>(d_w.p, d_prod.p, k, n, r0, tiles_n, d_in.p);
    TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
    lane.encode(d_in.p, count * tiles_n, K, cb, d_st.p, d_out.p);
    ldlq_scatter_kernel<<<tile_grid, kThreads, 0, s>>>(d_w.p, d_st.p, d_out.p, k, n, r, tiles_n, d_states.p, d_recon.p,
                                                        d_err.p);
    TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
    if (r == 0) break;
    const dim3 upd(unsigned((n + kThreads - 1) / kThreads), unsigned(r0), unsigned(count));
    ldlq_update_kernel<<<upd, kThreads, 0, s>>>(d_l.p, d_err.p, k, n, r0, d_prod.p);
    TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  }
  for (int64_t b = 0; b < count; b++) {
    down(states[b], d_states.p + b * kn, kn * sizeof(uint16_t));
    down(recon[b], d_recon.p + b * kn, kn * sizeof(float));
  }
  TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(s));
  if (h.empty()) return;
  // The proxy errors, one weight at a time: H' into the factor's slot (the factors are done), E into the running
  // product's, H'·E or H'·W into the reconstruction's.
  Cublas blas(s);
  DeviceArray<double> d_partial(kDotBlocks, s, "the proxy sums of the batched LDLQ");
  std::vector<double> partial(kDotBlocks);
  for (int64_t b = 0; b < count; b++) {
    float* hd = d_l.p + size_t(b) * size_t(k * k);
    float* e = d_prod.p + b * kn;
    float* c = d_recon.p + b * kn;
    const float* wb = d_w.p + b * kn;
    up(hd, h[b], size_t(k * k) * sizeof(float));
    sub_kernel<<<kDotBlocks, kThreads, 0, s>>>(wb, c, kn, e);
    TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
    const double num = quadratic_trace(blas.h, s, e, hd, k, n, c, d_partial.p, partial);
    const double den = quadratic_trace(blas.h, s, wb, hd, k, n, c, d_partial.p, partial);
    proxy[b] = num / std::max(den, 1e-30);
  }
}

}  // namespace trellm::trellis
