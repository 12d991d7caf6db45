#include "quant/trellis_encode.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <mutex>
#include <numeric>

#include "core/error.h"
#include "core/half.h"
#include "core/rng.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "core/trace.h"
#include "quant/block_ldl.h"
#include "quant/hadamard.h"
#include "quant/trellis_pack.h"
#include "quant/trellis_viterbi.h"
#ifdef TRELLM_HAVE_CUDA
#include "quant/block_ldl_cuda.h"
#include "quant/trellis_ldlq_cuda.h"
#endif

namespace trellm::trellis {

namespace {

// fp16 of a channel factor, kept inside the normal range: a subnormal or zero suh would blow the weight
// up when we divide by it (rows with RMS below ~6e-5 lose a little resolution instead).
uint16_t factor_to_f16(float v) {
  const float a = std::min(std::max(std::abs(v), 6.103515625e-05f), 65504.0f);
  return f32_to_f16(v < 0 ? -a : a);
}

// Mean squared error (in the unscaled domain) of the sample tiles 0, stride, 2·stride, … of every member m at each
// of its scales[m]: all members' copies at all their scales go into one encode_tiles call, so the GPU gets
// 64 members x (10 x 113 or 5 x 340) tiles at once rather than two small calls per Linear (the codes, hence the
// errors, are the same either way).
std::vector<std::vector<double>> tile_mse_at_scales(const std::vector<std::vector<float>>& tiles, int64_t stride,
                                                    const std::vector<std::vector<float>>& scales, int K, Codebook cb,
                                                    EncodeDevice dev) {
  const size_t members = tiles.size();
  std::vector<int64_t> first(members + 1, 0), count(members);
  for (size_t m = 0; m < members; m++) {
    const int64_t n_tiles = int64_t(tiles[m].size()) / kTileElems;
    count[m] = (n_tiles + stride - 1) / stride;
    first[m + 1] = first[m] + int64_t(scales[m].size()) * count[m];
  }
  std::vector<float> scaled(size_t(first[members] * kTileElems)), recon(scaled.size());
  std::vector<uint16_t> states(scaled.size());
  for (size_t m = 0; m < members; m++)
    for (size_t i = 0; i < scales[m].size(); i++)
      for (int64_t t = 0; t < count[m]; t++)
        for (int e = 0; e < kTileElems; e++)
          scaled[(first[m] + int64_t(i) * count[m] + t) * kTileElems + e] = tiles[m][t * stride * kTileElems + e] * scales[m][i];
  encode_tiles(scaled.data(), first[members], K, cb, dev, states.data(), recon.data());
  std::vector<std::vector<double>> mse(members);
  for (size_t m = 0; m < members; m++) {
    const int64_t n = count[m];
    mse[m].resize(scales[m].size());
    for (size_t i = 0; i < scales[m].size(); i++) {
      double err = 0;
      for (int64_t t = 0; t < n; t++)
        for (int e = 0; e < kTileElems; e++) {
          const double d = double(recon[(first[m] + int64_t(i) * n + t) * kTileElems + e]) / scales[m][i] -
                           tiles[m][t * stride * kTileElems + e];
          err += d * d;
        }
      mse[m][i] = err / double(n * kTileElems);
    }
  }
  return mse;
}

// The scale search's sample: a wrapped diagonal of width 3 (every tile row and column at least once: outliers tend to
// be whole channels) plus the highest- and lowest-RMS tiles, gathered in walk order.
std::vector<float> scale_search_tiles(const float* w, int64_t k, int64_t n) {
  const int64_t tiles_k = k / kTileDim, tiles_n = n / kTileDim, width = 3;
  TRELLM_ASSERT(tiles_k > 0 && tiles_n > 0);
  std::vector<std::pair<int64_t, int64_t>> picks;
  const int64_t diag_len = std::max(tiles_k, tiles_n);
  for (int64_t i = 0; i < diag_len; i++)
    for (int64_t j = 0; j < width; j++) picks.emplace_back(i % tiles_k, (i + j) % tiles_n);
  const int64_t n_all = tiles_k * tiles_n;
  const int64_t num_x = std::min(std::max<int64_t>(8, diag_len * width / 16), (n_all + 1) / 2);
  std::vector<double> ms(static_cast<size_t>(n_all), 0.0);
  parallel_for(n_all, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t tk = t / tiles_n, tn = t % tiles_n;
      double s = 0;
      for (int r = 0; r < kTileDim; r++)
        for (int c = 0; c < kTileDim; c++) {
          const double v = w[(tk * kTileDim + r) * n + tn * kTileDim + c];
          s += v * v;
        }
      ms[t] = s;
    }
  });
  std::vector<int64_t> order(static_cast<size_t>(n_all));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ms[a] > ms[b]; });
  for (int64_t i = 0; i < num_x; i++) picks.emplace_back(order[i] / tiles_n, order[i] % tiles_n);
  for (int64_t i = 0; i < num_x; i++) picks.emplace_back(order[n_all - 1 - i] / tiles_n, order[n_all - 1 - i] % tiles_n);
  std::vector<float> tiles(picks.size() * kTileElems);
  for (size_t i = 0; i < picks.size(); i++) gather_tile(w, n, picks[i].first, picks[i].second, tiles.data() + i * kTileElems);
  return tiles;
}

}  // namespace

