// CPU reference ops: interop with exllamav3 (its own decode bit for bit, its reconstruction within fp16
// rounding, matmuls = dense products with its reconstruction) and self-consistency on random trellises
// with padding and bias against a straightforward dense reference written here.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/half.h"
#include "core/rng.h"
#include "format/safetensors.h"
#include "quant/trellis_ref.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

double ref_h(int64_t i, int64_t j) { return (std::popcount(uint64_t(i & j & 127)) % 2 ? -1.0 : 1.0) / std::sqrt(128.0); }

// Relative Frobenius error ||a - b|| / ||b||.
double rel_err(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Dense y = x·W (+ bias) in double, x (m, in), W (in, out).
std::vector<float> dense(const std::vector<float>& x, const float* W, int64_t m, int64_t in, int64_t out) {
  std::vector<float> y(m * out);
  for (int64_t r = 0; r < m; r++)
    for (int64_t j = 0; j < out; j++) {
      double s = 0;
      for (int64_t i = 0; i < in; i++) s += double(x[r * in + i]) * W[i * out + j];
      y[r * out + j] = float(s);
    }
  return y;
}

struct Oracle {
  TensorStore st = TensorStore::open(TRELLM_TEST_DATA "/exl3/exl3_oracle_w384x128.safetensors");
  nlohmann::json meta;
  Oracle() {
    std::ifstream f(TRELLM_TEST_DATA "/exl3/exl3_oracle.json");
    meta = nlohmann::json::parse(f);
  }
  TrellisWeight weight(const std::string& key) {
    return read_trellis_weight(key, TrellisReader(st).finder(), 384, 128);
  }
  TensorView view(const std::string& name) const { return st.get(name).view(); }
  double oracle_rel_err(const std::string& key) {
    for (auto& e : meta)
      if (e["name"] == key) return e["rel_err"].get<double>();
    ADD_FAILURE() << "no oracle entry " << key;
    return 0;
  }
};

Oracle& oracle() {
  static Oracle o;
  return o;
}

std::vector<std::string> fixture_keys() {
  std::vector<std::string> keys;
  for (int K : {2, 3, 4, 6})
    for (const char* cb : {"3inst", "mcg", "mul1"}) keys.push_back("w384x128_k" + std::to_string(K) + "_" + cb);
  return keys;
}

}  // namespace

TEST(TrellisInterop, InnerFp16BitForBit) {
  for (const std::string& key : fixture_keys()) {
    const TrellisWeight w = oracle().weight(key);
    std::vector<uint16_t> q(384 * 128, 0xFFFF);  // poisoned (0xFFFF is a NaN, never a codebook value)
    decode_inner_f16(w, q.data());
    const uint16_t* want = oracle().view(key + ".inner_fp16").ptr<uint16_t>();
    int mismatches = 0;
    for (size_t i = 0; i < q.size(); i++) mismatches += q[i] != want[i];
    EXPECT_EQ(mismatches, 0) << key;
  }
}

TEST(TrellisInterop, ReconstructionWithinFp16Rounding) {
  for (const std::string& key : fixture_keys()) {
    const TrellisWeight w = oracle().weight(key);
    std::vector<float> W(384 * 128, NAN);
    dequantize_in_out_f32(w, W.data());
    const float* want = oracle().view(key + ".weight_reconstructed").ptr<float>();
    double max_rel = 0, rms = 0;
    for (size_t i = 0; i < W.size(); i++) rms += double(want[i]) * want[i];
    rms = std::sqrt(rms / W.size());
    for (size_t i = 0; i < W.size(); i++) max_rel = std::max(max_rel, std::abs(double(W[i]) - want[i]) / rms);
    // The fixture's reconstruction is fp32 arithmetic on the fp16 Q, like ours: measured 3.0e-7 relative
    // (max element 2.4e-6 of the RMS), far inside fp16 rounding (2^-11 = 4.9e-4).
    EXPECT_LT(rel_err(W.data(), want, W.size()), 2e-6) << key;
    EXPECT_LT(max_rel, 2e-5) << key;
    // and the quantization error against the original matches exllamav3's own measurement
    const double e = rel_err(W.data(), oracle().view("w384x128.original").ptr<float>(), W.size());
    EXPECT_NEAR(e, oracle().oracle_rel_err(key), 0.005 * oracle().oracle_rel_err(key)) << key;
  }
}

