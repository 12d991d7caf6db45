// Absorbed MLA attention with a trellis-coded kv_b_proj, without a decoded copy of it. With W = kv_b_proj in (in, out)
// orientation = diag(suh)·Hblk·Q·Hblk·diag(svh) (TRELLIS.md §3), head h's two absorbed products are
//   q_lat = W_UK[h]ᵀ q_nope = suh ⊙ Hblk·(Q · Hblk·(svh ⊙ q_nope))    (the transposed product over the head's nope
//                                                                        columns' 128-blocks: trellis_strips_t)
//   o     = W_UV[h] o_lat   = (Hblk·(x_h · Q) ⊙ svh)[v columns],  x_h = Hblk·(suh ⊙ o_lat)   (trellis_strips over the
//                                                                        head's v columns' 128-blocks)
// in f32, like the dense reference (no fp16 rounding: the dense absorbed form multiplies f32 weights). Each head's
// tiles are decoded once per call for all its rows: about 1.4x the tiles of kv_b_proj per step (blocks shared by two
// heads are decoded twice).
//
// Between the two, every row's softmax over its cache rows runs block by block (64 rows, read in place from the
// paged pool) for all heads at once (each block read once per row, not once per head), merged in block order;
// the chunks of a row run on several threads when there are few rows (decode) and in one thread otherwise, with the
// same arithmetic in the same order, so a row's result does not depend on the step it was in.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/trellis_gemm.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "backend/kv_block.h"
#include "quant/hadamard.h"
#include "quant/trellis_weight.h"