void gather_tile(const float* a, int64_t cols, int64_t tk, int64_t tn, float* dst) {
  for (int p = 0; p < kTileElems; p++) dst[p] = a[(tk * kTileDim + walk_k(p)) * cols + tn * kTileDim + walk_n(p)];
}

void scatter_tile(const float* src, int64_t cols, int64_t tk, int64_t tn, float* a) {
  for (int p = 0; p < kTileElems; p++) a[(tk * kTileDim + walk_k(p)) * cols + tn * kTileDim + walk_n(p)] = src[p];
}

float global_scale_search(const float* w, int64_t k, int64_t n, int K, Codebook cb, EncodeDevice dev) {
  return global_scale_search_batch({&w, 1}, k, n, K, cb, dev, false)[0];
}

std::vector<float> global_scale_search_batch(std::span<const float* const> w, int64_t k, int64_t n, int K, Codebook cb,
                                             EncodeDevice dev, bool whole_coarse_grid) {
  const size_t members = w.size();
  std::vector<std::vector<float>> tiles(members);
  for (size_t m = 0; m < members; m++) tiles[m] = scale_search_tiles(w[m], k, n);
  // Coarse grid 0.1..1.9 (step 0.2) on every third tile, fine grid on all, parabolic refinement (the error curve is
  // flat near the optimum but not strictly unimodal, so no golden-section search).
  // The coarse grid is evaluated from the middle out: 0.7..1.3 first, then, while a member's best is at an edge of
  // what it has, the next point beyond that edge. Rotated rows sit at the codebook's RMS, where the best g is
  // 0.74..1.14 (gaussian_scale), and away from it the error rises steeply, so a point outside a window whose best is
  // inside it does not win: the best is the whole grid's (whole_coarse_grid evaluates all 10; the tests compare).
  // Most members need 4 points of 10: 6 x 113 of the ~2,830 tiles a GLM-4.7-Flash expert's search encodes (~24 %).
  constexpr int kCoarse = 10;
  auto coarse_scale = [](int i) { return 0.1f + 0.2f * float(i); };
  std::vector<std::array<double, kCoarse>> yc(members);
  std::vector<int> lo(members, whole_coarse_grid ? 0 : 3), hi(members, whole_coarse_grid ? kCoarse - 1 : 6);
  {
    std::vector<std::vector<float>> first(members);
    for (size_t m = 0; m < members; m++)
      for (int i = lo[m]; i <= hi[m]; i++) first[m].push_back(coarse_scale(i));
    const auto y = tile_mse_at_scales(tiles, 3, first, K, cb, dev);
    for (size_t m = 0; m < members; m++)
      for (int i = lo[m]; i <= hi[m]; i++) yc[m][size_t(i)] = y[m][size_t(i - lo[m])];
  }
  auto best_coarse = [&](size_t m) {  // the first minimum below infinity over what member m has, or -1
    int b = -1;
    double best = INFINITY;
    for (int i = lo[m]; i <= hi[m]; i++)
      if (yc[m][size_t(i)] < best) best = yc[m][size_t(i)], b = i;
    return b;
  };
  for (;;) {
    std::vector<std::vector<float>> more(members);
    std::vector<int> at(members, -1);
    bool any = false;
    for (size_t m = 0; m < members; m++) {
      const int b = best_coarse(m);  // nothing finite yet (-1): grow as from the lower edge
      if ((b == lo[m] || b < 0) && lo[m] > 0) at[m] = --lo[m];
      else if ((b == hi[m] || b < 0) && hi[m] < kCoarse - 1) at[m] = ++hi[m];
      if (at[m] >= 0) more[m].push_back(coarse_scale(at[m])), any = true;
    }
    if (!any) break;
    const auto y = tile_mse_at_scales(tiles, 3, more, K, cb, dev);
    for (size_t m = 0; m < members; m++)
      if (at[m] >= 0) yc[m][size_t(at[m])] = y[m][0];
  }
  constexpr float step = 0.075f;
  std::vector<std::vector<float>> fine(members, std::vector<float>(5));
  for (size_t m = 0; m < members; m++) {
    const float best_c = coarse_scale(std::max(best_coarse(m), 0));  // none finite: 0.1, as the whole grid's search
    for (int i = 0; i < 5; i++) fine[m][i] = std::max(best_c + step * float(i - 2), 0.01f);
  }
  const auto yf = tile_mse_at_scales(tiles, 1, fine, K, cb, dev);
  std::vector<float> g(members);
  for (size_t m = 0; m < members; m++) {
    const double* y = yf[m].data();
    const int b = int(std::min_element(y, y + 5) - y);
    double offset = 0;
    if (b > 0 && b < 4) {
      const double denom = y[b - 1] - 2.0 * y[b] + y[b + 1];
      offset = denom > 0 ? std::clamp(0.5 * (y[b - 1] - y[b + 1]) / denom, -0.5, 0.5) : 0.0;
    }
    g[m] = std::max(float(fine[m][b] + offset * step), 0.01f);
  }
  return g;
}

