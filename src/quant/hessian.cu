// HessianAccumulatorCuda (hessian_cuda.h): pending f32 rows -> finite check and double conversion -> DSYRK.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "core/error.h"
#include "quant/hessian_cuda.h"
#include "quant/quant_cuda_check.h"

namespace trellm::trellis {

namespace {

#define TRELLM_QUANT_CUBLAS_CHECK(expr)                                                                \
  do {                                                                                                 \
    const cublasStatus_t st_ = (expr);                                                                 \
    if (st_ != CUBLAS_STATUS_SUCCESS) ::trellm::fail(#expr, " failed at ", __FILE__, ":", __LINE__, \
                                                     ": cuBLAS status ", int(st_));                     \
  } while (0)

// One block per row: the row in double, or zeros when it holds an Inf or NaN (the CPU drops such a row; a zero
// row adds nothing to XᵀX), and the kept / dropped counts.
__global__ void to_double_finite(double* out, const float* x, int64_t in, long long* counts) {
  const float* xr = x + int64_t(blockIdx.x) * in;
  bool bad = false;
  for (int64_t i = threadIdx.x; i < in; i += blockDim.x) bad |= !isfinite(xr[i]);
  bad = __syncthreads_or(bad);
  double* o = out + int64_t(blockIdx.x) * in;
  for (int64_t i = threadIdx.x; i < in; i += blockDim.x) o[i] = bad ? 0.0 : double(xr[i]);
  if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(counts + (bad ? 1 : 0)), 1ull);
}

// H = XᵀX / rows in f32, both triangles, from the double lower triangle: HessianAccumulator::hessian's arithmetic
// (one double multiply, one rounding), so the same floats.
__global__ void finish_f32(float* h, const double* sum, int64_t in, double inv) {
  const int64_t i = blockIdx.y;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < in; j += int64_t(gridDim.x) * blockDim.x)
    h[i * in + j] = float((i >= j ? sum[i * in + j] : sum[j * in + i]) * inv);
}

}  // namespace

struct HessianCudaContext::Impl {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  double* rows = nullptr;  // (kPendingRows, widest in) doubles or an in² f32 Hessian; grown on demand
  size_t rows_bytes = 0;
  double* buffer(size_t bytes) {
    if (bytes > rows_bytes) {
      TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (rows) TRELLM_QUANT_CUDA_CHECK(cudaFree(rows));
      rows = nullptr;
      rows_bytes = 0;
      TRELLM_QUANT_CUDA_CHECK(cudaMalloc(&rows, bytes));
      rows_bytes = bytes;
    }
    return rows;
  }
  // Pinned host staging for hessian(): the copy out runs at the link's speed (a pageable copy of the 130 Hessians of a
  // GLM layer, 2 GB, took ~1.9 s on the H200's host) and straight into the caller's vector.
  float* host = nullptr;
  size_t host_bytes = 0;
  float* staging(size_t bytes) {
    if (bytes > host_bytes) {
      if (host) TRELLM_QUANT_CUDA_CHECK(cudaFreeHost(host));
      host = nullptr;
      host_bytes = 0;
      TRELLM_QUANT_CUDA_CHECK(cudaMallocHost(&host, bytes));
      host_bytes = bytes;
    }
    return host;
  }
};

HessianCudaContext::HessianCudaContext(void* stream) : impl_(std::make_unique<Impl>()) {
  impl_->stream = static_cast<cudaStream_t>(stream);
  TRELLM_QUANT_CUBLAS_CHECK(cublasCreate(&impl_->cublas));
  TRELLM_QUANT_CUBLAS_CHECK(cublasSetStream(impl_->cublas, impl_->stream));
}

HessianCudaContext::~HessianCudaContext() {
  cudaStreamSynchronize(impl_->stream);
  if (impl_->rows) cudaFree(impl_->rows);
  if (impl_->host) cudaFreeHost(impl_->host);
  cublasDestroy(impl_->cublas);
}

