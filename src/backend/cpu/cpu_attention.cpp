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
  TRELLM_ASSERT(pos.pos.numel() == q.dim(0));
  for (int64_t i = 0; i < q.dim(0); i++)
    TRELLM_ASSERT(pos.pos.ptr<int32_t>()[i] >= 0 && pos.pos.ptr<int32_t>()[i] < cache.rows(), "position outside the cache");
}
}  // namespace

void CpuBackend::attention_absorbed(TensorView out, TensorView q, TensorView cache, const Linear& kv_b_in,
                                    const int32_t* pos, const MlaDims& d) {
  const Linear& kv_b = dense_view(kv_b_in);
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
  if (cache.dtype == DType::BF16) {  // the rows in use, as f32 (the reference math is the same for both)
    const int64_t rows = *std::max_element(pos.pos.ptr<int32_t>(), pos.pos.ptr<int32_t>() + q.dim(0)) + 1;
    float* f = scratch(5, size_t(rows * d.cache_width()));
    to_f32(f, cache.data, DType::BF16, rows * d.cache_width());
    cache = TensorView(f, DType::F32, {rows, d.cache_width()});
  }
  if (mode == MlaMode::Absorbed) return attention_absorbed(out, q, cache, kv_b, pos.pos.ptr<int32_t>(), d);
  attention_expanded(out, q, cache, kv_b, pos.pos.ptr<int32_t>(), d);
}

// The inputs kv_b_proj is applied to for this step's tokens: their normalised latents c_kv (cache rows pos[i]).
void CpuBackend::observe_latents(const Linear& kv_b, TensorView cache, const Positions& pos, int rank) {
  const int64_t n = pos.pos.numel(), W = cache.cols();
  std::vector<float> lat(size_t(n * rank));
  for (int64_t i = 0; i < n; i++) {
    const int64_t row = pos.pos.ptr<int32_t>()[i];
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
