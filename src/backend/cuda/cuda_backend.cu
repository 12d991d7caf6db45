// CUDA backend: memory, dispatch from TensorViews to kernels, cuBLAS for large dense products.
#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <optional>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernel_clocks.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/kernels.h"
#include "backend/cuda/trellis_kernels.h"
#include "quant/trellis_weight.h"
#include "backend/cuda/mla.h"
#include "core/log.h"

namespace trellm {

using namespace cuda;

namespace {
// Dense products with at most this many rows use the f32-activation GEMV kernel (memory-bound, exact in
// f32 like the CPU); larger ones convert activations to the weight dtype and use cuBLAS tensor cores. The GEMV
// walks the rows 8 at a time on CUDA cores: at 64 rows it took 500 us for a 768x2048 bf16 product and 2.4 ms
// for 2048x10240 (ncu, H200, the 3-bit model's 64-token warm-up: dequantized trellis weights land here for
// 33-64 rows), where cuBLAS takes ~10 us. Hence 8, the trellis GEMV's row limit too. Up to kSplitMaxRows the
// cuBLAS product keeps near-f32 activations by splitting them into two 16-bit terms (twice the rows, still
// ~10 us): short prompts then match the CPU's greedy tokens as the GEMV did (bf16 rounding of 9..64-row
// prompts flipped a near-tie of the tiny_groups fixture at step 25); longer prompts round to the weight type.
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kSplitMaxRows = 64;
constexpr int kExpandTile = 256;  // keys per expanded-attention tile
// cuBLAS's workspace, set explicitly so a captured step (batched decode: the MLA projections of 17+ rows and the
// dense products run through cuBLAS) never makes cuBLAS allocate inside the capture; 32 MiB is NVIDIA's
// recommendation for Hopper.
constexpr size_t kCublasWorkspace = size_t(32) << 20;

// CudaOptions::mla_prefill as mla::make_plan takes it: nullopt lets the MAC count decide.
std::optional<bool> forced_expanded(const CudaOptions& o) {
  if (o.mla_prefill == CudaOptions::MlaPrefill::Auto) return std::nullopt;
  return o.mla_prefill == CudaOptions::MlaPrefill::Expanded;
}
}  // namespace

struct CudaBackend::Impl {
  int device = 0;
  int num_sms = 0;
  bool mla_v1 = false;  // route attention_mla to the v1 kernels (tests, benchmark baseline)
  CudaOptions options;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  void* cublas_workspace = nullptr;                            // kCublasWorkspace bytes, owned
  std::string name;
  std::vector<std::pair<void*, size_t>> scratch;               // grow-only device buffers
  uint64_t epoch = 0;                                          // scratch reallocations (Backend::memory_epoch)
  std::unordered_map<const void*, void*> moe_tables;           // experts span -> device pointer table
  std::vector<cudaEvent_t> events;                             // record_event() handles
  std::shared_ptr<const std::vector<GraphKernel>> last_graph_kernels;  // of the step graph launched last (kernel clocks)
  std::unique_ptr<cuda::clocks::Recorder> clocks;              // kernel_clocks_begin .. end

  void* scratch_bytes(size_t slot, size_t bytes) {
    if (scratch.size() <= slot) scratch.resize(slot + 1, {nullptr, 0});
    auto& s = scratch[slot];
    if (s.second < bytes) {
      cudaStreamCaptureStatus st;
      TRELLM_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
      TRELLM_ASSERT(st == cudaStreamCaptureStatusNone, "scratch must not grow while a CUDA graph is captured");
      TRELLM_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (s.first) TRELLM_CUDA_CHECK(cudaFree(s.first));
      epoch++;  // graphs captured before point to the freed buffer
      size_t want = std::max(bytes, s.second * 3 / 2);
      cudaError_t e = cudaMalloc(&s.first, want);
      if (e != cudaSuccess) {
        cudaGetLastError();  // as in CudaBackend::alloc
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        s = {nullptr, 0};
        fail("out of GPU memory for ", want >> 20, " MiB of scratch (", free_b >> 20, " MiB free of ", total_b >> 20, " MiB)");
      }
      s.second = want;
      // Zeroed like every backend allocation (CudaBackend::alloc says why); ordered before the kernels on `stream`.
      TRELLM_CUDA_CHECK(cudaMemsetAsync(s.first, 0, want, stream));
    }
    return s.first;
  }
  // Whether scratch_bytes(slot, bytes) can succeed with room to spare (for optional, memory-hungry fast paths).
  bool scratch_fits(size_t slot, size_t bytes) {
    if (slot < scratch.size() && scratch[slot].second >= bytes) return true;
    size_t free_b = 0, total_b = 0;
    TRELLM_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return free_b >= bytes * 3 / 2 + (size_t(512) << 20);
  }
  float* scratch_f32(size_t slot, size_t floats) { return static_cast<float*>(scratch_bytes(slot, floats * 4)); }
  // A scratch buffer that is zeroed whenever it is (re)allocated: the trellis kernels keep split-k arrival
  // counters in their workspace and leave them at zero after every call.
  void* scratch_zeroed(size_t slot, size_t bytes) {
    const size_t before = slot < scratch.size() ? scratch[slot].second : 0;
    void* p = scratch_bytes(slot, bytes);
    if (scratch[slot].second != before) TRELLM_CUDA_CHECK(cudaMemsetAsync(p, 0, scratch[slot].second, stream));
    return p;
  }
  std::unordered_map<const void*, void*> dense_kv_b;  // trellis kv_b -> its bf16 dequantization (absorbed MLA)
  std::unordered_map<const void*, float*> gate_f32;   // bf16 router gate -> f32 copy (prefill router GEMM)
};

CudaBackend::CudaBackend(int device, const CudaOptions& options) : impl_(std::make_unique<Impl>()) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) fail("no CUDA device is available");
  if (device < 0 || device >= count) fail("CUDA device ", device, " does not exist (", count, " found)");
  impl_->device = device;
  TRELLM_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp p;
  TRELLM_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  if (p.major < 8) fail("GPU ", p.name, " (sm_", p.major, p.minor, ") is too old: trellm needs sm_80 or newer");
  impl_->name = str_cat("cuda:", device, " (", p.name, ")");
  impl_->options = options;
  if (!options.describe().empty()) impl_->name += " [" + options.describe() + "]";
  impl_->num_sms = p.multiProcessorCount;
  TRELLM_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking));
  TRELLM_CUBLAS_CHECK(cublasCreate(&impl_->cublas));
  TRELLM_CUBLAS_CHECK(cublasSetStream(impl_->cublas, impl_->stream));  // (resets the workspace: set it after)
  TRELLM_CUDA_CHECK(cudaMalloc(&impl_->cublas_workspace, kCublasWorkspace));
  TRELLM_CUBLAS_CHECK(cublasSetWorkspace(impl_->cublas, impl_->cublas_workspace, kCublasWorkspace));
}

CudaBackend::~CudaBackend() {
  cudaStreamSynchronize(impl_->stream);
  for (auto& s : impl_->scratch)
    if (s.first) cudaFree(s.first);
  for (auto& t : impl_->moe_tables) cudaFree(t.second);
  for (auto& t : impl_->dense_kv_b) cudaFree(t.second);
  for (auto& t : impl_->gate_f32) cudaFree(t.second);
  for (auto e : impl_->events) cudaEventDestroy(e);
  cublasDestroy(impl_->cublas);
  cudaFree(impl_->cublas_workspace);
  cudaStreamDestroy(impl_->stream);
}

std::string CudaBackend::name() const { return impl_->name; }
void* CudaBackend::stream() const { return impl_->stream; }

