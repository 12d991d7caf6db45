// MLA attention on the CPU, in both forms:
//  absorbed  score[h,t] = (q_lat[h]·c_kv[t] + q_rope[h]·k_rope[t]) · scale,  q_lat[h] = W_UK[h]ᵀ q_nope[h],
//            o[h] = W_UV[h] · Σ_t p[h,t] c_kv[t]          (reads only the 576-wide latent rows)
//  expanded  k_nope[h,t] | v[h,t] = kv_b_proj(c_kv[t]), then ordinary attention with an online softmax over
//            64-key tiles (the form transformers computes; used for long prompts).
// kv_b_proj rows are laid out per head: [nope rows of W_UK[h]; v rows of W_UV[h]], 448 = 192 + 256 for GLM.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "core/error.h"
#include "core/thread_pool.h"

namespace trellm {

using namespace cpu;

namespace {
void check_mla_shapes(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const Positions& pos,
                      const MlaDims& d) {
  TRELLM_ASSERT(q.ndim == 3 && q.dim(1) == d.heads && q.dim(2) == d.q_head_dim(), "q ", shape_str(q));
  TRELLM_ASSERT(out.rows() == q.dim(0) && out.cols() == int64_t(d.heads) * d.v_dim, "out ", shape_str(out));
  TRELLM_ASSERT(cache.cols() == d.cache_width() && (cache.dtype == DType::F32 || cache.dtype == DType::BF16),
                "cache ", shape_str(cache));
  TRELLM_ASSERT(kv_b.in == d.kv_rank && kv_b.out == int64_t(d.heads) * (d.nope_dim + d.v_dim));
  check_cache_rows(pos, q.dim(0), cache.rows());
}
}  // namespace

// Every row's position and block must lie inside its table and the pool: a bad table is a bug in the caller.
void check_cache_rows(const Positions& pos, int64_t n, int64_t pool_rows) {
  TRELLM_ASSERT(pos.pos.numel() == n && pos.seq.numel() == n && pos.tables.ndim == 2, "positions for ", n, " rows");
  const int32_t* p = pos.pos.ptr<int32_t>();
  const int32_t* sq = pos.seq.ptr<int32_t>();
  for (int64_t i = 0; i < n; i++) {
    TRELLM_ASSERT(p[i] >= 0 && p[i] < pos.bound && sq[i] >= 0 && sq[i] < pos.tables.rows() &&
                      p[i] / kKvBlockTokens < pos.max_blocks(),
                  "row ", i, ": position ", p[i], " of table ", sq[i], " outside the step's tables");
    const int64_t row = pos.pool_row(i);
    TRELLM_ASSERT(row >= 0 && row < pool_rows, "row ", i, ": pool row ", row, " outside the cache of ", pool_rows);
  }
}

// Rows [0, rows) of the sequence with block table `table`, gathered from the pool into contiguous f32 [rows, width].
void CpuBackend::gather_sequence(float* dst, TensorView cache, const int32_t* table, int64_t rows) {
  const int64_t W = cache.cols();
  const size_t esz = dtype_size(cache.dtype);
  for (int64_t t0 = 0; t0 < rows; t0 += kKvBlockTokens) {
    const int64_t nt = std::min<int64_t>(kKvBlockTokens, rows - t0);
    const char* src = static_cast<const char*>(cache.data) + kv_pool_row(table, t0) * W * esz;
    to_f32(dst + t0 * W, src, cache.dtype, nt * W);
  }
}

void CpuBackend::attention_absorbed(TensorView out, TensorView q, TensorView cache, const Linear& kv_b,
                                    const int32_t* pos, const MlaDims& d) {
  if (kv_b.exl3) return attention_absorbed_trellis(out, q, cache.ptr<float>(), nullptr, kv_b, pos, d);
  const int64_t n = q.dim(0), H = d.heads, rank = d.kv_rank, W = d.cache_width();
  const int64_t per_head = d.nope_dim + d.v_dim;
  const DType wt = kv_b.weight.dtype;
  const size_t esz = dtype_size(wt);
  const char* wp = static_cast<const char*>(kv_b.weight.data);
  const float* c = cache.ptr<float>();
  parallel_for(n * H, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> q_lat, o_lat, row, p;
    q_lat.resize(rank);
    o_lat.resize(rank);
    row.resize(rank);
    for (int64_t ih = b; ih < e; ih++) {
      const int64_t i = ih / H, h = ih % H, T = int64_t(pos[i]) + 1;
      const float* qh = q.ptr<float>() + (i * H + h) * d.q_head_dim();
      std::fill(q_lat.begin(), q_lat.end(), 0.0f);
      for (int j = 0; j < d.nope_dim; j++) {  // q_lat = W_UK[h]ᵀ q_nope
        to_f32(row.data(), wp + (h * per_head + j) * rank * esz, wt, rank);
        axpy(q_lat.data(), qh[j], row.data(), rank);
      }
      p.resize(size_t(T));
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < T; t++) {
        const float* ct = c + t * W;
        p[t] = (dot(q_lat.data(), ct, rank) + dot(qh + d.nope_dim, ct + rank, d.rope_dim)) * d.scale;
        mx = std::max(mx, p[t]);
      }
      double sum = 0;
      for (int64_t t = 0; t < T; t++) sum += (p[t] = std::exp(p[t] - mx));
      const float inv = float(1.0 / sum);
      std::fill(o_lat.begin(), o_lat.end(), 0.0f);
      for (int64_t t = 0; t < T; t++) axpy(o_lat.data(), p[t] * inv, c + t * W, rank);
      float* oh = out.ptr<float>() + (i * H + h) * d.v_dim;
      for (int j = 0; j < d.v_dim; j++) {  // o = W_UV[h] o_lat
        to_f32(row.data(), wp + (h * per_head + d.nope_dim + j) * rank * esz, wt, rank);
        oh[j] = dot(row.data(), o_lat.data(), rank);
      }
    }
  });
}