float gaussian_scale(int K, Codebook cb) {
  // g of the 512-tile N(0,1) benchmark (2026-11-25) / 1.2437, for K = 1..8.
  static constexpr float kMcg[8] = {1.143f, 0.999f, 0.946f, 0.876f, 0.880f, 0.830f, 0.737f, 0.764f};
  static constexpr float kMul1[8] = {0.908f, 0.802f, 0.749f, 0.713f, 0.715f, 0.692f, 0.621f, 0.639f};
  TRELLM_ASSERT(K >= kMinK && K <= kMaxK);
  return cb == Codebook::Mul1 ? kMul1[K - 1] : kMcg[K - 1];  // 3INST and MCG agree within 1 %
}

double quantize_plain(const float* w, int64_t k, int64_t n, int K, Codebook cb, uint16_t* states, float* recon,
                      EncodeDevice dev) {
  const int64_t tiles_n = n / kTileDim, n_tiles = (k / kTileDim) * tiles_n;
  // Batches of 16384 tiles (16 MiB of f32 each way), so a large Linear needs no second full-size copy.
  constexpr int64_t kBatch = 16384;
  std::vector<float> in, out;
  double err = 0;
  for (int64_t b0 = 0; b0 < n_tiles; b0 += kBatch) {
    const int64_t nb = std::min(kBatch, n_tiles - b0);
    in.resize(size_t(nb * kTileElems));
    out.resize(in.size());
    parallel_for(nb, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) gather_tile(w, n, (b0 + t) / tiles_n, (b0 + t) % tiles_n, in.data() + t * kTileElems);
    });
    err += encode_tiles(in.data(), nb, K, cb, dev, states + b0 * kTileElems, out.data());
    parallel_for(nb, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) scatter_tile(out.data() + t * kTileElems, n, (b0 + t) / tiles_n, (b0 + t) % tiles_n, recon);
    });
  }
  return err;
}

void quantize_ldlq(const float* w, const float* l, int64_t k, int64_t n, int K, Codebook cb, uint16_t* states,
                   float* recon, EncodeDevice dev) {
  quantize_ldlq_batch({&w, 1}, {&l, 1}, k, n, K, cb, {&states, 1}, {&recon, 1}, dev);
}