namespace trellm {

using namespace cpu;

namespace {

// One cache block per chunk: its rows are contiguous in the pool, read in place (no gathered copy of the sequence).
constexpr int64_t kChunkRows = kKvBlockTokens;
constexpr int64_t kHad = trellis::kHadamardDim;

// The 128-blocks [b0, b1) of the out dimension that columns [c0, c1) touch.
std::pair<int64_t, int64_t> blocks_of(int64_t c0, int64_t c1) { return {c0 / kHad, (c1 - 1) / kHad + 1}; }

// One chunk's softmax state for every head: running max, sum, and Σ p · c_kv (rank values).
struct ChunkState {
  float* m;  // [H]
  float* l;  // [H]
  float* o;  // [H, rank]
};

// 8-lane vectors (GCC vector extensions: one ymm with the project's AVX2 flags, two SSE registers without).
typedef float v8 __attribute__((vector_size(32)));
inline v8 ld8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline float hsum(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

constexpr int64_t kHeadGroup = 4;

// acc[g][j] += Σ_k q[g][k] · c_j[k], k < len, for ng <= 4 heads and 2 rows: every load of a cache row feeds 4 heads
// and every load of a query feeds 2 rows.
template <int64_t ng>
inline void dots_nx2(const float* const q[kHeadGroup], const float* c0, const float* c1, int64_t len,
                     float out[kHeadGroup][2]) {
  v8 a[kHeadGroup][2] = {};
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const v8 x0 = ld8(c0 + k), x1 = ld8(c1 + k);
    for (int64_t g = 0; g < ng; g++) {
      const v8 qv = ld8(q[g] + k);
      a[g][0] += qv * x0;
      a[g][1] += qv * x1;
    }
  }
  for (int64_t g = 0; g < ng; g++) {
    out[g][0] = hsum(a[g][0]);
    out[g][1] = hsum(a[g][1]);
    for (int64_t kk = k; kk < len; kk++) {
      out[g][0] += q[g][kk] * c0[kk];
      out[g][1] += q[g][kk] * c1[kk];
    }
  }
}

inline void dots_4x2(const float* const q[kHeadGroup], int64_t ng, const float* c0, const float* c1, int64_t len,
                     float out[kHeadGroup][2]) {
  switch (ng) {
    case 4: return dots_nx2<4>(q, c0, c1, len, out);
    case 3: return dots_nx2<3>(q, c0, c1, len, out);
    case 2: return dots_nx2<2>(q, c0, c1, len, out);
    default: return dots_nx2<1>(q, c0, c1, len, out);
  }
}

// Scores, max and sums of the chunk's cache rows c[0 .. nt) for every head of one query row, kHeadGroup heads at a
// time, as two small register-blocked products: S = Q·Cᵀ (4 heads x 2 rows per pass) and O = P·C (4 heads x 16
// columns per pass over the rows). The chunk (64 rows, 147 KB) is read from L2 once per head group.
void attend_chunk(const float* qlat, int64_t qlat_stride, const float* qrope, int64_t qrope_stride, const float* c,
                  int64_t W, int64_t nt, const MlaDims& d, ChunkState st) {
  const int64_t H = d.heads, rank = d.kv_rank;
  float s[kHeadGroup][kChunkRows];
  for (int64_t h0 = 0; h0 < H; h0 += kHeadGroup) {
    const int64_t ng = std::min(kHeadGroup, H - h0);
    const float* ql[kHeadGroup];
    const float* qr[kHeadGroup];
    for (int64_t g = 0; g < ng; g++) ql[g] = qlat + (h0 + g) * qlat_stride, qr[g] = qrope + (h0 + g) * qrope_stride;
    for (int64_t t = 0; t < nt; t += 2) {
      const float* c0 = c + t * W;
      const float* c1 = t + 1 < nt ? c0 + W : c0;  // odd tail: row t twice, the second result dropped
      float a[kHeadGroup][2], b[kHeadGroup][2];
      dots_4x2(ql, ng, c0, c1, rank, a);
      dots_4x2(qr, ng, c0 + rank, c1 + rank, d.rope_dim, b);
      for (int64_t g = 0; g < ng; g++) {
        s[g][t] = (a[g][0] + b[g][0]) * d.scale;
        if (t + 1 < nt) s[g][t + 1] = (a[g][1] + b[g][1]) * d.scale;
      }
    }
    for (int64_t g = 0; g < ng; g++) {
      const int64_t h = h0 + g;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < nt; t++) mx = std::max(mx, s[g][t]);
      float sum = 0;
      for (int64_t t = 0; t < nt; t++) sum += (s[g][t] = std::exp(s[g][t] - mx));
      st.m[h] = mx;
      st.l[h] = sum;
    }
    int64_t k = 0;
    for (; k + 16 <= rank; k += 16) {
      v8 o[kHeadGroup][2] = {};
      for (int64_t t = 0; t < nt; t++) {
        const v8 x0 = ld8(c + t * W + k), x1 = ld8(c + t * W + k + 8);
        for (int64_t g = 0; g < ng; g++) {
          o[g][0] += s[g][t] * x0;
          o[g][1] += s[g][t] * x1;
        }
      }
      for (int64_t g = 0; g < ng; g++) {
        std::memcpy(st.o + (h0 + g) * rank + k, &o[g][0], sizeof(v8));
        std::memcpy(st.o + (h0 + g) * rank + k + 8, &o[g][1], sizeof(v8));
      }
    }
    for (; k < rank; k++)
      for (int64_t g = 0; g < ng; g++) {
        float o = 0;
        for (int64_t t = 0; t < nt; t++) o += s[g][t] * c[t * W + k];
        st.o[(h0 + g) * rank + k] = o;
      }
  }
}

// acc <- acc ∘ b (b is the later chunk).
void merge_chunk(ChunkState acc, ChunkState b, int64_t H, int64_t rank) {
  for (int64_t h = 0; h < H; h++) {
    const float M = std::max(acc.m[h], b.m[h]);
    const float ea = std::exp(acc.m[h] - M), eb = std::exp(b.m[h] - M);
    float* oa = acc.o + h * rank;
    const float* ob = b.o + h * rank;
    for (int64_t j = 0; j < rank; j++) oa[j] = oa[j] * ea + ob[j] * eb;
    acc.l[h] = acc.l[h] * ea + b.l[h] * eb;
    acc.m[h] = M;
  }
}

TrellisTiles tiles_of(const trellis::TrellisWeight& w) { return {w.trellis, w.K, w.codebook, w.tiles_k(), w.tiles_n()}; }

}  // namespace