void CpuBackend::attention_mla(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const Positions& pos,
                               const MlaDims& d, MlaMode mode) {
  check_mla_shapes(out, q, cache, kv_b, pos, d);
  if (observer_) observe_latents(kv_b, cache, pos, d.kv_rank);
  // Run by run: the run's sequence, rows [0, last position] gathered contiguous in f32 (the reference math is the
  // same for f32 and bf16 caches), then the attention of the run's query rows over them.
  const int64_t n = q.dim(0), W = d.cache_width();
  const int32_t* p = pos.pos.ptr<int32_t>();
  const int32_t* sq = pos.seq.ptr<int32_t>();
  int64_t r0 = 0;
  for (size_t k = 0; r0 < n; k++) {
    const int64_t len = pos.runs.empty() ? n : pos.runs[k];
    TRELLM_ASSERT(len >= 1 && r0 + len <= n, "runs of the step do not add up to its ", n, " rows");
    int64_t rows = 0;
    for (int64_t i = r0; i < r0 + len; i++) {
      TRELLM_ASSERT(sq[i] == sq[r0], "row ", i, " is not of its run's sequence");
      rows = std::max<int64_t>(rows, p[i] + 1);
    }
    const int32_t* table = pos.tables.ptr<int32_t>() + int64_t(sq[r0]) * pos.max_blocks();
    const TensorView qr(q[r0].data, DType::F32, {len, q.dim(1), q.dim(2)});
    const TensorView orr(out[r0].data, DType::F32, {len, out.cols()});
    if (mode == MlaMode::Absorbed && kv_b.exl3 && cache.dtype == DType::F32) {  // reads the pool in place
      attention_absorbed_trellis(orr, qr, cache.ptr<float>(), table, kv_b, p + r0, d);
      r0 += len;
      continue;
    }
    float* c = scratch(5, size_t(rows * W));
    gather_sequence(c, cache, table, rows);
    const TensorView seq_cache(c, DType::F32, {rows, W});
    if (mode == MlaMode::Absorbed) attention_absorbed(orr, qr, seq_cache, kv_b, p + r0, d);
    else attention_expanded(orr, qr, seq_cache, kv_b, p + r0, d);
    r0 += len;
  }
}