void quantize_ldlq_batch(std::span<const float* const> w, std::span<const float* const> l, int64_t k, int64_t n, int K,
                         Codebook cb, std::span<uint16_t* const> states, std::span<float* const> recon, EncodeDevice dev,
                         std::span<const float* const> h, std::span<double> proxy) {
  const int64_t count = int64_t(w.size());
  TRELLM_ASSERT(l.size() == w.size() && states.size() == w.size() && recon.size() == w.size());
  TRELLM_ASSERT(k % kTileDim == 0 && n % kTileDim == 0 && k > 0 && n > 0, "LDLQ of a ", k, " x ", n, " weight");
  if (count == 0) return;
  if (dev == EncodeDevice::Cuda) {
#ifdef TRELLM_HAVE_CUDA
    return quantize_ldlq_batch_cuda(w, l, k, n, K, cb, states, recon, h, proxy);
#else
    fail("quantize_ldlq_batch: the CUDA encoder is not in this build (TRELLM_HAVE_CUDA is off)");
#endif
  }
  const int64_t tiles_k = k / kTileDim, tiles_n = n / kTileDim;
  // prod[b][i] accumulates Σ_{s done} L_b[s, i]ᵀ E_s for every row i not yet quantized: k^2 n / 2 multiply-adds.
  // The update is an explicit fma in a fixed order (blocks from the last, j = 0..15 within one): the CUDA twin
  // (trellis_ldlq.cu) does the same operations in the same order, so the codes agree bit for bit.
  std::vector<std::vector<float>> prod(static_cast<size_t>(count));
  for (auto& p : prod) p.assign(size_t(k * n), 0.0f);
  std::vector<float> err(size_t(count * kTileDim * n));
  std::vector<float> in(size_t(count * tiles_n * kTileElems)), out(in.size()), rows(size_t(kTileDim * n));
  std::vector<uint16_t> st(in.size());
  for (int64_t r = tiles_k - 1; r >= 0; r--) {
    const int64_t r0 = r * kTileDim;
    // Every weight's block in one call (one kernel launch on the GPU).
    for (int64_t b = 0; b < count; b++) {
      for (int64_t i = 0; i < kTileDim * n; i++) rows[i] = w[b][r0 * n + i] + prod[b][r0 * n + i];
      for (int64_t tn = 0; tn < tiles_n; tn++) gather_tile(rows.data(), n, 0, tn, in.data() + (b * tiles_n + tn) * kTileElems);
    }
    encode_tiles(in.data(), count * tiles_n, K, cb, dev, st.data(), out.data());
    for (int64_t b = 0; b < count; b++) {
      std::copy_n(st.data() + b * tiles_n * kTileElems, tiles_n * kTileElems, states[b] + r * tiles_n * kTileElems);
      for (int64_t tn = 0; tn < tiles_n; tn++) scatter_tile(out.data() + (b * tiles_n + tn) * kTileElems, n, r, tn, recon[b]);
      for (int64_t i = 0; i < kTileDim * n; i++) err[b * kTileDim * n + i] = w[b][r0 * n + i] - recon[b][r0 * n + i];
    }
    if (r == 0) break;
    parallel_for(count * r0, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        const int64_t b = t / r0, i = t % r0;
        float* pi = prod[b].data() + i * n;
        for (int j = 0; j < kTileDim; j++) {
          const float lji = l[b][(r0 + j) * k + i];
          if (lji == 0.0f) continue;
          const float* ej = err.data() + (b * kTileDim + j) * n;
          for (int64_t c = 0; c < n; c++) pi[c] = std::fma(lji, ej[c], pi[c]);
        }
      }
    });
  }
}

TrellisWeight EncodedLinear::view(const std::string& key) const {
  TrellisWeight w;
  w.key = key;
  w.K = K;
  w.codebook = codebook;
  w.in = in, w.out = out, w.in_padded = in_padded, w.out_padded = out_padded;
  w.trellis = trellis.data();
  w.suh = suh.data();
  w.svh = svh.data();
  if (!bias.empty()) w.bias = TensorView(const_cast<uint16_t*>(bias.data()), DType::F16, {out_padded});
  return w;
}

namespace {

// One Linear up to its LDLQ: everything but the codes, the rotated weight wr, and with a usable Hessian its rotated
// form hr and block-LDL factor l (both empty for plain Viterbi).
// In three steps: rotate_linear (the output side and the input RMS, and for the scale search wr = the weight rotated
// with the unrounded su), the scale search of a whole group in one batch, scale_linear (suh, wr, H').
struct Prepared {
  EncodedLinear enc;
  std::vector<float> wr, hr, l;
  std::vector<float> w, su;  // between the steps: W·Hblk after the output scales, the input RMS factors
};

// Hblk · diag(1/factor) · pr.w, into dst
void rotate_in(const Prepared& pr, const std::vector<float>& factor, std::vector<float>& dst) {
  const int64_t kp = pr.enc.in_padded, np = pr.enc.out_padded;
  dst.resize(pr.w.size());
  parallel_for(kp, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
      for (int64_t j = 0; j < np; j++) dst[i * np + j] = pr.w[i * np + j] / factor[i];
  });
  hadamard_cols(dst.data(), kp, np);  // Hblk · ...
}

