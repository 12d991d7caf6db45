#include "quant/trellis_ref.h"

#include <vector>

#include "core/error.h"
#include "core/half.h"
#include "core/thread_pool.h"
#include "quant/hadamard.h"

namespace trellm::trellis {

namespace {

float bias_at(const TensorView& b, int64_t j) {
  switch (b.dtype) {
    case DType::F16: return f16_to_f32(b.ptr<uint16_t>()[j]);
    case DType::BF16: return bf16_to_f32(b.ptr<uint16_t>()[j]);
    case DType::F32: return b.ptr<float>()[j];
    default: TRELLM_ASSERT(false, "bias dtype");
  }
  return 0;
}

}  // namespace

// Decoded Q in f32, (in_padded, out_padded).
std::vector<float> decode_inner_f32(const TrellisWeight& w) {
  const int64_t N = w.out_padded;
  std::vector<float> q(size_t(w.in_padded * N));
  parallel_for(w.tiles_k() * w.tiles_n(), 8, [&](int64_t t0, int64_t t1) {
    uint16_t tile[kTileElems];
    for (int64_t t = t0; t < t1; t++) {
      const int64_t tk = t / w.tiles_n(), tn = t % w.tiles_n();
      decode_tile(w.tile(tk, tn), w.K, w.codebook, tile);
      for (int k = 0; k < kTileDim; k++)
        for (int n = 0; n < kTileDim; n++) q[(tk * kTileDim + k) * N + tn * kTileDim + n] = f16_to_f32(tile[k * kTileDim + n]);
    }
  });
  return q;
}

namespace {

// Padded original-basis W in f32, (in_padded, out_padded).
std::vector<float> dequantize_padded(const TrellisWeight& w) {
  std::vector<float> a = decode_inner_f32(w);
  hadamard_cols(a.data(), w.in_padded, w.out_padded);  // Hblk · Q
  hadamard_rows(a.data(), w.in_padded, w.out_padded);  // · Hblk
  parallel_for(w.in_padded, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; i++) {
      const float su = f16_to_f32(w.suh[i]);
      float* row = a.data() + i * w.out_padded;
      for (int64_t j = 0; j < w.out_padded; j++) row[j] = row[j] * su * f16_to_f32(w.svh[j]);
    }
  });
  return a;
}

}  // namespace

void decode_inner_f16(const TrellisWeight& w, uint16_t* q) {
  const int64_t N = w.out_padded;
  parallel_for(w.tiles_k() * w.tiles_n(), 8, [&](int64_t t0, int64_t t1) {
    uint16_t tile[kTileElems];
    for (int64_t t = t0; t < t1; t++) {
      const int64_t tk = t / w.tiles_n(), tn = t % w.tiles_n();
      decode_tile(w.tile(tk, tn), w.K, w.codebook, tile);
      for (int k = 0; k < kTileDim; k++)
        for (int n = 0; n < kTileDim; n++) q[(tk * kTileDim + k) * N + tn * kTileDim + n] = tile[k * kTileDim + n];
    }
  });
}

void dequantize_in_out_f32(const TrellisWeight& w, float* out) {
  const std::vector<float> a = dequantize_padded(w);
  for (int64_t i = 0; i < w.in; i++)
    for (int64_t j = 0; j < w.out; j++) out[i * w.out + j] = a[i * w.out_padded + j];
}

void dequantize_hf_f32(const TrellisWeight& w, float* out) {
  const std::vector<float> a = dequantize_padded(w);
  for (int64_t j = 0; j < w.out; j++)
    for (int64_t i = 0; i < w.in; i++) out[j * w.in + i] = a[i * w.out_padded + j];
}

void dequantize_hf_bf16(const TrellisWeight& w, uint16_t* out) {
  const std::vector<float> a = dequantize_padded(w);
  for (int64_t j = 0; j < w.out; j++)
    for (int64_t i = 0; i < w.in; i++) out[j * w.in + i] = f32_to_bf16(a[i * w.out_padded + j]);
}

void trellis_input_transform(const TrellisWeight& w, const float* x, int64_t m, float* xh) {
  const int64_t Kp = w.in_padded;
  // 1-2: input scale and Hadamard, rounded to fp16 twice as exllamav3 does (kept as exact f32 values).
  parallel_for(m, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* row = xh + r * Kp;
      for (int64_t i = 0; i < w.in; i++) row[i] = f16_to_f32(f32_to_f16(x[r * w.in + i] * f16_to_f32(w.suh[i])));
      for (int64_t i = w.in; i < Kp; i++) row[i] = 0.0f;
      for (int64_t c = 0; c < Kp; c += kHadamardDim) {
        fwht128(row + c);
        for (int i = 0; i < kHadamardDim; i++) row[c + i] = f16_to_f32(f32_to_f16(row[c + i] * kHadamardScale));
      }
    }
  });
}

void trellis_output_transform(const TrellisWeight& w, float* yh, int64_t m, float* y) {
  const int64_t Np = w.out_padded;
  // 4-5: output Hadamard, svh, bias; trim.
  parallel_for(m, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* row = yh + r * Np;
      for (int64_t c = 0; c < Np; c += kHadamardDim) hadamard128(row + c);
      for (int64_t j = 0; j < w.out; j++) {
        float v = row[j] * f16_to_f32(w.svh[j]);
        if (w.has_bias()) v += bias_at(w.bias, j);
        y[r * w.out + j] = v;
      }
    }
  });
}

void trellis_matmul_ref(const TrellisWeight& w, const float* x, int64_t m, float* y) {
  const int64_t Kp = w.in_padded, Np = w.out_padded;
  std::vector<float> xh(size_t(m * Kp), 0.0f);
  trellis_input_transform(w, x, m, xh.data());
  // 3: y_h = x_h · Q, one task per 16-wide column strip: decode its tiles once, accumulate every row.
  std::vector<float> yh(size_t(m * Np), 0.0f);
  parallel_for(w.tiles_n(), 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> strip(size_t(Kp * kTileDim));
    uint16_t tile[kTileElems];
    for (int64_t tn = n0; tn < n1; tn++) {
      for (int64_t tk = 0; tk < w.tiles_k(); tk++) {
        decode_tile(w.tile(tk, tn), w.K, w.codebook, tile);
        for (int e = 0; e < kTileElems; e++) strip[tk * kTileElems + e] = f16_to_f32(tile[e]);  // row k = tk*16 + e/16
      }
      for (int64_t r = 0; r < m; r++) {
        float acc[kTileDim] = {};
        const float* xr = xh.data() + r * Kp;
        for (int64_t k = 0; k < Kp; k++) {
          const float xv = xr[k];
          const float* qk = strip.data() + k * kTileDim;
          for (int n = 0; n < kTileDim; n++) acc[n] += xv * qk[n];
        }
        for (int n = 0; n < kTileDim; n++) yh[r * Np + tn * kTileDim + n] = acc[n];
      }
    }
  });
  trellis_output_transform(w, yh.data(), m, y);
}

}  // namespace trellm::trellis