// The inputs kv_b_proj is applied to for this step's tokens: their normalised latents c_kv (their cache rows).
void CpuBackend::observe_latents(const Linear& kv_b, TensorView cache, const Positions& pos, int rank) {
  const int64_t n = pos.pos.numel(), W = cache.cols();
  std::vector<float> lat(size_t(n * rank));
  for (int64_t i = 0; i < n; i++) {
    const int64_t row = pos.pool_row(i);
    to_f32(lat.data() + i * rank, static_cast<const char*>(cache.data) + row * W * dtype_size(cache.dtype), cache.dtype, rank);
  }
  observer_(kv_b, TensorView(lat.data(), DType::F32, {n, int64_t(rank)}));
}

void CpuBackend::attention_expanded(TensorView out, TensorView q, TensorView cache, const Linear& kv_b,
                                    const int32_t* pos, const MlaDims& d) {
  const int64_t n = q.dim(0), H = d.heads, rank = d.kv_rank, W = d.cache_width();
  const int64_t per_head = d.nope_dim + d.v_dim, T = int64_t(*std::max_element(pos, pos + n)) + 1;
  constexpr int64_t kTile = 64;
  float* lat = scratch(0, size_t(kTile * rank));         // [tile, rank] contiguous latent rows
  float* kv = scratch(1, size_t(kTile * H * per_head));  // [tile, H, nope + v] expanded keys/values
  float* acc = scratch(2, size_t(n * H * d.v_dim));      // running Σ p·v
  float* mx = scratch(3, size_t(n * H));                 // running max score
  float* den = scratch(4, size_t(n * H));                // running Σ p
  std::fill(acc, acc + n * H * d.v_dim, 0.0f);
  std::fill(mx, mx + n * H, -std::numeric_limits<float>::infinity());
  std::fill(den, den + n * H, 0.0f);
  const float* c = cache.ptr<float>();
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int64_t nt = std::min(kTile, T - t0);
    for (int64_t t = 0; t < nt; t++) std::memcpy(lat + t * rank, c + (t0 + t) * W, sizeof(float) * rank);
    // Unobserved: attention_mla already reported each token's latent to the observer once.
    matmul_unobserved(TensorView(kv, DType::F32, {nt, H * per_head}), TensorView(lat, DType::F32, {nt, rank}), kv_b);
    parallel_for(n * H, 1, [&](int64_t b, int64_t e) {
      for (int64_t ih = b; ih < e; ih++) {
        const int64_t i = ih / H, h = ih % H, last = std::min(nt, int64_t(pos[i]) + 1 - t0);  // causal
        const float* qh = q.ptr<float>() + (i * H + h) * d.q_head_dim();
        float* a = acc + ih * d.v_dim;
        for (int64_t t = 0; t < last; t++) {
          const float* kh = kv + (t * H + h) * per_head;
          float s = (dot(qh, kh, d.nope_dim) + dot(qh + d.nope_dim, c + (t0 + t) * W + rank, d.rope_dim)) * d.scale;
          if (s > mx[ih]) {  // rescale what was accumulated under the old maximum
            float r = std::exp(mx[ih] - s);
            for (int j = 0; j < d.v_dim; j++) a[j] *= r;
            den[ih] *= r;
            mx[ih] = s;
          }
          float pv = std::exp(s - mx[ih]);
          den[ih] += pv;
          axpy(a, pv, kh + d.nope_dim, d.v_dim);
        }
      }
    });
  }
  for (int64_t ih = 0; ih < n * H; ih++) {
    float inv = 1.0f / den[ih];
    float* o = out.ptr<float>() + ih * d.v_dim;
    for (int j = 0; j < d.v_dim; j++) o[j] = acc[ih * d.v_dim + j] * inv;
  }
}

}  // namespace trellm
