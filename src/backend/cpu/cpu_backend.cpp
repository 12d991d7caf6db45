// CPU backend: elementwise ops, norms, RoPE, dense matmul. Attention and MoE live in their own files.
#include "backend/cpu/cpu_backend.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "backend/cpu/cpu_kernels.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/thread_pool.h"

namespace trellm {

using namespace cpu;

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

void* CpuBackend::alloc(size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) fail("out of host memory allocating ", bytes, " bytes");
#if defined(__linux__)
  // Large blocks (a model's weights come in 64 MiB arena chunks) are populated by the kernel in one call
  // (MADV_POPULATE_WRITE, Linux 5.14; advice only, ignored where unsupported) instead of one page fault per 4 KiB
  // on first touch: 12 GB in ~5 s instead of ~25 s in this project's VM. (Transparent huge pages were slower to
  // populate there, 20 s, and a checkpoint's mapping has 4 KiB pages anyway.)
  constexpr size_t kPopulateFrom = size_t(2) << 20, kPage = 4096;
  if (bytes >= kPopulateFrom) {
    const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
    const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
    constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
    if (e > b) madvise(reinterpret_cast<void*>(b), e - b, kPopulateWrite);
  }
#endif
  return p;
}
void CpuBackend::release(void* p) { std::free(p); }
void CpuBackend::to_host(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::from_host(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

void CpuBackend::fill_random(TensorView t, uint64_t seed, float scale) {
  // Blocks of 64K elements, each from its own stream, on every thread; a full-size synthetic model (~12 GB of
  // trellis codes) fills in a few seconds. Integer tensors (trellis codes) get raw random bytes, 8 per draw.
  const int64_t n = t.numel();
  const size_t esz = dtype_size(t.dtype);
  parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
    Rng r(seed ^ (uint64_t(b) * 0x9E3779B97F4A7C15ull));
    switch (t.dtype) {
      case DType::F32:
        for (int64_t i = b; i < e; i++) t.ptr<float>()[i] = r.uniform(-scale, scale);
        break;
      case DType::F16:
        for (int64_t i = b; i < e; i++) t.ptr<uint16_t>()[i] = f32_to_f16(r.uniform(-scale, scale));
        break;
      case DType::BF16:
        for (int64_t i = b; i < e; i++) t.ptr<uint16_t>()[i] = f32_to_bf16(r.uniform(-scale, scale));
        break;
      default: {
        uint8_t* p = static_cast<uint8_t*>(t.data) + size_t(b) * esz;
        const size_t bytes = size_t(e - b) * esz;
        size_t i = 0;
        for (; i + 8 <= bytes; i += 8) {
          const uint64_t v = r.next_u64();
          std::memcpy(p + i, &v, 8);
        }
        for (; i < bytes; i++) p[i] = uint8_t(r.next_u32());
      }
    }
  });
}

float* CpuBackend::scratch(size_t slot, size_t floats) {
  if (scratch_.size() <= slot) scratch_.resize(slot + 1);
  if (scratch_[slot].size() < floats) scratch_[slot].resize(floats);
  return scratch_[slot].data();
}

void CpuBackend::embed(TensorView out, TensorView tokens, TensorView table) {
  TRELLM_ASSERT(tokens.dtype == DType::I32 && out.dtype == DType::F32);
  const int64_t n = tokens.numel(), d = table.dim(1);
  TRELLM_ASSERT(out.rows() == n && out.cols() == d);
  const int32_t* tok = tokens.ptr<int32_t>();
  for (int64_t i = 0; i < n; i++) {
    // Token ids are checked against the vocabulary by the engine before they reach here.
    TRELLM_ASSERT(tok[i] >= 0 && tok[i] < table.dim(0), "token id ", tok[i]);
    to_f32(out.ptr<float>() + i * d, static_cast<const char*>(table.data) + tok[i] * d * dtype_size(table.dtype),
           table.dtype, d);
  }
}