void* CudaBackend::alloc(size_t bytes) {
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e != cudaSuccess) {
    // A failed cudaMalloc leaves its error as the runtime's last error: cleared here, or the next kernel launch
    // check (cudaGetLastError) would report this out-of-memory as its own, after the caller recovered from it.
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("out of GPU memory: need ", (bytes + (1 << 20) - 1) >> 20, " MiB more but ", free_b >> 20, " MiB of ",
         total_b >> 20, " MiB are free");  // the caller says what to lower (weights, KV cache, scratch)
  }
  // Zeroed once, so no kernel ever reads undefined bytes: the padding rows of a graph bucket and the unwritten
  // tail of a cache block are read (and their results dropped) by design, and garbage there could hold NaN or
  // Inf. compute-sanitizer initcheck reported those reads (attend, rms_norm, add_halves) before this. The cost is
  // a memset at set-up (~40 ms for a 100 GB KV cache). Allocations happen outside graph capture (the scratch
  // asserts it); synchronised, so a following cudaMemcpy on the legacy stream cannot race it.
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  TRELLM_CUDA_CHECK(cudaStreamIsCapturing(impl_->stream, &st));
  if (st == cudaStreamCaptureStatusNone) {
    TRELLM_CUDA_CHECK(cudaMemsetAsync(p, 0, std::max<size_t>(bytes, 1), impl_->stream));
    TRELLM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  }
  return p;
}
void CudaBackend::release(void* p) { TRELLM_CUDA_CHECK(cudaFree(p)); }
void CudaBackend::to_host(void* dst, const void* src, size_t bytes) {
  TRELLM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, impl_->stream));
  TRELLM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}
void CudaBackend::from_host(void* dst, const void* src, size_t bytes) {
  TRELLM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, impl_->stream));
  TRELLM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));  // src may be pageable and reused by the caller
}
void CudaBackend::fill_random(TensorView t, uint64_t seed, float scale) {
  cuda::fill_random(t.data, t.dtype, t.numel(), seed, scale, impl_->stream);
}
void CudaBackend::synchronize() { TRELLM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream)); }
void CudaBackend::use_mla_v1(bool on) { impl_->mla_v1 = on; }

void CudaBackend::embed(TensorView out, TensorView tokens, TensorView table) {
  TRELLM_ASSERT(tokens.dtype == DType::I32 && out.rows() == tokens.numel() && out.cols() == table.dim(1));
  cuda::embed(out.ptr<float>(), tokens.ptr<int32_t>(), table.data, table.dtype, int(tokens.numel()), int(table.dim(1)), impl_->stream);
}

void CudaBackend::rms_norm(TensorView out, TensorView x, TensorView w, float eps) {
  TRELLM_ASSERT(out.numel() == x.numel() && w.numel() == x.cols() && w.dtype == DType::F32);
  cuda::rms_norm(out.ptr<float>(), x.ptr<float>(), w.ptr<float>(), int(x.rows()), int(x.cols()), eps, impl_->stream);
}

void CudaBackend::add(TensorView out, TensorView a, TensorView b) {
  TRELLM_ASSERT(a.numel() == out.numel() && b.numel() == out.numel());
  cuda::add(out.ptr<float>(), a.ptr<float>(), b.ptr<float>(), out.numel(), impl_->stream);
}

void CudaBackend::add_rms_norm(TensorView h, TensorView y, TensorView w, float eps, TensorView out) {
  TRELLM_ASSERT(h.numel() == y.numel() && h.numel() == out.numel() && w.numel() == h.cols() && w.dtype == DType::F32);
  cuda::add_rms_norm(h.ptr<float>(), y.ptr<float>(), w.ptr<float>(), out.ptr<float>(), int(h.rows()), int(h.cols()), eps,
                     impl_->stream);
}

void CudaBackend::silu_mul(TensorView out, TensorView gate, TensorView up) {
  TRELLM_ASSERT(gate.numel() == out.numel() && up.numel() == out.numel());
  cuda::silu_mul(out.ptr<float>(), gate.ptr<float>(), up.ptr<float>(), out.numel(), impl_->stream);
}

void CudaBackend::rope(TensorView x, int offset, const Positions& pos, const RopeParams& r) {
  TRELLM_ASSERT(x.ndim == 3 && offset + r.dim <= x.dim(2) && pos.pos.numel() == x.dim(0));
  cuda::rope(x.ptr<float>(), int(x.dim(0)), int(x.dim(1)), int(x.dim(2)), offset, r.dim, pos.pos.ptr<int32_t>(), r.theta,
             impl_->stream);
}

namespace {

// The paged-cache view of a step's n rows (backend.h Positions), checked once per op: a bf16 pool of whole blocks
// and block tables that cover the bound.
cuda::KvPages kv_pages(TensorView cache, const Positions& p, int64_t n) {
  TRELLM_ASSERT(cache.ndim == 2 && cache.dtype == DType::BF16 && cache.rows() % kKvBlockTokens == 0,
                "latent cache pool: bf16 [blocks * ", kKvBlockTokens, ", width], not ", shape_str(cache));
  TRELLM_ASSERT(p.pos.dtype == DType::I32 && p.pos.numel() == n && p.seq.dtype == DType::I32 && p.seq.numel() == n,
                "positions: pos and seq I32 [", n, "], not ", shape_str(p.pos), " and ", shape_str(p.seq));
  TRELLM_ASSERT(p.tables.data && p.tables.ndim == 2 && p.tables.dtype == DType::I32 &&
                    int64_t(p.bound) <= int64_t(p.max_blocks()) * kKvBlockTokens,
                "block tables I32 [n_tables, max_blocks] covering bound ", p.bound, ", not ", shape_str(p.tables));
  return cuda::KvPages{p.tables.ptr<int32_t>(), p.seq.ptr<int32_t>(), p.max_blocks()};
}
}  // namespace

void CudaBackend::mla_cache_append(TensorView cache, TensorView kv, TensorView norm_w, float eps, const Positions& pos,
                                   const RopeParams& r) {
  const int rank = int(norm_w.numel());
  TRELLM_ASSERT(cache.cols() == kv.cols() && rank + r.dim == kv.cols());
  const cuda::KvPages pages = kv_pages(cache, pos, kv.rows());
  cuda::mla_cache_append(cache.ptr<uint16_t>(), kv.ptr<float>(), norm_w.ptr<float>(), int(kv.rows()), rank, r.dim, eps,
                         pos.pos.ptr<int32_t>(), pages, r.theta, impl_->stream);
}

void CudaBackend::mla_rope_append(TensorView q, int offset, TensorView cache, TensorView kv, TensorView norm_w, float eps,
                                  const Positions& pos, const RopeParams& r) {
  const int rank = int(norm_w.numel());
  TRELLM_ASSERT(q.ndim == 3 && offset + r.dim <= q.dim(2) && kv.rows() == q.dim(0) && cache.cols() == kv.cols() &&
                rank + r.dim == kv.cols());
  const cuda::KvPages pages = kv_pages(cache, pos, kv.rows());
  cuda::mla_rope_append(q.ptr<float>(), int(q.dim(1)), int(q.dim(2)), offset, r.dim, cache.ptr<uint16_t>(), kv.ptr<float>(),
                        norm_w.ptr<float>(), int(kv.rows()), rank, eps, pos.pos.ptr<int32_t>(), pages, r.theta, impl_->stream);
}

}  // namespace trellm

