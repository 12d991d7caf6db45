// CPU reference ops on a TrellisWeight: decode, dequantize, and y = x·W in exllamav3's order of operations
// (TRELLIS.md §3). Scalar, multi-threaded, meant as the oracle for the CPU/CUDA backend kernels, not as the
// fast path. Orientation is spelled out in every name: "in_out" = (in, out) like the checkpoint, "hf" =
// (out, in) like a Hugging Face Linear.weight.
#pragma once
#include <cstdint>
#include <vector>

#include "quant/trellis_weight.h"

namespace trellm::trellis {

// The rotated-domain weight Q as fp16 bits, (in_padded, out_padded) row-major: exllamav3's `reconstruct`.
void decode_inner_f16(const TrellisWeight& w, uint16_t* q);

// The original-basis weight W = diag(suh)·Hblk·Q·Hblk·diag(svh), computed in fp32 and trimmed to the real
// dims. (in, out) orientation: w_in_out[i * out + j].
void dequantize_in_out_f32(const TrellisWeight& w, float* w_in_out);
// HF orientation (out, in): w_hf[j * in + i] = W[i][j]; f32 or bf16 (round to nearest even).
void dequantize_hf_f32(const TrellisWeight& w, float* w_hf);
void dequantize_hf_bf16(const TrellisWeight& w, uint16_t* w_hf);

// y = x·W + b for m rows: x (m, in) f32, y (m, out) f32, both with the real (unpadded) dims. Steps:
//   1. x' = fp16(x ⊙ suh)            one rounding of the fp32 product (= exllamav3's fp16 multiply when x is fp16)
//   2. x_h = fp16(FWHT(x') / √128)    per 128-run, fp32 sums, one rounding
//   3. y_h = x_h · Q                  fp32 accumulation over k in increasing order
//   4. y = (y_h · Hblk) ⊙ svh         fp32
//   5. y += bias                      (the padded tail of x is zero; the padded tail of y is dropped)
void trellis_matmul_ref(const TrellisWeight& w, const float* x, int64_t m, float* y);

// The product's pieces, for backends that keep Q decoded: x (m, in) -> x_h (m, in_padded), steps 1-2 above;
// y_h (m, out_padded, overwritten) -> y (m, out), steps 4-5. Q in f32 (in_padded, out_padded), row-major.
void trellis_input_transform(const TrellisWeight& w, const float* x, int64_t m, float* xh);
void trellis_output_transform(const TrellisWeight& w, float* yh, int64_t m, float* y);
std::vector<float> decode_inner_f32(const TrellisWeight& w);

}  // namespace trellm::trellis