void CpuBackend::attention_absorbed_trellis(TensorView out, TensorView q, const float* cache, const int32_t* table,
                                            const Linear& kv_b, const int32_t* pos, const MlaDims& d) {
  const trellis::TrellisWeight& w = *kv_b.exl3;
  const int64_t n = q.dim(0), H = d.heads, rank = d.kv_rank, W = d.cache_width(), P = d.nope_dim + d.v_dim;
  const int64_t Kp = w.in_padded, qd = d.q_head_dim();
  TRELLM_ASSERT(w.in == rank && w.out == H * P, "kv_b_proj ", w.key, " shape");
  const TrellisIsa isa = trellis_active_isa();
  const TrellisTiles tiles = tiles_of(w);
  // Row t of the sequence: in its cache block (table), or row t of a gathered copy (table == nullptr).
  auto row = [&](int64_t t) { return cache + (table ? kv_pool_row(table, t) : t) * W; };
  float* qlat = scratch(11, size_t(n * H * Kp));  // [n, H, Kp]
  float* olat = scratch(12, size_t(n * H * Kp));  // [n, H, Kp]: o_lat, then suh ⊙ o_lat
  // ---- q_lat[i][h] = suh ⊙ Hblk · (Q · Hblk · (svh ⊙ q_nope[i][h])) ----
  parallel_for(H, 1, [&](int64_t h0, int64_t h1) {
    thread_local std::vector<float> z, u, sv, su;
    su.resize(size_t(rank));
    to_f32(su.data(), w.suh, DType::F16, rank);
    for (int64_t h = h0; h < h1; h++) {
      const int64_t c0 = h * P, c1 = c0 + d.nope_dim;
      const auto [b0, b1] = blocks_of(c0, c1);
      const int64_t width = (b1 - b0) * kHad;
      z.assign(size_t(n * width), 0.0f);
      sv.resize(size_t(d.nope_dim));
      to_f32(sv.data(), w.svh + c0, DType::F16, d.nope_dim);
      for (int64_t i = 0; i < n; i++) {
        float* zi = z.data() + i * width;
        const float* qn = q.ptr<float>() + (i * H + h) * qd;
        for (int64_t j = 0; j < d.nope_dim; j++) zi[c0 - b0 * kHad + j] = qn[j] * sv[j];
        for (int64_t b = 0; b < width; b += kHad) trellis::hadamard128(zi + b);
      }
      u.resize(size_t(n * Kp));
      trellis_strips_t(isa, tiles, z.data(), width, n, u.data(), Kp, 0, tiles.tiles_k, b0 * kHad / 16, b1 * kHad / 16);
      for (int64_t i = 0; i < n; i++) {
        float* ui = u.data() + i * Kp;
        for (int64_t b = 0; b < Kp; b += kHad) trellis::hadamard128(ui + b);
        float* ql = qlat + (i * H + h) * Kp;
        for (int64_t r = 0; r < rank; r++) ql[r] = ui[r] * su[r];
      }
    }
  });
  // ---- o_lat[i][h] = softmax over the row's cache rows, chunk by chunk ----
  const int64_t S = H * (rank + 2);  // floats of one ChunkState
  auto state_at = [&](float* base) { return ChunkState{base, base + H, base + 2 * H}; };
  auto chunks_of = [&](int64_t i) { return (int64_t(pos[i]) + 1 + kChunkRows - 1) / kChunkRows; };
  auto run_chunk = [&](int64_t i, int64_t k, ChunkState st) {
    const int64_t t0 = k * kChunkRows, t1 = std::min<int64_t>(int64_t(pos[i]) + 1, t0 + kChunkRows);
    attend_chunk(qlat + i * H * Kp, Kp, q.ptr<float>() + i * H * qd + d.nope_dim, qd, row(t0), W, t1 - t0, d, st);
  };
  auto finish_row = [&](int64_t i, ChunkState st) {
    for (int64_t h = 0; h < H; h++) {
      float* ol = olat + (i * H + h) * Kp;
      const float inv = 1.0f / st.l[h];
      for (int64_t r = 0; r < rank; r++) ol[r] = st.o[h * rank + r] * inv;
    }
  };
  const int threads = ThreadPool::global().size();
  if (n >= 2 * threads) {
    parallel_for(n, 1, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> buf;
      buf.resize(size_t(2 * S));
      const ChunkState acc = state_at(buf.data()), cur = state_at(buf.data() + S);
      for (int64_t i = b; i < e; i++) {
        run_chunk(i, 0, acc);
        for (int64_t k = 1; k < chunks_of(i); k++) {
          run_chunk(i, k, cur);
          merge_chunk(acc, cur, H, rank);
        }
        finish_row(i, acc);
      }
    });
  } else {  // few rows (decode): every (row, chunk) on its own, merged afterwards in the same order
    std::vector<int64_t> first(size_t(n + 1), 0);
    for (int64_t i = 0; i < n; i++) first[i + 1] = first[i] + chunks_of(i);
    float* states = scratch(13, size_t(first[n] * S));
    parallel_for(first[n], 1, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; it++) {
        const int64_t i = std::upper_bound(first.begin(), first.end(), it) - first.begin() - 1;
        run_chunk(i, it - first[i], state_at(states + it * S));
      }
    });
    for (int64_t i = 0; i < n; i++) {
      const ChunkState acc = state_at(states + first[i] * S);
      for (int64_t k = first[i] + 1; k < first[i + 1]; k++) merge_chunk(acc, state_at(states + k * S), H, rank);
      finish_row(i, acc);
    }
  }
  // ---- o[i][h] = (Hblk · (Hblk·(suh ⊙ o_lat) · Q) ⊙ svh)[v columns of head h] ----
  parallel_for(H, 1, [&](int64_t h0, int64_t h1) {
    thread_local std::vector<float> xh, xp, yh, sv, su;
    su.resize(size_t(rank));
    to_f32(su.data(), w.suh, DType::F16, rank);
    for (int64_t h = h0; h < h1; h++) {
      const int64_t c0 = h * P + d.nope_dim, c1 = (h + 1) * P;
      const auto [b0, b1] = blocks_of(c0, c1);
      const int64_t width = (b1 - b0) * kHad;
      xh.resize(size_t(n * Kp));
      for (int64_t i = 0; i < n; i++) {
        float* xi = xh.data() + i * Kp;
        const float* ol = olat + (i * H + h) * Kp;
        for (int64_t r = 0; r < rank; r++) xi[r] = ol[r] * su[r];
        std::fill(xi + rank, xi + Kp, 0.0f);
        for (int64_t b = 0; b < Kp; b += kHad) trellis::hadamard128(xi + b);
      }
      xp.resize(size_t(n * tiles.tiles_k * kChunk));
      permute_x(xh.data(), Kp, n, tiles.tiles_k, xp.data());
      yh.resize(size_t(n * width));
      trellis_strips(isa, tiles, xp.data(), n, yh.data(), width, b0 * kHad / 16, b1 * kHad / 16);
      sv.resize(size_t(d.v_dim));
      to_f32(sv.data(), w.svh + c0, DType::F16, d.v_dim);
      for (int64_t i = 0; i < n; i++) {
        float* yi = yh.data() + i * width;
        for (int64_t b = 0; b < width; b += kHad) trellis::hadamard128(yi + b);
        float* oh = out.ptr<float>() + (i * H + h) * d.v_dim;
        for (int64_t j = 0; j < d.v_dim; j++) oh[j] = yi[c0 - b0 * kHad + j] * sv[j];
      }
    }
  });
}

}  // namespace trellm