namespace trellm {

void CudaBackend::matmul(TensorView out, TensorView x, const Linear& w) {
  if (observer_) observer_(w, x);
  matmul_unobserved(out, x, w);
}

void CudaBackend::matmul_unobserved(TensorView out, TensorView x, const Linear& w) {
  const int64_t n = x.rows(), in = x.cols();
  TRELLM_ASSERT(in == w.in && out.numel() == n * w.out, "matmul shapes: x ", shape_str(x), " W [", w.out, ", ", w.in, "]");
  cudaStream_t s = impl_->stream;
  const float* bias = w.bias.empty() ? nullptr : w.bias.ptr<float>();
  if (w.exl3) return matmul_trellis(out, x, w);
  const DType dt = w.weight.dtype;
  if (n <= kGemvMaxRows) {
    gemv_dense(out.ptr<float>(), x.ptr<float>(), w.weight.data, dt, int(n), int(in), int(w.out), bias, s);
    return;
  }
  // cuBLAS (column-major): Yᵀ[out, n] = W[out, in] · Xᵀ[in, n]; W row-major is Wᵀ column-major with ld = in.
  const float one = 1.0f, zero = 0.0f;
  if (dt == DType::F32) {
    TRELLM_CUBLAS_CHECK(cublasSgemm(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(w.out), int(n), int(in), &one,
                                    w.weight.ptr<float>(), int(in), x.ptr<float>(), int(in), &zero, out.ptr<float>(), int(w.out)));
  } else {
    const bool split = n <= kSplitMaxRows;
    const int64_t rows = split ? 2 * n : n;
    uint16_t* xh = static_cast<uint16_t*>(impl_->scratch_bytes(0, size_t(rows * in) * 2));
    if (split) split_half(xh, x.ptr<float>(), n * in, dt == DType::BF16, s);
    else if (dt == DType::BF16) to_bf16(xh, x.ptr<float>(), n * in, s);
    else to_f16(xh, x.ptr<float>(), n * in, s);
    float* y = split ? impl_->scratch_f32(16, size_t(rows * w.out)) : out.ptr<float>();
    const cudaDataType_t t = dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
    TRELLM_CUBLAS_CHECK(cublasGemmEx(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(w.out), int(rows), int(in), &one,
                                     w.weight.data, t, int(in), xh, t, int(in), &zero, y, CUDA_R_32F, int(w.out),
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (split) return add_halves(out.ptr<float>(), y, n * w.out, bias, int(w.out), s);
  }
  if (bias) add_bias(out.ptr<float>(), bias, int(n), int(w.out), s);
}

namespace {
cuda::DeviceTrellis device_trellis(const Linear& l) {
  const trellis::TrellisWeight& t = *l.exl3;
  return cuda::DeviceTrellis{t.trellis, t.suh, t.svh, l.bias.empty() ? nullptr : l.bias.ptr<float>(), t.K,
                             int(t.codebook), int(t.in), int(t.out), int(t.in_padded), int(t.out_padded)};
}
}  // namespace

// Few rows (decode): the fused trellis GEMV/GEMM. Many rows (prefill): dequantize to bf16 once per call and
// use cuBLAS, which beats the fused tensor-core kernel from m = 32 on (bench/results/kernels.md: 2048x1536 at
// m = 32: 13 µs vs 15 µs; at m = 128: 14 µs vs 35 µs on the H100).
constexpr int64_t kTrellisFusedMaxRows = 32;

void CudaBackend::matmul_trellis(TensorView out, TensorView x, const Linear& w) {
  const int64_t n = x.rows();
  const cuda::DeviceTrellis dt = device_trellis(w);
  cudaStream_t s = impl_->stream;
  if (n <= kTrellisFusedMaxRows) {
    void* ws = impl_->scratch_zeroed(9, cuda::trellis_workspace_bytes(int(n), dt.in_padded, dt.out_padded));
    cuda::trellis_matmul(dt, x.ptr<float>(), out.ptr<float>(), int(n), ws, s);
    return;
  }
  matmul_unobserved(out, x, dequantized(w));
}

Linear CudaBackend::dequantized(const Linear& w) {
  uint16_t* wb = static_cast<uint16_t*>(impl_->scratch_bytes(10, size_t(w.out * w.in) * 2));
  cuda::trellis_dequantize_bf16(device_trellis(w), wb, impl_->stream);
  Linear dense = w;
  dense.exl3 = nullptr;
  dense.weight = TensorView(wb, DType::BF16, {w.out, w.in});
  return dense;
}

void CudaBackend::gemm_dequantized(float* out, const uint16_t* xh, int64_t n, const Linear& w, float beta) {
  TRELLM_ASSERT(w.exl3, "gemm_dequantized: a trellis linear");
  const Linear d = dequantized(w);
  // column-major: outᵀ [w.out, n] = W [w.out, w.in] (row-major = op T) · xhᵀ [w.in, n]
  const float one = 1.0f;
  TRELLM_CUBLAS_CHECK(cublasGemmEx(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(w.out), int(n), int(w.in), &one, d.weight.data,
                                   CUDA_R_16BF, int(w.in), xh, CUDA_R_16BF, int(w.in), &beta, out, CUDA_R_32F, int(w.out),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (!w.bias.empty()) add_bias(out, w.bias.ptr<float>(), int(n), int(w.out), impl_->stream);
}

// q_a and kv_a: a decode step runs one GEMV launch instead of two (trellis_matmul_pair decides whether the pair
// fits one grid; otherwise it runs two products itself); a prefill converts the shared input to bf16 once for
// the two dequantize + cuBLAS products.
void CudaBackend::matmul_pair(TensorView out1, TensorView out2, TensorView x, const Linear& w1, const Linear& w2) {
  const int64_t n = x.rows();
  if (observer_) return Backend::matmul_pair(out1, out2, x, w1, w2);  // two observed matmuls
  if (w1.exl3 && w2.exl3 && n > kTrellisFusedMaxRows && n > kSplitMaxRows &&
      x.cols() == w1.in && x.cols() == w2.in && out1.numel() == n * w1.out && out2.numel() == n * w2.out) {
    uint16_t* xh = static_cast<uint16_t*>(impl_->scratch_bytes(0, size_t(n * x.cols()) * 2));
    to_bf16(xh, x.ptr<float>(), n * x.cols(), impl_->stream);
    gemm_dequantized(out1.ptr<float>(), xh, n, w1, 0.0f);
    gemm_dequantized(out2.ptr<float>(), xh, n, w2, 0.0f);
    return;
  }
  if (!w1.exl3 || !w2.exl3 || n > cuda::kTrellisGemvMaxRows) return Backend::matmul_pair(out1, out2, x, w1, w2);
  TRELLM_ASSERT(x.cols() == w1.in && x.cols() == w2.in && out1.numel() == n * w1.out && out2.numel() == n * w2.out,
                "matmul_pair shapes: x ", shape_str(x), " W1 [", w1.out, ", ", w1.in, "] W2 [", w2.out, ", ", w2.in, "]");
  const cuda::DeviceTrellis d1 = device_trellis(w1), d2 = device_trellis(w2);
  void* ws = impl_->scratch_zeroed(9, cuda::trellis_workspace_bytes(int(n), std::max(d1.in_padded, d2.in_padded),
                                                                    d1.out_padded + d2.out_padded));
  cuda::trellis_matmul_pair(d1, d2, x.ptr<float>(), out1.ptr<float>(), out2.ptr<float>(), int(n), ws, impl_->stream);
}

// q_b(norm(q_a)) of a decode step: the norm folded into the GEMV prologue (one launch fewer per layer).
void CudaBackend::rms_norm_matmul(TensorView out, TensorView x, TensorView norm_w, float eps, const Linear& w) {
  const int64_t n = x.rows();
  if (!w.exl3 || n > cuda::kTrellisGemvMaxRows || observer_) return Backend::rms_norm_matmul(out, x, norm_w, eps, w);
  TRELLM_ASSERT(x.cols() == w.in && out.numel() == n * w.out && norm_w.numel() == w.in && norm_w.dtype == DType::F32,
                "rms_norm_matmul shapes: x ", shape_str(x), " W [", w.out, ", ", w.in, "] norm ", shape_str(norm_w));
  const cuda::DeviceTrellis d = device_trellis(w);
  void* ws = impl_->scratch_zeroed(9, cuda::trellis_workspace_bytes(int(n), d.in_padded, d.out_padded));
  cuda::trellis_matmul_normed(d, x.ptr<float>(), norm_w.ptr<float>(), eps, out.ptr<float>(), int(n), ws, impl_->stream);
}

const Linear& CudaBackend::dense_bf16(const Linear& w, Linear& tmp) {
  if (!w.exl3) return w;
  void*& buf = impl_->dense_kv_b[w.exl3];
  if (!buf) {  // first use happens in an uncaptured warm-up step
    TRELLM_CUDA_CHECK(cudaMalloc(&buf, size_t(w.out * w.in) * 2));
    cuda::trellis_dequantize_bf16(device_trellis(w), static_cast<uint16_t*>(buf), impl_->stream);
  }
  tmp = w;
  tmp.exl3 = nullptr;
  tmp.weight = TensorView(buf, DType::BF16, {w.out, w.in});
  return tmp;
}

bool CudaBackend::mla_fast(TensorView out, const Linear& kv_b, const Positions& pos, const MlaDims& d, int n) const {
  return !impl_->mla_v1 && !kv_b.exl3 && kv_b.weight.dtype == DType::BF16 &&
         kv_b.out == int64_t(d.heads) * (d.nope_dim + d.v_dim) && mla::supported(d.kv_rank, d.rope_dim, d.nope_dim, d.v_dim) &&
         out.numel() == int64_t(n) * d.heads * d.v_dim && pos.bound >= 1;
}

namespace {
// The kernel calls one MLA op makes (Positions::runs): each maximal stretch of one-row runs (decode rows, each of
// its own sequence) is one PerRow call, each longer run one Run call with its sequence's table. A decode batch of
// 64 sequences is one call; 64 decode rows + a prompt chunk are two. With more than 32 heads (no PerRow groups) a
// one-row run is a Run call of its own.
struct MlaPart {
  int row0, n;
  mla::Grouping grouping;
};
std::vector<MlaPart> mla_parts(const Positions& pos, int n, int heads) {
  if (pos.runs.empty()) return {MlaPart{0, n, mla::Grouping::Run}};
  const bool per_row = heads <= mla::kRowsPerCta;
  std::vector<MlaPart> parts;
  int row = 0;
  for (int len : pos.runs) {
    TRELLM_ASSERT(len >= 1 && row + len <= n, "positions: run of ", len, " rows at row ", row, " of ", n);
    MlaPart* last = parts.empty() ? nullptr : &parts.back();
    if (len == 1 && per_row && last && last->grouping == mla::Grouping::PerRow) last->n++;
    else parts.push_back(MlaPart{row, len, len == 1 && per_row ? mla::Grouping::PerRow : mla::Grouping::Run});
    row += len;
  }
  TRELLM_ASSERT(row == n, "positions: runs cover ", row, " rows, not ", n);
  return parts;
}

// The tensor-core kernels on rows [part.row0, part.row0 + part.n): q, out, pos and seq as pointer offsets. n <= 16
// rows take the graph-capturable decode kernels (ra: the rope + cache append folded in); more rows the cuBLAS
// projections around the tensor-core attention (a PerRow batch of decode rows too: no allocation, no sync, so
// it captures), or the expanded form where the plan says so.
void mla_fast_part(CudaBackend::Impl& impl, TensorView out, TensorView q, TensorView cache, const Linear& kv_b,
                   const Positions& pos, const cuda::KvPages& pages, const MlaDims& d, int row0, const mla::Plan& p, void* work,
                   const mla::RopeAppend* ra) {
  cudaStream_t s = impl.stream;
  const int n = p.n, H = d.heads, per = d.nope_dim + d.v_dim, qd = d.q_head_dim(), R = mla::kRank, W = mla::kWidth;
  const mla::Args a{out.ptr<float>() + size_t(row0) * H * d.v_dim, q.ptr<float>() + size_t(row0) * H * qd,
                    cache.ptr<uint16_t>(), kv_b.weight.ptr<uint16_t>(), pos.pos.ptr<int32_t>() + row0, pages.from(row0),
                    n, H, d.nope_dim, d.v_dim, d.scale, work, ra};
  if (!p.prefill) return mla::decode(a, p, s);
  TRELLM_ASSERT(!ra, "the folded rope + append is for decode plans");
  char* w = static_cast<char*>(work);
  const float one = 1.0f, zero = 0.0f;
  if (p.expanded) {
    // The sequence's rows [0, bound) into one contiguous buffer, then column-major: KVx[j, t] = Σ_k kv_b[j][k] c_kv[t][k]
    // (m = heads*(nope+v), n = bound, k = 512; c_kv is the first 512 columns of a 576-wide row)
    mla::gather_sequence(a, p, s);
    TRELLM_CUBLAS_CHECK(cublasGemmEx(impl.cublas, CUBLAS_OP_T, CUBLAS_OP_N, H * per, p.bound, R, &one, kv_b.weight.data,
                                     CUDA_R_16BF, R, w + p.seq_rows, CUDA_R_16BF, W, &zero, w + p.kvx, CUDA_R_16BF, H * per,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return mla::expanded_attend(a, p, s);
  }
  mla::prefill_prepare(a, p, s);
  // Column-major views per head h: Qb_lat[k, i] = Σ_d W_UK[h][d][k] q[i,h,d]  (m = 512, n = n, k = nope)
  TRELLM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      impl.cublas, CUBLAS_OP_N, CUBLAS_OP_N, R, n, d.nope_dim, &one, kv_b.weight.data, CUDA_R_16BF, R, int64_t(per) * R,
      w + p.q16, CUDA_R_16BF, H * qd, qd, &zero, w + p.qb, CUDA_R_16BF, H * W, W, H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  mla::attend(a, p, s);
  // out[i, h*v + j] = Σ_k W_UV[h][j][k] o_lat[i*H+h][k]  (m = v, n = n, k = 512; W_UV row-major = op T)
  TRELLM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      impl.cublas, CUBLAS_OP_T, CUBLAS_OP_N, d.v_dim, n, R, &one,
      static_cast<const uint16_t*>(kv_b.weight.data) + size_t(d.nope_dim) * R, CUDA_R_16BF, R, int64_t(per) * R, w + p.olat,
      CUDA_R_16BF, H * R, R, &zero, a.out, CUDA_R_32F, H * d.v_dim, d.v_dim, H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
}  // namespace

// Decode on the tensor-core path, one kernel call (a single run or one stretch of decode rows, n <= 16): the rope +
// cache append run inside the q_lat kernel (mla::RopeAppend), one launch fewer per layer. Everything else: the
// rope + append kernel over all rows, then the attention per part.
void CudaBackend::attention_mla_append(TensorView out, TensorView q, int offset, TensorView cache, TensorView kv,
                                       TensorView norm_w, float eps, const Linear& kv_b_in, const Positions& pos,
                                       const MlaDims& d, const RopeParams& rope, MlaMode mode) {
  // With an observer, the append first and then attention_mla, which reports the appended latents.
  if (observer_) return Backend::attention_mla_append(out, q, offset, cache, kv, norm_w, eps, kv_b_in, pos, d, rope, mode);
  Linear kv_b_tmp;
  const Linear& kv_b = dense_bf16(kv_b_in, kv_b_tmp);
  const int n = int(q.dim(0));
  if (!mla_fast(out, kv_b, pos, d, n) || n > mla::kDecodeMaxRows || offset != d.nope_dim || rope.dim != d.rope_dim)
    return Backend::attention_mla_append(out, q, offset, cache, kv, norm_w, eps, kv_b_in, pos, d, rope, mode);
  const std::vector<MlaPart> parts = mla_parts(pos, n, d.heads);
  if (parts.size() != 1) return Backend::attention_mla_append(out, q, offset, cache, kv, norm_w, eps, kv_b_in, pos, d, rope, mode);
  TRELLM_ASSERT(q.ndim == 3 && q.dim(1) == d.heads && q.dim(2) == d.q_head_dim() && cache.cols() == d.cache_width() &&
                kv.rows() == n && kv.cols() == cache.cols() && norm_w.numel() == d.kv_rank && norm_w.dtype == DType::F32,
                "attention_mla_append shapes: q ", shape_str(q), " kv ", shape_str(kv), " cache ", shape_str(cache));
  const cuda::KvPages pages = kv_pages(cache, pos, n);
  const mla::Plan p = mla::make_plan(n, d.heads, d.nope_dim, d.v_dim, pos.bound, impl_->num_sms, parts[0].grouping);
  const mla::RopeAppend ra{kv.ptr<float>(), norm_w.ptr<float>(), eps, cache.ptr<uint16_t>(), rope.theta};
  mla_fast_part(*impl_, out, q, cache, kv_b, pos, pages, d, 0, p, impl_->scratch_bytes(8, p.bytes), &ra);
}

void CudaBackend::attention_mla(TensorView out, TensorView q, TensorView cache, const Linear& kv_b_in,
                                const Positions& pos, const MlaDims& d, MlaMode mode) {
  // The absorbed products read kv_b per head, which the row-major trellis product cannot slice: a trellis kv_b
  // is used as its bf16 dequantization (made once; 9.2 MB per GLM layer).
  Linear kv_b_tmp;
  const Linear& kv_b = dense_bf16(kv_b_in, kv_b_tmp);
  const int n = int(q.dim(0));
  TRELLM_ASSERT(q.ndim == 3 && q.dim(1) == d.heads && q.dim(2) == d.q_head_dim() && cache.cols() == d.cache_width() &&
                kv_b.in == d.kv_rank, "attention_mla shapes: q ", shape_str(q), " cache ", shape_str(cache));
  const cuda::KvPages pages = kv_pages(cache, pos, n);
  if (observer_) {  // kv_b_proj's inputs for this step's tokens: their latent rows c_kv (bf16 in the cache)
    float* lat = impl_->scratch_f32(15, size_t(n) * d.kv_rank);
    cuda::gather_step_latents(lat, cache.ptr<uint16_t>(), n, d.kv_rank, int(d.cache_width()), pos.pos.ptr<int32_t>(), pages,
                              impl_->stream);
    observer_(kv_b_in, TensorView(lat, DType::F32, {int64_t(n), int64_t(d.kv_rank)}));
  }
  const std::vector<MlaPart> parts = mla_parts(pos, n, d.heads);
  cudaStream_t s = impl_->stream;
  // Tensor-core kernels (mla_*.cu) for GLM's latent (rank 512, rope 64) with a dense bf16 kv_b, whatever the
  // mode: per part, n <= 16 rows take the graph-capturable decode path, longer ones the prefill path (absorbed or
  // expanded, whichever make_plan finds cheaper; the same function either way, and whatever the mode). The
  // expanded form's key buffer (up to 294 MB) is optional: without room for it the prefill stays absorbed.
  // Other shapes (the tiny fixtures) run the v1 kernels below.
  if (mla_fast(out, kv_b, pos, d, n)) {
    // The parts run one after another on the stream, so they share one workspace, sized for the largest.
    std::vector<mla::Plan> plans;
    size_t bytes = 0;
    for (const MlaPart& part : parts) {
      mla::Plan p = mla::make_plan(part.n, d.heads, d.nope_dim, d.v_dim, pos.bound, impl_->num_sms, part.grouping,
                                   /*allow_expanded=*/true, forced_expanded(impl_->options));
      if (p.expanded && !impl_->scratch_fits(8, p.bytes))
        p = mla::make_plan(part.n, d.heads, d.nope_dim, d.v_dim, pos.bound, impl_->num_sms, part.grouping,
                           /*allow_expanded=*/false);
      bytes = std::max(bytes, p.bytes);
      plans.push_back(p);
    }
    void* work = impl_->scratch_bytes(8, bytes);
    for (size_t i = 0; i < parts.size(); i++)
      mla_fast_part(*impl_, out, q, cache, kv_b, pos, pages, d, parts[i].row0, plans[i], work, nullptr);
    return;
  }
  // v1: the absorbed form takes every row at once (each reads its own table); the expanded form runs per
  // sequence (a run), and decode rows of different sequences run absorbed (the same function).
  const int H = d.heads, qd = d.q_head_dim();
  auto shape = [&](int row0, int rows_n) {
    return MlaShape{rows_n, H, d.kv_rank, d.rope_dim, d.nope_dim, d.v_dim, pos.pos.ptr<int32_t>() + row0, pos.bound, d.scale,
                    pages.from(row0)};
  };
  auto absorbed = [&](int row0, int rows_n) {
    float* work = impl_->scratch_f32(1, mla_absorbed_work_floats(rows_n, H, d.kv_rank, pos.bound));
    mla_absorbed(out.ptr<float>() + size_t(row0) * H * d.v_dim, q.ptr<float>() + size_t(row0) * H * qd, cache.ptr<uint16_t>(),
                 kv_b.weight.data, kv_b.weight.dtype, shape(row0, rows_n), work, s);
  };
  if (mode == MlaMode::Absorbed) return absorbed(0, n);
  const int per = d.nope_dim + d.v_dim, T = pos.bound;
  float* lat = impl_->scratch_f32(2, size_t(kExpandTile) * d.kv_rank);
  float* kvx = impl_->scratch_f32(3, size_t(kExpandTile) * d.heads * per);
  float* acc = impl_->scratch_f32(4, size_t(n) * H * d.v_dim);
  float* st = impl_->scratch_f32(5, size_t(n) * H * 2);
  for (const MlaPart& part : parts) {
    if (part.grouping == mla::Grouping::PerRow) {
      absorbed(part.row0, part.n);
      continue;
    }
    const int rows = part.n * H;
    const MlaShape m = shape(part.row0, part.n);
    const float* qp = q.ptr<float>() + size_t(part.row0) * H * qd;
    mla_expanded_init(acc, st, st + rows, rows, d.v_dim, s);
    for (int t0 = 0; t0 < T; t0 += kExpandTile) {
      const int nt = std::min(kExpandTile, T - t0);
      gather_latent(lat, cache.ptr<uint16_t>(), t0, nt, d.kv_rank, d.cache_width(), m.pages, m.pos + part.n - 1, s);
      // Unobserved: the step's latents were reported to the observer once, above.
      matmul_unobserved(TensorView(kvx, DType::F32, {nt, int64_t(d.heads) * per}), TensorView(lat, DType::F32, {nt, d.kv_rank}),
                        kv_b);
      mla_expanded_tile(qp, cache.ptr<uint16_t>(), kvx, t0, nt, m, acc, st, st + rows, s);
    }
    mla_expanded_finish(out.ptr<float>() + size_t(part.row0) * H * d.v_dim, acc, st + rows, rows, d.v_dim, s);
  }
}

// Rows from which the shared expert of a trellis MoE runs as dense products (dequantize + cuBLAS) instead of
// inside the grouped expert GEMM.
constexpr int kSharedDenseMinRows = 128;

void CudaBackend::moe_ffn_trellis(TensorView out, TensorView x, TensorView weights, TensorView ids,
                                  std::span<const Expert> experts, const Expert* shared, const cuda::MoeResidual* res) {
  const int m = int(x.rows()), hidden = int(x.cols()), K = int(ids.cols()), E = int(experts.size());
  const int inter = int(experts[0].gate.out);
  // Per layer, one device array of descriptors: 3 per expert (gate, up, down), then the shared expert's 3.
  void*& table = impl_->moe_tables[experts.data()];
  if (!table) {
    std::vector<cuda::DeviceTrellis> d;
    for (const Expert& e : experts) {
      TRELLM_ASSERT(e.gate.exl3 && e.up.exl3 && e.down.exl3 && e.gate.out == inter, "experts must all be trellis-coded");
      d.insert(d.end(), {device_trellis(e.gate), device_trellis(e.up), device_trellis(e.down)});
    }
    if (shared) {
      TRELLM_ASSERT(shared->gate.exl3 && shared->up.exl3 && shared->down.exl3 && shared->gate.out == inter,
                    "the fused MoE kernels need a trellis-coded shared expert of the routed experts' width");
      d.insert(d.end(), {device_trellis(shared->gate), device_trellis(shared->up), device_trellis(shared->down)});
    }
    TRELLM_CUDA_CHECK(cudaMalloc(&table, d.size() * sizeof(cuda::DeviceTrellis)));
    TRELLM_CUDA_CHECK(cudaMemcpy(table, d.data(), d.size() * sizeof(cuda::DeviceTrellis), cudaMemcpyHostToDevice));
  }
  const auto* dt = static_cast<const cuda::DeviceTrellis*>(table);
  void* ws = impl_->scratch_zeroed(11, cuda::moe_workspace_bytes(m, K, hidden, inter, E));
  // max_k sizes the decode kernels' weight ring (K = 3 everywhere: 24 KB instead of 64 KB); a K and codebook
  // shared by every expert select the prefill GEMM specialised for them.
  int max_k = 2, uniform_k = experts[0].gate.exl3->K, uniform_cb = int(experts[0].gate.exl3->codebook);
  auto note = [&](const Linear& l) {
    max_k = std::max(max_k, l.exl3->K);
    if (l.exl3->K != uniform_k || int(l.exl3->codebook) != uniform_cb) uniform_k = 0, uniform_cb = -1;
  };
  for (const Expert& e : experts) note(e.gate), note(e.up), note(e.down);
  if (shared) note(shared->gate), note(shared->up), note(shared->down);
  // Prefill: the shared expert sees every row, so in the grouped GEMM its weights would be decoded once per
  // 128-row tile (16 times at 2,048 rows); as dense products (dequantize once + cuBLAS) it is one decode and
  // three tensor-core GEMMs, added to the routed experts' sum afterwards.
  const bool shared_dense = shared && m >= kSharedDenseMinRows;
  cuda::moe_experts(dt, shared && !shared_dense ? dt + 3 * E : nullptr, E, x.ptr<float>(), ids.ptr<int32_t>(),
                    weights.ptr<float>(), out.ptr<float>(), m, K, hidden, inter, ws, impl_->stream, max_k, uniform_k, uniform_cb,
                    res);
  if (!shared_dense) return;
  // out += down(silu(gate(x)) * up(x)): x converted to bf16 once for gate and up, the SwiGLU written in bf16 for
  // down, and down accumulated into the routed sum by cuBLAS (beta = 1): the same arithmetic as three matmuls, a
  // silu_mul and an add, with three conversion / add passes fewer (~50 us per layer at 2,048 rows).
  const int64_t si = shared->gate.out;
  float* g = impl_->scratch_f32(13, size_t(m) * si);
  float* u = impl_->scratch_f32(14, size_t(m) * si);
  uint16_t* xh = static_cast<uint16_t*>(impl_->scratch_bytes(0, size_t(m) * std::max<int64_t>(hidden, si) * 2));
  to_bf16(xh, x.ptr<float>(), int64_t(m) * hidden, impl_->stream);
  gemm_dequantized(g, xh, m, shared->gate, 0.0f);
  gemm_dequantized(u, xh, m, shared->up, 0.0f);
  cuda::silu_mul_bf16(xh, g, u, int64_t(m) * si, impl_->stream);
  gemm_dequantized(out.ptr<float>(), xh, m, shared->down, 1.0f);
}

// Rows from which the router's scores come from a GEMM instead of CUDA-core dot products in the cluster kernel.
constexpr int64_t kRouteGemmMinRows = 17;

// The routers of trellis_kernels.h (cluster kernel, logits kernel) cover a bf16 gate within these limits.
static bool fast_router(TensorView gate, const MoeRouting& r) {
  return gate.dtype == DType::BF16 && r.n_experts <= 1024 && r.top_k <= 32 && r.n_group <= 32;
}

void CudaBackend::route_by_gemm(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias,
                                const MoeRouting& r) {
  const int m = int(x.rows()), H = int(x.cols()), E = r.n_experts;
  float*& g32 = impl_->gate_f32[gate.data];
  if (!g32) {  // first use happens in an uncaptured step (prefill is never captured)
    TRELLM_CUDA_CHECK(cudaMalloc(&g32, size_t(E) * H * 4));
    cuda::bf16_to_f32(g32, gate.ptr<uint16_t>(), int64_t(E) * H, impl_->stream);
  }
  float* logits = impl_->scratch_f32(12, size_t(m) * E);
  // column-major: logitsᵀ [E, m] = gate32 [E, H] (row-major = op T of col-major H x E) · xᵀ [H, m]
  const float one = 1.0f, zero = 0.0f;
  TRELLM_CUBLAS_CHECK(cublasSgemm(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, E, m, H, &one, g32, H, x.ptr<float>(), H, &zero,
                                  logits, E));
  cuda::moe_route_logits(logits, bias.empty() ? nullptr : bias.ptr<float>(), m, E, r.top_k, r.n_group, r.topk_group,
                         r.norm_topk_prob, r.routed_scaling_factor, weights.ptr<float>(), ids.ptr<int32_t>(), impl_->stream);
}

void CudaBackend::moe_route(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias,
                            const MoeRouting& r) {
  TRELLM_ASSERT(gate.dim(0) == r.n_experts && gate.dim(1) == x.cols() && ids.dtype == DType::I32 &&
                weights.numel() == x.rows() * r.top_k && ids.numel() == x.rows() * r.top_k);
  const float* b = bias.empty() ? nullptr : bias.ptr<float>();
  if (fast_router(gate, r)) {
    if (x.rows() >= kRouteGemmMinRows) return route_by_gemm(weights, ids, x, gate, bias, r);
    // The cluster router of trellis_kernels.h: 5.9 us per layer at m = 1 on the H100, against 137 us for the
    // one-block v1 kernel below (bench/results/e2e.md, part timing).
    cuda::moe_route(x.ptr<float>(), gate.ptr<uint16_t>(), b, int(x.rows()), int(x.cols()), r.n_experts, r.top_k, r.n_group,
                    r.topk_group, r.norm_topk_prob, r.routed_scaling_factor, weights.ptr<float>(), ids.ptr<int32_t>(),
                    impl_->stream);
    return;
  }
  cuda::moe_route(x.ptr<float>(), gate.data, gate.dtype, b, int(x.rows()), int(x.cols()), r.n_experts, r.top_k, r.n_group,
                  r.topk_group, r.norm_topk_prob, r.routed_scaling_factor, weights.ptr<float>(), ids.ptr<int32_t>(),
                  impl_->stream);
}

void CudaBackend::add_rms_norm_route(TensorView h, TensorView y, TensorView norm_w, float eps, TensorView x,
                                     TensorView weights, TensorView ids, TensorView gate, TensorView bias,
                                     const MoeRouting& r) {
  // Prefill takes the unfused pair (norm kernel, then the GEMM router of moe_route).
  if (!fast_router(gate, r) || h.cols() > 4096 || h.rows() >= kRouteGemmMinRows)
    return Backend::add_rms_norm_route(h, y, norm_w, eps, x, weights, ids, gate, bias, r);
  TRELLM_ASSERT(h.numel() == y.numel() && h.numel() == x.numel() && norm_w.numel() == h.cols() &&
                norm_w.dtype == DType::F32 && gate.dim(0) == r.n_experts && gate.dim(1) == h.cols() &&
                ids.dtype == DType::I32 && weights.numel() == h.rows() * r.top_k && ids.numel() == h.rows() * r.top_k);
  cuda::add_rms_norm_route(h.ptr<float>(), y.ptr<float>(), norm_w.ptr<float>(), eps, x.ptr<float>(), gate.ptr<uint16_t>(),
                           bias.empty() ? nullptr : bias.ptr<float>(), int(h.rows()), int(h.cols()), r.n_experts, r.top_k,
                           r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor, weights.ptr<float>(),
                           ids.ptr<int32_t>(), impl_->stream);
}

void CudaBackend::moe_ffn_add_rms_norm(TensorView out, TensorView x, TensorView weights, TensorView ids,
                                       std::span<const Expert> experts, const Expert* shared, TensorView h,
                                       TensorView norm_w, float eps, TensorView x_next) {
  const int64_t m = x.rows();
  // Decode on trellis experts: the down kernel's last blocks run the residual step. Otherwise the two ops (also
  // with TRELLM_MOE_RESIDUAL=0, the A/B baseline).
  static const bool fuse = cuda::env_int("TRELLM_MOE_RESIDUAL", 1) != 0;
  if (!fuse || observer_ || experts.empty() || !experts[0].gate.exl3 || m > cuda::kMoeDecodeMaxTokens)
    return Backend::moe_ffn_add_rms_norm(out, x, weights, ids, experts, shared, h, norm_w, eps, x_next);
  TRELLM_ASSERT(out.numel() == x.numel() && out.data != x.data && ids.rows() == m && h.numel() == out.numel() &&
                    x_next.numel() == out.numel() && norm_w.numel() == h.cols() && norm_w.dtype == DType::F32,
                "moe_ffn_add_rms_norm: x ", x.rows(), "x", x.cols(), ", out ", out.numel(), " values",
                out.data == x.data ? " (aliasing x)" : "", ", ids ", ids.rows(), " rows, h ", h.numel(), ", x_next ",
                x_next.numel(), ", norm_w ", norm_w.numel(), " values of ", dtype_name(norm_w.dtype));
  const cuda::MoeResidual res{h.ptr<float>(), norm_w.ptr<float>(), eps, x_next.ptr<float>()};
  moe_ffn_trellis(out, x, weights, ids, experts, shared, &res);
}

void CudaBackend::moe_ffn(TensorView out, TensorView x, TensorView weights, TensorView ids,
                          std::span<const Expert> experts, const Expert* shared) {
  const int m = int(x.rows()), hidden = int(x.cols()), K = int(ids.cols()), E = int(experts.size());
  TRELLM_ASSERT(out.numel() == x.numel() && out.data != x.data && ids.rows() == m && E > 0);
  if (observer_) return moe_ffn_observed(out, x, weights, ids, experts, shared);
  if (experts[0].gate.exl3) return moe_ffn_trellis(out, x, weights, ids, experts, shared);
  // The per-layer device table of expert weight pointers, built on first use (outside graph capture).
  void*& table = impl_->moe_tables[experts.data()];
  if (!table) {
    std::vector<const void*> ptrs;
    for (const Expert& e : experts)
      TRELLM_ASSERT(e.gate.weight.dtype == experts[0].gate.weight.dtype && e.up.weight.dtype == e.gate.weight.dtype &&
                    e.down.weight.dtype == e.gate.weight.dtype && !e.gate.exl3, "experts must share one dense dtype");
    if (shared) TRELLM_ASSERT(shared->gate.weight.dtype == experts[0].gate.weight.dtype && !shared->gate.exl3);
    for (const Expert& e : experts) ptrs.insert(ptrs.end(), {e.gate.weight.data, e.up.weight.data, e.down.weight.data});
    ptrs.insert(ptrs.end(), {shared ? shared->gate.weight.data : nullptr, shared ? shared->up.weight.data : nullptr,
                             shared ? shared->down.weight.data : nullptr});
    TRELLM_CUDA_CHECK(cudaMalloc(&table, ptrs.size() * sizeof(void*)));
    TRELLM_CUDA_CHECK(cudaMemcpy(table, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice));
  }
  DenseMoeArgs a;
  a.weights = static_cast<const void* const*>(table);
  a.dtype = experts[0].gate.weight.dtype;
  a.n_experts = E;
  a.inter = int(experts[0].gate.out);
  a.shared_inter = shared ? int(shared->gate.out) : 0;
  a.hidden = hidden;
  a.m = m;
  a.top_k = K;
  a.has_shared = shared != nullptr;
  const int jobs = m * K + (shared ? m : 0);
  float* act = impl_->scratch_f32(6, size_t(jobs) * std::max(a.inter, a.shared_inter));
  float* part = impl_->scratch_f32(7, size_t(jobs) * hidden);
  moe_dense(a, x.ptr<float>(), ids.ptr<int32_t>(), weights.ptr<float>(), act, part, out.ptr<float>(), impl_->stream);
}

// Calibration: expert by expert, each over the rows routed to it, through observed matmuls (the observer sees each
// expert's own rows, as on the CPU), dense or trellis alike. The routing comes to the host (one sync per layer and
// step; calibration steps are never captured) and is sorted by expert there; a token's sum runs over its experts by
// increasing id and then the shared expert, CpuBackend::moe_ffn's order.
void CudaBackend::moe_ffn_observed(TensorView out, TensorView x, TensorView weights, TensorView ids,
                                   std::span<const Expert> experts, const Expert* shared) {
  const int m = int(x.rows()), hidden = int(x.cols()), K = int(ids.cols()), E = int(experts.size());
  cudaStream_t s = impl_->stream;
  std::vector<int32_t> id(size_t(m) * K);
  to_host(id.data(), ids.data, id.size() * sizeof(int32_t));
  // Per expert, its (token, slot) pairs in token order: slots first, then the tokens (rows of x), by expert.
  std::vector<int32_t> start(size_t(E) + 1, 0);
  for (int32_t e : id) {
    TRELLM_ASSERT(e >= 0 && e < E, "expert id ", e, " of ", E);
    start[size_t(e) + 1]++;
  }
  for (int e = 0; e < E; e++) start[size_t(e) + 1] += start[size_t(e)];
  std::vector<int32_t> order(2 * id.size());
  std::vector<int32_t> fill(start.begin(), start.end() - 1);
  for (int32_t j = 0; j < int32_t(id.size()); j++) {
    const int32_t at = fill[size_t(id[size_t(j)])]++;
    order[size_t(at)] = j;                       // slot
    order[id.size() + size_t(at)] = j / K;       // token
  }
  int32_t* dev = static_cast<int32_t*>(impl_->scratch_bytes(17, order.size() * sizeof(int32_t)));
  from_host(dev, order.data(), order.size() * sizeof(int32_t));
  int64_t most = shared ? m : 0, inter = shared ? shared->gate.out : 0;
  for (int e = 0; e < E; e++) {
    most = std::max<int64_t>(most, start[size_t(e) + 1] - start[size_t(e)]);
    inter = std::max<int64_t>(inter, experts[size_t(e)].gate.out);
  }
  float* xs = impl_->scratch_f32(18, size_t(most) * hidden);
  float* ys = impl_->scratch_f32(19, size_t(most) * hidden);
  float* g = impl_->scratch_f32(20, size_t(most) * inter);
  float* u = impl_->scratch_f32(21, size_t(most) * inter);
  auto run = [&](const Expert& ex, int64_t rows, TensorView in) {
    const TensorView gv(g, DType::F32, {rows, ex.gate.out}), uv(u, DType::F32, {rows, ex.up.out});
    matmul(gv, in, ex.gate);
    matmul(uv, in, ex.up);
    silu_mul(gv, gv, uv);
    matmul(TensorView(ys, DType::F32, {rows, hidden}), gv, ex.down);
  };
  TRELLM_CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), s));
  for (int e = 0; e < E; e++) {
    const int rows = start[size_t(e) + 1] - start[size_t(e)];
    if (!rows) continue;
    const int32_t* slots = dev + start[size_t(e)];
    const int32_t* tokens = dev + id.size() + start[size_t(e)];
    cuda::gather_rows(xs, x.data, tokens, rows, int64_t(hidden) * 4, s);
    run(experts[size_t(e)], rows, TensorView(xs, DType::F32, {rows, hidden}));
    cuda::moe_scatter_add(out.ptr<float>(), ys, slots, weights.ptr<float>(), rows, K, hidden, s);
  }
  if (!shared) return;
  run(*shared, m, x);
  add(out, out, TensorView(ys, DType::F32, {m, hidden}));
}

}  // namespace trellm

namespace trellm {

void CudaBackend::sample_step(TensorView logits, TensorView params, TensorView token, TensorView pos,
                              TensorView history) {
  TRELLM_ASSERT(token.dtype == DType::I32 && pos.dtype == DType::I32 && history.dtype == DType::I32 &&
                params.nbytes() == sizeof(SamplingParams));
  cuda::sample_step(logits.ptr<float>(), logits.cols(), params.data, token.ptr<int32_t>(), pos.ptr<int32_t>(),
                    history.ptr<int32_t>(), history.numel(), impl_->stream);
}

void CudaBackend::sample_rows(TensorView logits, TensorView params, TensorView steps, TensorView tokens) {
  const int64_t n = logits.rows();
  TRELLM_ASSERT(logits.dtype == DType::F32 && steps.dtype == DType::I32 && tokens.dtype == DType::I32 && steps.numel() == n &&
                    tokens.numel() == n && params.nbytes() == size_t(n) * sizeof(SamplingParams),
                "sample_rows: logits ", shape_str(logits), " params ", params.nbytes(), " B, steps ", shape_str(steps),
                " tokens ", shape_str(tokens));
  cuda::sample_rows(logits.ptr<float>(), logits.cols(), int(n), params.data, steps.ptr<int32_t>(), tokens.ptr<int32_t>(),
                    impl_->stream);
}

void CudaBackend::spec_verify(const SpecVerify& v) {
  const int K = v.K;
  const int64_t m = v.sequences(), V = v.target.cols();
  cuda::spec_verify(v.target.ptr<float>(), K > 0 ? v.draft.ptr<float>() : nullptr, v.draft_stride,
                    K > 0 ? v.src.ptr<int32_t>() : nullptr, v.tokens.ptr<int32_t>(), v.params.data, v.steps.ptr<int32_t>(),
                    v.out.ptr<int32_t>(), int(m), K, V, impl_->stream);
}

void CudaBackend::spec_prepare(const SpecPrepare& p) {
  const int K = p.K, j = p.j;
  const int64_t m = p.sequences();
  auto ptr = [](const TensorView& t) { return t.empty() ? nullptr : static_cast<int32_t*>(t.data); };
  cuda::spec_prepare(p.result.ptr<int32_t>(), p.steps.ptr<int32_t>(), ptr(p.base), ptr(p.drafts), ptr(p.tokens), ptr(p.pos),
                     ptr(p.seq), ptr(p.logit_idx), ptr(p.steps_out), int(m), K, j, impl_->stream);
}

void CudaBackend::gather_rows(TensorView out, TensorView x, TensorView idx) {
  TRELLM_ASSERT(idx.dtype == DType::I32 && out.dtype == x.dtype && out.rows() == idx.numel() && out.cols() == x.cols(),
                "gather_rows: out ", shape_str(out), " x ", shape_str(x), " idx ", shape_str(idx));
  cuda::gather_rows(out.data, x.data, idx.ptr<int32_t>(), int(idx.numel()), x.cols() * int64_t(dtype_size(x.dtype)),
                    impl_->stream);
}

namespace {
class CudaStepGraph final : public StepGraph {
 public:
  using Kernels = std::shared_ptr<const std::vector<GraphKernel>>;
  CudaStepGraph(cudaGraphExec_t exec, cudaStream_t s, Kernels kernels, Kernels* last)
      : exec_(exec), stream_(s), kernels_(std::move(kernels)), last_(last) {}
  ~CudaStepGraph() override { cudaGraphExecDestroy(exec_); }
  void launch() override {
    if (kernels_) *last_ = kernels_;  // kernel clocks name what they record after the graph launched last
    TRELLM_CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  Kernels kernels_;  // with kernel clocks: the graph's kernel nodes in launch order
  Kernels* last_;    // the backend's (alive whenever a graph is launched)
};
}  // namespace

void CudaBackend::forget_weights() {
  TRELLM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  for (auto& t : impl_->moe_tables) TRELLM_CUDA_CHECK(cudaFree(t.second));
  for (auto& t : impl_->dense_kv_b) TRELLM_CUDA_CHECK(cudaFree(t.second));
  for (auto& t : impl_->gate_f32) TRELLM_CUDA_CHECK(cudaFree(t.second));
  impl_->moe_tables.clear();
  impl_->dense_kv_b.clear();
  impl_->gate_f32.clear();
  impl_->epoch++;  // captured graphs may point into them
}

uint64_t CudaBackend::memory_epoch() const { return impl_->epoch; }

std::unique_ptr<StepGraph> CudaBackend::capture(const std::function<void()>& step) {
  cudaStream_t s = impl_->stream;
  TRELLM_CUDA_CHECK(cudaStreamSynchronize(s));
  TRELLM_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  try {
    step();
  } catch (...) {
    cudaGraph_t g;
    cudaStreamEndCapture(s, &g);
    if (g) cudaGraphDestroy(g);
    throw;
  }
  cudaGraph_t graph = nullptr;
  TRELLM_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec = nullptr;
  TRELLM_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CudaStepGraph::Kernels kernels;
  if (cuda::clocks::built()) kernels = std::make_shared<const std::vector<GraphKernel>>(cuda::clocks::graph_kernels(graph));
  TRELLM_CUDA_CHECK(cudaGraphDestroy(graph));
  return std::make_unique<CudaStepGraph>(exec, s, std::move(kernels), &impl_->last_graph_kernels);
}

bool CudaBackend::kernel_clocks_available() const { return cuda::clocks::built(); }

void CudaBackend::kernel_clocks_begin(size_t max_records) {
  TRELLM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  impl_->clocks = std::make_unique<cuda::clocks::Recorder>(max_records);
  impl_->last_graph_kernels.reset();  // only a graph launched from here on names the records
}

KernelClocks CudaBackend::kernel_clocks_end() {
  if (!impl_->clocks) fail("kernel clocks: end without begin");
  KernelClocks k;
  k.records = impl_->clocks->collect(&k.dropped);
  impl_->clocks.reset();
  if (!impl_->last_graph_kernels) fail("kernel clocks: no step graph was launched while they recorded");
  k.kernels = *impl_->last_graph_kernels;
  return k;
}

}  // namespace trellm

namespace trellm {

int CudaBackend::record_event() {
  cudaEvent_t e;
  TRELLM_CUDA_CHECK(cudaEventCreate(&e));
  TRELLM_CUDA_CHECK(cudaEventRecord(e, impl_->stream));
  impl_->events.push_back(e);
  return int(impl_->events.size()) - 1;
}

double CudaBackend::elapsed_ms(int from, int to) {
  TRELLM_CUDA_CHECK(cudaEventSynchronize(impl_->events.at(size_t(to))));
  float ms = 0;
  TRELLM_CUDA_CHECK(cudaEventElapsedTime(&ms, impl_->events.at(size_t(from)), impl_->events.at(size_t(to))));
  return ms;
}

std::pair<size_t, size_t> CudaBackend::memory_used_total() {
  size_t free_b = 0, total_b = 0;
  TRELLM_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return {total_b - free_b, total_b};
}

// 1 GiB device-to-device copies (well past the 50 MB L2), median of 10, bytes read + written.
double CudaBackend::copy_bandwidth() {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess) {
    cudaGetLastError();  // clears the error, as in alloc
    return 0;
  }
  if (cudaMalloc(&b, bytes) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(a);
    return 0;
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int i = 0; i < 12; i++) {
    cudaEventRecord(e0, impl_->stream);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, impl_->stream);
    cudaEventRecord(e1, impl_->stream);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    if (i >= 2) ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  std::sort(ms.begin(), ms.end());
  return 2.0 * double(bytes) / (double(ms[ms.size() / 2]) * 1e-3);
}

}  // namespace trellm