void CpuBackend::rms_norm(TensorView out, TensorView x, TensorView w, float eps) {
  const int64_t n = x.rows(), d = x.cols();
  TRELLM_ASSERT(out.rows() == n && out.cols() == d && w.numel() == d && w.dtype == DType::F32);
  const float* wp = w.ptr<float>();
  parallel_for(n, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const float* xi = x.ptr<float>() + i * d;
      float* oi = out.ptr<float>() + i * d;
      double ss = 0;
      for (int64_t j = 0; j < d; j++) ss += double(xi[j]) * xi[j];
      // transformers: x * rsqrt(mean(x²) + eps) in f32, then weight * x.
      float r = 1.0f / std::sqrt(float(ss / double(d)) + eps);
      for (int64_t j = 0; j < d; j++) oi[j] = wp[j] * (xi[j] * r);
    }
  });
}

void CpuBackend::add_rms_norm(TensorView h, TensorView y, TensorView w, float eps, TensorView out) {
  TRELLM_ASSERT(h.numel() == y.numel() && h.numel() == out.numel());
  add(h, h, y);
  rms_norm(out, h, w, eps);
}

void CpuBackend::add(TensorView out, TensorView a, TensorView b) {
  const int64_t n = out.numel();
  TRELLM_ASSERT(a.numel() == n && b.numel() == n);
  float* o = out.ptr<float>();
  const float *pa = a.ptr<float>(), *pb = b.ptr<float>();
  for (int64_t i = 0; i < n; i++) o[i] = pa[i] + pb[i];
}

void CpuBackend::silu_mul(TensorView out, TensorView gate, TensorView up) {
  const int64_t n = out.numel();
  TRELLM_ASSERT(gate.numel() == n && up.numel() == n);
  float* o = out.ptr<float>();
  const float *g = gate.ptr<float>(), *u = up.ptr<float>();
  parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
}

void CpuBackend::matmul(TensorView out, TensorView x, const Linear& w) {
  if (observer_) observer_(w, x);
  matmul_unobserved(out, x, w);
}

void CpuBackend::matmul_unobserved(TensorView out, TensorView x, const Linear& w) {
  const int64_t n = x.rows(), in = x.cols(), outd = w.out;
  TRELLM_ASSERT(in == w.in && out.numel() == n * outd, "matmul shapes: x ", shape_str(x), " W [",
                w.out, ", ", w.in, "] out ", shape_str(out));
  const float* xp = x.ptr<float>();
  float* op = out.ptr<float>();
  if (w.exl3) {
    matmul_trellis(out, x, w);
    add_bias(out, w);
    return;
  }
  const size_t esz = dtype_size(w.weight.dtype);
  const char* wp = static_cast<const char*>(w.weight.data);
  // Blocks of 16 output rows: their f32 copy (16 × in floats, 128 KB at in = 2048) stays in L2 while every
  // input row passes over it, so the weights are read from memory once per call.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (outd + kBlock - 1) / kBlock;
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> wf;
    wf.resize(size_t(kBlock * in));
    for (int64_t blk = b0; blk < b1; blk++) {
      const int64_t o0 = blk * kBlock, o1 = std::min(outd, o0 + kBlock);
      for (int64_t o = o0; o < o1; o++) to_f32(wf.data() + (o - o0) * in, wp + o * in * esz, w.weight.dtype, in);
      for (int64_t i = 0; i < n; i++) {
        const float* xi = xp + i * in;
        for (int64_t o = o0; o < o1; o++) op[i * outd + o] = dot(wf.data() + (o - o0) * in, xi, in);
      }
    }
  });
  add_bias(out, w);
}