Prepared rotate_linear(const float* weight_hf, int64_t out, int64_t in, const EncodeOptions& opt) {
  Prepared pr;
  EncodedLinear& enc = pr.enc;
  std::vector<float>& w = pr.w;
  std::vector<float>& su = pr.su;
  enc.K = opt.K;
  enc.codebook = opt.codebook;
  enc.in = in, enc.out = out;
  const int64_t kp = enc.in_padded = round_up_128(in), np = enc.out_padded = round_up_128(out);

  // (in, out) orientation, zero-padded.
  w.assign(size_t(kp * np), 0.0f);
  parallel_for(out, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++)
      for (int64_t i = 0; i < in; i++) w[i * np + j] = weight_hf[j * in + i];
  });
  for (float v : w)
    if (!std::isfinite(v)) fail("quantize_linear: the weight has non-finite values");

  Rng rng(opt.seed);
  std::vector<float> su_sign(static_cast<size_t>(kp)), sv_sign(static_cast<size_t>(np));
  for (auto& s : su_sign) s = rng.next_u32() & 1 ? -1.0f : 1.0f;
  for (auto& s : sv_sign) s = rng.next_u32() & 1 ? -1.0f : 1.0f;

  // Output channels: sv = sign · (column RMS / mean column RMS); all-zero columns keep 0.1 for the division
  // and store 0.
  std::vector<double> col(static_cast<size_t>(np), 0.0);
  for (int64_t i = 0; i < kp; i++)
    for (int64_t j = 0; j < np; j++) col[j] += double(w[i * np + j]) * w[i * np + j];
  double mean_col = 0;
  for (auto& c : col) mean_col += (c = std::sqrt(c / double(kp)));
  mean_col /= double(np);
  enc.svh.resize(static_cast<size_t>(np));
  std::vector<float> sv_div(static_cast<size_t>(np));
  for (int64_t j = 0; j < np; j++) {
    const bool zero = col[j] < 1e-30;
    float scale = 1.0f;
    if (opt.out_scales && mean_col > 1e-30) scale = zero ? 0.1f : float(col[j] / mean_col);
    const uint16_t h = factor_to_f16(sv_sign[j] * scale);
    sv_div[j] = f16_to_f32(h);
    enc.svh[j] = zero ? uint16_t(0) : h;
  }
  parallel_for(kp, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
      for (int64_t j = 0; j < np; j++) w[i * np + j] /= sv_div[j];
  });
  hadamard_rows(w.data(), kp, np);  // W · Hblk

  // Input channels: su = sign · row RMS / -codebook_scale, so rows land near the codebook's RMS.
  su.resize(static_cast<size_t>(kp));
  for (int64_t i = 0; i < kp; i++) {
    double s = 0;
    for (int64_t j = 0; j < np; j++) s += double(w[i * np + j]) * w[i * np + j];
    double rms = std::sqrt(s / double(np));
    if (rms < 1e-30) rms = 0.1;
    su[i] = float(su_sign[i] * rms / -double(kCodebookScale3Inst));
  }
  enc.g_scale = opt.fixed_scale > 0 ? opt.fixed_scale : gaussian_scale(opt.K, opt.codebook);
  if (opt.scale_search) rotate_in(pr, su, pr.wr);  // the scale search's input
  return pr;
}