HessianAccumulatorCuda::HessianAccumulatorCuda(HessianCudaContext& ctx, int64_t in) : ctx_(ctx), in_(in) {
  if (in <= 0) fail("HessianAccumulatorCuda: invalid width ", in);
  cudaStream_t s = ctx_.impl().stream;
  auto grab = [&](void** p, size_t bytes) {
    const cudaError_t e = cudaMalloc(p, bytes);
    if (e == cudaSuccess) {
      TRELLM_QUANT_CUDA_CHECK(cudaMemsetAsync(*p, 0, bytes, s));
      return;
    }
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("calibration: out of GPU memory for a ", in, " x ", in, " Hessian (", bytes >> 20, " MiB; ", free_b >> 20,
         " MiB free of ", total_b >> 20, ")");
  };
  try {
    grab(reinterpret_cast<void**>(&sum_), size_t(in) * size_t(in) * sizeof(double));
    grab(reinterpret_cast<void**>(&pending_), size_t(kPendingRows) * size_t(in) * sizeof(float));
    grab(reinterpret_cast<void**>(&counts_), 2 * sizeof(long long));
  } catch (...) {
    cudaFree(sum_);
    cudaFree(pending_);
    cudaFree(counts_);
    throw;
  }
}

HessianAccumulatorCuda::~HessianAccumulatorCuda() {
  cudaStreamSynchronize(ctx_.impl().stream);
  cudaFree(sum_);
  cudaFree(pending_);
  cudaFree(counts_);
}

void HessianAccumulatorCuda::add(const float* x, int64_t rows) {
  cudaStream_t s = ctx_.impl().stream;
  for (int64_t r = 0; r < rows;) {
    const int64_t take = std::min(rows - r, kPendingRows - pending_rows_);
    TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(pending_ + pending_rows_ * in_, x + r * in_, size_t(take * in_) * sizeof(float),
                                            cudaMemcpyDeviceToDevice, s));
    pending_rows_ += take;
    r += take;
    if (pending_rows_ == kPendingRows) flush();
  }
}

void HessianAccumulatorCuda::flush() const {
  if (pending_rows_ == 0) return;
  HessianCudaContext::Impl& c = ctx_.impl();
  double* d = c.buffer(size_t(kPendingRows) * size_t(in_) * sizeof(double));
  to_double_finite<<<unsigned(pending_rows_), 256, 0, c.stream>>>(d, pending_, in_, counts_);
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  // Column-major, d is A = Xᵀ (in x rows, lda = in): C += A Aᵀ = XᵀX. The column-major upper triangle is the row-major
  // lower one finish_f32 reads, as HessianAccumulator keeps its sums.
  const double one = 1.0;
  TRELLM_QUANT_CUBLAS_CHECK(cublasDsyrk(c.cublas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, int(in_), int(pending_rows_), &one, d,
                                        int(in_), &one, sum_, int(in_)));
  pending_rows_ = 0;
}

std::pair<int64_t, int64_t> HessianAccumulatorCuda::counts() const {
  flush();
  long long n[2];
  TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(n, counts_, sizeof n, cudaMemcpyDeviceToHost, ctx_.impl().stream));
  TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(ctx_.impl().stream));
  return {n[0], n[1]};
}

int64_t HessianAccumulatorCuda::rows() const { return counts().first; }
int64_t HessianAccumulatorCuda::dropped() const { return counts().second; }

std::vector<float> HessianAccumulatorCuda::hessian() const {
  const int64_t n = rows();  // flushes
  const size_t elems = size_t(in_ * in_);
  if (n == 0) return std::vector<float>(elems, 0.0f);
  // On the device, into the context's conversion buffer (free between flushes), then one f32 copy: half the bytes
  // of the double sum, and no host loop of transposed stores over in² elements (130 Hessians a GLM layer).
  HessianCudaContext::Impl& c = ctx_.impl();
  float* d = reinterpret_cast<float*>(c.buffer(elems * sizeof(float)));
  finish_f32<<<dim3(unsigned((in_ + 255) / 256), unsigned(in_)), 256, 0, c.stream>>>(d, sum_, in_, 1.0 / double(n));
  TRELLM_QUANT_CUDA_CHECK(cudaGetLastError());
  float* host = c.staging(elems * sizeof(float));
  TRELLM_QUANT_CUDA_CHECK(cudaMemcpyAsync(host, d, elems * sizeof(float), cudaMemcpyDeviceToHost, c.stream));
  TRELLM_QUANT_CUDA_CHECK(cudaStreamSynchronize(c.stream));
  return std::vector<float>(host, host + elems);
}

}  // namespace trellm::trellis