void CpuBackend::sample_step(TensorView logits, TensorView params, TensorView token, TensorView pos,
                             TensorView history) {
  TRELLM_ASSERT(params.nbytes() == sizeof(SamplingParams));
  const SamplingParams& p = *static_cast<const SamplingParams*>(params.data);
  const int32_t best = sample_token(logits.ptr<float>(), logits.cols(), p, uint64_t(history.ptr<int32_t>()[0]));
  token.ptr<int32_t>()[0] = best;
  pos.ptr<int32_t>()[0] += 1;
  int32_t* h = history.ptr<int32_t>();
  TRELLM_ASSERT(h[0] + 1 < history.numel(), "greedy history is full");
  h[1 + h[0]++] = best;
}

void CpuBackend::sample_rows(TensorView logits, TensorView params, TensorView steps, TensorView tokens) {
  const int64_t n = logits.rows();
  TRELLM_ASSERT(params.nbytes() == size_t(n) * sizeof(SamplingParams) && steps.numel() == n && tokens.numel() == n,
                "sample_rows: ", n, " rows");
  const auto* p = static_cast<const SamplingParams*>(params.data);
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++)
      tokens.ptr<int32_t>()[i] =
          sample_token(logits.ptr<float>() + i * logits.cols(), logits.cols(), p[i], uint64_t(steps.ptr<int32_t>()[i]));
  });
}

void CpuBackend::spec_verify(const SpecVerify& v) {
  const int K = v.K;
  const int64_t m = v.sequences(), V = v.target.cols();
  const auto* p = static_cast<const SamplingParams*>(v.params.data);
  parallel_for(m, 1, [&](int64_t b, int64_t e) {
    std::vector<const float*> rows(static_cast<size_t>(K));
    std::vector<int32_t> drafts(static_cast<size_t>(K));
    for (int64_t i = b; i < e; i++) {
      for (int j = 0; j < K; j++) {
        const int64_t r = int64_t(j) * v.draft_stride + v.src.ptr<int32_t>()[i];
        TRELLM_ASSERT(r >= 0 && r < v.draft.rows(), "spec_verify: draft row ", r, " of ", v.draft.rows());
        rows[size_t(j)] = v.draft.ptr<float>() + r * V;
        drafts[size_t(j)] = v.tokens.ptr<int32_t>()[i * (K + 1) + 1 + j];
      }
      cpu::spec_verify_one(v.target.ptr<float>() + i * (K + 1) * V, rows.data(), drafts.data(), K, V, p[i],
                           uint64_t(v.steps.ptr<int32_t>()[i]), v.out.ptr<int32_t>() + i * (K + 2));
    }
  });
}

void CpuBackend::spec_prepare(const SpecPrepare& p) {
  const int K = p.K, j = p.j;
  const int64_t m = p.sequences();
  const int32_t* res = p.result.ptr<int32_t>();
  for (int64_t i = 0; i < m; i++) {
    const int32_t a = res[i * (K + 2)];
    p.steps_out.ptr<int32_t>()[i] = p.steps.ptr<int32_t>()[i] + a + 1 + j;
    if (j == 0) {
      for (int r = 0; r <= K; r++) p.tokens.ptr<int32_t>()[i * (K + 1) + r] = res[i * (K + 2) + 1 + r];
      p.logit_idx.ptr<int32_t>()[i] = int32_t(i * (K + 1) + a);
      p.base.ptr<int32_t>()[i] = p.pos.ptr<int32_t>()[i * (K + 1)] + a;
    } else {
      p.tokens.ptr<int32_t>()[i] = p.drafts.ptr<int32_t>()[i];
      p.pos.ptr<int32_t>()[i] = p.base.ptr<int32_t>()[i] + j;
      p.seq.ptr<int32_t>()[i] = int32_t(i);
    }
  }
}