// With enc.g_scale chosen: suh = fp16(su / g), the rotated weight rebuilt from the rounded factors, and H'.
void scale_linear(Prepared& pr, const float* hessian, const EncodeOptions& opt) {
  EncodedLinear& enc = pr.enc;
  std::vector<float>& wr = pr.wr;
  std::vector<float>& hr = pr.hr;
  const std::vector<float>& su = pr.su;
  const int64_t kp = enc.in_padded, in = enc.in;
  enc.suh.resize(static_cast<size_t>(kp));
  std::vector<float> su_div(static_cast<size_t>(kp));
  for (int64_t i = 0; i < kp; i++) {
    enc.suh[i] = factor_to_f16(su[i] / enc.g_scale);
    su_div[i] = f16_to_f32(enc.suh[i]);
  }
  rotate_in(pr, su_div, wr);
  pr.w = {}, pr.su = {};

  // Hessian of the rotated-domain weight: H' = Hblk·diag(suh)·(H + damping)·diag(suh)·Hblk.
  if (hessian) {
    double mean_diag = 0;
    for (int64_t i = 0; i < in; i++) mean_diag += hessian[i * in + i];
    mean_diag /= double(kp);
    if (std::isfinite(mean_diag) && mean_diag >= 1e-20) {
      hr.assign(size_t(kp * kp), 0.0f);
      for (int64_t i = 0; i < kp; i++)
        for (int64_t j = 0; j < kp; j++) {
          double h = i < in && j < in ? hessian[i * in + j] : 0.0;
          if (i == j) h += opt.sigma_reg * mean_diag;
          const double si = opt.hessian_signs_only ? (su_div[i] < 0 ? -1.0 : 1.0) : su_div[i];
          const double sj = opt.hessian_signs_only ? (su_div[j] < 0 ? -1.0 : 1.0) : su_div[j];
          hr[i * kp + j] = float(h * si * sj);
        }
      hadamard_rows(hr.data(), kp, kp);
      hadamard_cols(hr.data(), kp, kp);
    }
  }
}

void factor_linear(Prepared& pr, const EncodeOptions& opt) {
  if (pr.hr.empty()) return;
  std::vector<double> hd(pr.hr.begin(), pr.hr.end());
  if (!block_ldl(hd, pr.enc.in_padded, opt.sigma_reg, opt.cholesky_retries, pr.l))
    fail("quantize_linear: the Hessian is not positive definite even after ", opt.cholesky_retries,
         " damping retries");
}

// fn(b) for every member: in parallel over the members when there are enough to occupy the pool (each member's own
// loops then run serially), else one after another with each member's loops parallel.
void for_members(size_t count, const std::function<void(size_t)>& fn) {
  if (count >= size_t(ThreadPool::current().size())) {
    parallel_for(int64_t(count), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; b++) fn(size_t(b));
    });
  } else {
    for (size_t b = 0; b < count; b++) fn(b);
  }
}

// The block LDL of every member with a Hessian: on the GPU with the Cuda device (the CPU's factors bit for bit;
// a member whose undamped Cholesky fails there is refactored on the CPU, with the damping retries), else on the CPU.
void factor_linears(std::vector<Prepared>& pr, const EncodeOptions& opt) {
  std::vector<size_t> cpu;
  if (opt.device == EncodeDevice::Cuda) {
#ifdef TRELLM_HAVE_CUDA
    std::vector<size_t> gpu;
    for (size_t b = 0; b < pr.size(); b++)
      if (!pr[b].hr.empty()) gpu.push_back(b);
    std::vector<const float*> h;
    std::vector<float*> l;
    for (size_t b : gpu) {
      pr[b].l.resize(pr[b].hr.size());
      h.push_back(pr[b].hr.data()), l.push_back(pr[b].l.data());
    }
    const std::vector<bool> ok = gpu.empty() ? std::vector<bool>{} : block_ldl_batch_cuda(h, pr[gpu[0]].enc.in_padded, l);
    for (size_t i = 0; i < gpu.size(); i++)
      if (!ok[i]) cpu.push_back(gpu[i]);
#else
    fail("quantize_linear: the CUDA encoder is not in this build (TRELLM_HAVE_CUDA is off)");
#endif
  } else {
    for (size_t b = 0; b < pr.size(); b++) cpu.push_back(b);
  }
  for_members(cpu.size(), [&](size_t i) { factor_linear(pr[cpu[i]], opt); });
}