TEST(TrellisInterop, MatmulEqualsDenseProductWithReconstruction) {
  Rng rng(42);
  const int64_t m = 5;
  std::vector<float> x(m * 384);
  for (auto& v : x) v = f16_to_f32(f32_to_f16(rng.normal()));  // fp16 activations, as exllamav3 takes them
  for (const std::string& key : fixture_keys()) {
    const TrellisWeight w = oracle().weight(key);
    std::vector<float> y(m * 128, NAN);
    trellis_matmul_ref(w, x.data(), m, y.data());
    const auto want = dense(x, oracle().view(key + ".weight_reconstructed").ptr<float>(), m, 384, 128);
    // x' and x_h are rounded to fp16 (2^-11 relative each): measured 2.1e-4 .. 3.0e-4
    EXPECT_LT(rel_err(y.data(), want.data(), y.size()), 6e-4) << key;
  }
}

// Random trellis codes with padding on both sides and a bias: matmul vs dequantize -> dense, and
// dequantize vs the definition W = diag(suh)·H·Q·H·diag(svh) evaluated term by term.
TEST(TrellisRef, RandomPaddedWithBias) {
  Rng rng(2024);
  const int64_t in = 200, out = 136, inp = 256, outp = 256;
  for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1}) {
    const int K = cb == Codebook::Inst3 ? 2 : cb == Codebook::Mcg ? 5 : 8;
    std::vector<uint16_t> trel(inp / 16 * outp / 16 * 16 * K), suh(inp), svh(outp), bias(outp);
    for (auto& v : trel) v = uint16_t(rng.next_u32());
    for (auto& v : suh) v = f32_to_f16(rng.uniform(-0.1f, 0.1f));
    for (auto& v : svh) v = f32_to_f16(rng.uniform(0.5f, 1.5f));
    for (auto& v : bias) v = f32_to_f16(rng.normal());
    TrellisWeight w;
    w.key = "test";
    w.K = K;
    w.codebook = cb;
    w.in = in, w.out = out, w.in_padded = inp, w.out_padded = outp;
    w.trellis = trel.data(), w.suh = suh.data(), w.svh = svh.data();

    // definition, in double
    std::vector<double> Q(inp * outp);
    for (int64_t tk = 0; tk < inp / 16; tk++)
      for (int64_t tn = 0; tn < outp / 16; tn++)
        for (int p = 0; p < 256; p++)
          Q[(tk * 16 + walk_k(p)) * outp + tn * 16 + walk_n(p)] =
              f16_to_f32(decode_state(cb, state_at(w.tile(tk, tn), K, p)));
    std::vector<double> HQ(inp * outp, 0.0);
    for (int64_t i = 0; i < inp; i++)
      for (int64_t a = i / 128 * 128; a < i / 128 * 128 + 128; a++)
        for (int64_t j = 0; j < outp; j++) HQ[i * outp + j] += ref_h(i, a) * Q[a * outp + j];
    std::vector<float> Wdef(in * out), W(in * out, NAN);
    for (int64_t i = 0; i < in; i++)
      for (int64_t j = 0; j < out; j++) {
        double s = 0;
        for (int64_t b = j / 128 * 128; b < j / 128 * 128 + 128; b++) s += HQ[i * outp + b] * ref_h(b, j);
        Wdef[i * out + j] = float(f16_to_f32(suh[i]) * s * f16_to_f32(svh[j]));
      }
    dequantize_in_out_f32(w, W.data());
    EXPECT_LT(rel_err(W.data(), Wdef.data(), W.size()), 1e-6) << codebook_name(cb);

    // HF orientation, bf16
    std::vector<float> Whf(out * in, NAN);
    std::vector<uint16_t> Wbf(out * in, 0xFFFF);
    dequantize_hf_f32(w, Whf.data());
    dequantize_hf_bf16(w, Wbf.data());
    for (int64_t i = 0; i < in; i++)
      for (int64_t j = 0; j < out; j++) {
        ASSERT_EQ(Whf[j * in + i], W[i * out + j]);
        ASSERT_EQ(Wbf[j * in + i], f32_to_bf16(W[i * out + j]));
      }

    // matmul vs dense product with the dequantized weight (+ bias), m = 3 rows
    w.bias = TensorView(bias.data(), DType::F16, {outp});
    const int64_t m = 3;
    std::vector<float> x(m * in), y(m * out, NAN);
    for (auto& v : x) v = rng.normal();
    trellis_matmul_ref(w, x.data(), m, y.data());
    auto want = dense(x, Wdef.data(), m, in, out);
    for (int64_t r = 0; r < m; r++)
      for (int64_t j = 0; j < out; j++) want[r * out + j] += f16_to_f32(bias[j]);
    EXPECT_LT(rel_err(y.data(), want.data(), y.size()), 6e-4) << codebook_name(cb);
  }
}