void CpuBackend::gather_rows(TensorView out, TensorView x, TensorView idx) {
  TRELLM_ASSERT(out.cols() == x.cols() && idx.numel() == out.rows() && out.dtype == x.dtype, "gather_rows shapes");
  const size_t row_bytes = size_t(x.cols()) * dtype_size(x.dtype);
  for (int64_t i = 0; i < out.rows(); i++) {
    const int32_t r = idx.ptr<int32_t>()[i];
    TRELLM_ASSERT(r >= 0 && r < x.rows(), "gather_rows: row ", r, " of ", x.rows());
    std::memmove(static_cast<char*>(out.data) + size_t(i) * row_bytes, static_cast<const char*>(x.data) + size_t(r) * row_bytes,
                 row_bytes);
  }
}

void CpuBackend::add_bias(TensorView out, const Linear& w) {
  if (w.bias.empty()) return;
  TRELLM_ASSERT(w.bias.dtype == DType::F32 && w.bias.numel() == w.out);
  for (int64_t i = 0; i < out.numel() / w.out; i++) axpy(out.ptr<float>() + i * w.out, 1.0f, w.bias.ptr<float>(), w.out);
}

namespace cpu {
// Rotates adjacent pairs (x0,x1),(x2,x3),... of x[0:dim] by pos·θ^(-2i/dim). Like transformers, the angle
// pos·inv_freq is a product of two f32 values (so long positions agree with it); inv_freq is the correctly
// rounded f32 and cos/sin are taken in double, so the CUDA kernel computes bit-identical rotations.
void rope_rotate(float* x, int dim, int pos, float theta) {
  for (int i = 0; i < dim / 2; i++) {
    float inv_freq = float(1.0 / std::pow(double(theta), double(2 * i) / double(dim)));
    float ang = float(pos) * inv_freq;
    float c = float(std::cos(double(ang))), s = float(std::sin(double(ang)));
    float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = b * c + a * s;
  }
}
}  // namespace cpu

void CpuBackend::rope(TensorView x, int offset, const Positions& pos, const RopeParams& rope) {
  TRELLM_ASSERT(x.ndim == 3 && offset + rope.dim <= x.dim(2) && rope.dim % 2 == 0 && pos.pos.numel() == x.dim(0));
  const int64_t n = x.dim(0), heads = x.dim(1), hd = x.dim(2);
  const int32_t* p = pos.pos.ptr<int32_t>();
  for (int64_t i = 0; i < n; i++)
    for (int64_t h = 0; h < heads; h++) rope_rotate(x.ptr<float>() + (i * heads + h) * hd + offset, rope.dim, p[i], rope.theta);
}

void CpuBackend::mla_cache_append(TensorView cache, TensorView kv, TensorView norm_w, float eps, const Positions& pos,
                                  const RopeParams& rope) {
  const int64_t n = kv.rows(), width = kv.cols(), rank = norm_w.numel();
  TRELLM_ASSERT(cache.cols() == width && rank + rope.dim == width && (cache.dtype == DType::F32 || cache.dtype == DType::BF16),
                "cache ", shape_str(cache), " kv ", shape_str(kv));
  check_cache_rows(pos, n, cache.rows());
  const int32_t* p = pos.pos.ptr<int32_t>();
  std::vector<float> row(static_cast<size_t>(width));
  for (int64_t i = 0; i < n; i++) {
    const int64_t slot = pos.pool_row(i);
    const float* src = kv.ptr<float>() + i * width;
    TensorView s(const_cast<float*>(src), DType::F32, {1, rank}), d(row.data(), DType::F32, {1, rank});
    rms_norm(d, s, norm_w, eps);
    std::memcpy(row.data() + rank, src + rank, sizeof(float) * rope.dim);
    rope_rotate(row.data() + rank, rope.dim, p[i], rope.theta);
    if (cache.dtype == DType::F32) {
      std::memcpy(cache.ptr<float>() + slot * width, row.data(), sizeof(float) * width);
    } else {  // a bf16 cache (what the GPU keeps): the f32 row rounded once
      uint16_t* dst = cache.ptr<uint16_t>() + slot * width;
      for (int64_t j = 0; j < width; j++) dst[j] = f32_to_bf16(row[j]);
    }
  }
}

}  // namespace trellm