// The codes are in: the proxy error (from the GPU when `proxy` >= 0) and the packed tensor.
void finish_linear(Prepared& pr, const uint16_t* states, const float* recon, double plain_err, double proxy) {
  EncodedLinear& enc = pr.enc;
  const std::vector<float>& wr = pr.wr;
  const std::vector<float>& hr = pr.hr;
  const int64_t kp = enc.in_padded, np = enc.out_padded;
  if (!hr.empty()) enc.used_hessian = true;
  if (!hr.empty() && proxy >= 0) {
    enc.proxy_err = proxy;
  } else if (!hr.empty()) {
    // proxy error tr(Eᵀ H' E) / tr(Wᵀ H' W): rows of H'·E and H'·W accumulated as saxpy over whole rows
    // (vectorises over the out dimension), kp^2·np multiply-adds each, parallel over row blocks.
    std::vector<double> num(static_cast<size_t>(kp), 0.0), den(static_cast<size_t>(kp), 0.0);
    std::vector<float> e(wr.size());
    for (size_t i = 0; i < e.size(); i++) e[i] = wr[i] - recon[i];
    parallel_for(kp, 4, [&](int64_t i0, int64_t i1) {
      std::vector<float> he(static_cast<size_t>(np)), hw(static_cast<size_t>(np));
      for (int64_t i = i0; i < i1; i++) {
        std::fill(he.begin(), he.end(), 0.0f);
        std::fill(hw.begin(), hw.end(), 0.0f);
        for (int64_t t = 0; t < kp; t++) {
          const float h = hr[i * kp + t];
          const float* et = e.data() + t * np;
          const float* wt = wr.data() + t * np;
          for (int64_t c = 0; c < np; c++) he[c] += h * et[c], hw[c] += h * wt[c];
        }
        double a = 0, b = 0;
        for (int64_t c = 0; c < np; c++) a += double(e[i * np + c]) * he[c], b += double(wr[i * np + c]) * hw[c];
        num[i] = a, den[i] = b;
      }
    });
    enc.proxy_err = std::accumulate(num.begin(), num.end(), 0.0) /
                    std::max(std::accumulate(den.begin(), den.end(), 0.0), 1e-30);
  } else {
    double ss = 0;
    for (float v : wr) ss += double(v) * v;
    enc.proxy_err = plain_err / std::max(ss, 1e-30);
  }

  // Pack: tile (tk, tn) of the (in/16, out/16, 16K) tensor.
  const int64_t n_tiles = (kp / kTileDim) * (np / kTileDim);
  enc.trellis.assign(size_t(n_tiles * tile_u16(enc.K)), 0);
  parallel_for(n_tiles, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
      pack_tile(states + t * kTileElems, enc.K, enc.trellis.data() + t * tile_u16(enc.K));
  });
}

}  // namespace

EncodedLinear quantize_linear(const float* weight_hf, int64_t out, int64_t in, const float* hessian,
                              const EncodeOptions& opt) {
  std::vector<EncodedLinear> v = quantize_linears({&weight_hf, 1}, out, in, {&hessian, 1}, {&opt.seed, 1}, opt);
  return std::move(v[0]);
}

struct PreparedLinears {
  int64_t out = 0, in = 0;
  EncodeOptions opt;
  std::vector<Prepared> pr;
};

namespace {
// EncodeOptions::times is added to from more than one thread (quantize_checkpoint's work ahead and its main thread).
void add_time(double EncodeTimes::*field, const EncodeOptions& opt, double seconds) {
  static std::mutex mu;
  if (!opt.times) return;
  std::lock_guard<std::mutex> lock(mu);
  opt.times->*field += seconds;
}
}  // namespace

PreparedLinearsPtr rotate_linears(std::span<const float* const> weights, int64_t out, int64_t in,
                                  std::span<const uint64_t> seeds, const EncodeOptions& opt) {
  if (opt.K < kMinK || opt.K > kMaxK) fail("quantize_linear: K = ", opt.K, " is outside 1..8");
  if (in <= 0 || out <= 0) fail("quantize_linear: invalid shape (", out, ", ", in, ")");
  TRELLM_ASSERT(seeds.size() == weights.size());
  PreparedLinearsPtr g(new PreparedLinears);
  g->out = out, g->in = in, g->opt = opt;
  const size_t count = weights.size();
  std::vector<Prepared>& pr = g->pr;
  pr.resize(count);
  Timer timer;
  for_members(count, [&](size_t b) {
    EncodeOptions o = opt;
    o.seed = seeds[b];
    pr[b] = rotate_linear(weights[b], out, in, o);
  });
  if (opt.scale_search && count > 0) {  // every member's sample tiles in two Viterbi calls
    std::vector<const float*> wr(count);
    for (size_t b = 0; b < count; b++) wr[b] = pr[b].wr.data();
    const trace::Span span(str_cat("scale search of ", count));
    const std::vector<float> scales =
        global_scale_search_batch(wr, round_up_128(in), round_up_128(out), opt.K, opt.codebook, opt.device);
    for (size_t b = 0; b < count; b++) pr[b].enc.g_scale = scales[b];
  }
  add_time(&EncodeTimes::prepare, opt, timer.seconds());
  return g;
}

void add_hessians(PreparedLinears& g, std::span<const float* const> hessians) {
  std::vector<Prepared>& pr = g.pr;
  const EncodeOptions& opt = g.opt;
  TRELLM_ASSERT(hessians.size() == pr.size());
  Timer timer;
  {
    const trace::Span span(str_cat("rotate ", pr.size(), " Hessians of ", g.in));
    for_members(pr.size(), [&](size_t b) { scale_linear(pr[b], hessians[b], opt); });
  }
  add_time(&EncodeTimes::prepare, opt, timer.seconds());
  timer.reset();
  {
    const trace::Span span(str_cat("block LDL of ", pr.size(), " x ", round_up_128(g.in)));
    factor_linears(pr, opt);
  }
  add_time(&EncodeTimes::ldl, opt, timer.seconds());
}

PreparedLinearsPtr prepare_linears(std::span<const float* const> weights, int64_t out, int64_t in,
                                   std::span<const float* const> hessians, std::span<const uint64_t> seeds,
                                   const EncodeOptions& opt) {
  TRELLM_ASSERT(hessians.size() == weights.size());
  PreparedLinearsPtr g = rotate_linears(weights, out, in, seeds, opt);
  add_hessians(*g, hessians);
  return g;
}

void PreparedLinearsDelete::operator()(PreparedLinears* p) const { delete p; }

std::vector<EncodedLinear> encode_prepared(PreparedLinears& g) {
  const EncodeOptions& opt = g.opt;
  std::vector<Prepared>& pr = g.pr;
  const size_t count = pr.size();
  Timer timer;
  const int64_t kp = round_up_128(g.in), np = round_up_128(g.out);
  std::vector<std::vector<uint16_t>> states(count);
  std::vector<std::vector<float>> recon(count);
  std::vector<double> plain_err(count, 0.0);
  // The Linears with a factor go through one batched LDLQ; the others through plain Viterbi, one by one.
  std::vector<const float*> lw, ll, lh;
  std::vector<uint16_t*> ls;
  std::vector<float*> lr;
  std::vector<size_t> lb;
  for (size_t b = 0; b < count; b++) {
    states[b].resize(size_t(kp * np));
    recon[b].resize(size_t(kp * np));
    if (!pr[b].l.empty()) {
      lw.push_back(pr[b].wr.data()), ll.push_back(pr[b].l.data()), lh.push_back(pr[b].hr.data());
      ls.push_back(states[b].data()), lr.push_back(recon[b].data()), lb.push_back(b);
    } else {
      plain_err[b] = quantize_plain(pr[b].wr.data(), kp, np, opt.K, opt.codebook, states[b].data(), recon[b].data(), opt.device);
    }
  }
  // With the GPU, the batched LDLQ also computes the proxy errors (the CPU's loop in finish_linear streams W and E
  // once per row of H': ~50 GB of reads for a 2048 x 1536 expert).
  std::vector<double> lp(lw.size(), -1.0), proxy(count, -1.0);
  {
    const trace::Span span(str_cat("LDLQ of ", lw.size(), " x ", np, " x ", kp));
    quantize_ldlq_batch(lw, ll, kp, np, opt.K, opt.codebook, ls, lr, opt.device, lh, lp);
  }
  for (size_t i = 0; i < lb.size(); i++) proxy[lb[i]] = lp[i];
  const double encode = timer.seconds();
  timer.reset();
  std::vector<EncodedLinear> enc(count);
  for_members(count, [&](size_t b) {
    finish_linear(pr[b], states[b].data(), recon[b].data(), plain_err[b], proxy[b]);
    enc[b] = std::move(pr[b].enc);
    pr[b] = Prepared{};  // free as we go
    states[b] = {}, recon[b] = {};
  });
  add_time(&EncodeTimes::encode, opt, encode);
  add_time(&EncodeTimes::finish, opt, timer.seconds());
  return enc;
}

std::vector<EncodedLinear> quantize_linears(std::span<const float* const> weights, int64_t out, int64_t in,
                                            std::span<const float* const> hessians, std::span<const uint64_t> seeds,
                                            const EncodeOptions& opt) {
  return encode_prepared(*prepare_linears(weights, out, in, hessians, seeds, opt));
}

}  // namespace trellm::trellis
