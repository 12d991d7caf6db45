// The EXL3 encoder for one Linear (TRELLIS.md §4): incoherence processing (random signs, output and input
// channel scales, 128-block Hadamards on both sides), the global scale search, then LDLQ with a Hessian
// when calibration statistics are given, or plain per-tile Viterbi otherwise. Output: the EXL3 tensors.
// Read from exllamav3 (not copied): exllamav3/modules/quant/exl3_lib/quantize.py (regularize,
// g_scale_search_batch, sample_scale_tiles, ldlq, fallback_quant, quantize_exl3).
//
// Deliberate differences from exllamav3 (all format-compatible):
//  - Viterbi costs are fp32, not fp16.
//  - suh/svh are rounded to fp16 *before* the weight is divided by them, so the stored factors are exactly
//    the ones the trellis was fitted to.
//  - The LDLQ metric includes the input channel scales: H' = Hblk·diag(su)·H·diag(su)·Hblk, which is the
//    Hessian of the rotated-domain weight (exllamav3 uses the signs only, §4.4 note).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "quant/trellis_viterbi.h"
#include "quant/trellis_weight.h"

namespace trellm::trellis {

// Wall seconds of quantize_linears' phases, added to when EncodeOptions::times is set (benchmarks).
struct EncodeTimes {
  double prepare = 0;  // signs, channel scales, Hadamards, scale search, the rotated Hessian
  double ldl = 0;      // block LDL (Cholesky) of the rotated Hessians (part of preparing, timed apart)
  double encode = 0;   // LDLQ (batched) and plain Viterbi
  double finish = 0;   // proxy error and packing
};

struct EncodeOptions {
  int K = 4;                          // bits per weight, 1..8
  Codebook codebook = Codebook::Mcg;
  uint64_t seed = 0;                  // random sign flips (exllamav3 seeds per module)
  bool out_scales = true;             // output channel RMS scales ("always", exllamav3's default)
  bool scale_search = true;           // global scale search; else `fixed_scale`
  float fixed_scale = 1.0f;           // <= 0: gaussian_scale(K, codebook)
  float sigma_reg = 0.025f;           // Hessian damping, times mean(diag H)
  int cholesky_retries = 10;
  // exllamav3's LDLQ metric: H' built with the signs of su only (false: with the full su, our default).
  bool hessian_signs_only = false;
  // Where the Viterbi runs (scale search, plain and LDLQ encoding). The codes are the same on both.
  EncodeDevice device = EncodeDevice::Cpu;
  EncodeTimes* times = nullptr;       // quantize_linears adds its phases' wall time here
};

// The EXL3 tensors of one Linear, owned.
struct EncodedLinear {
  int K = 0;
  Codebook codebook = Codebook::Mcg;
  int64_t in = 0, out = 0, in_padded = 0, out_padded = 0;
  std::vector<uint16_t> trellis;      // (in_padded/16, out_padded/16, 16K) int16 bit patterns
  std::vector<uint16_t> suh, svh;     // fp16 bits, (in_padded,) and (out_padded,)
  std::vector<uint16_t> bias;         // optional fp16 (out_padded,), see padded_bias_f16 (exl3_export.h)
  float g_scale = 1.0f;               // the global scale the search chose
  bool used_hessian = false;          // LDLQ (true) or plain per-tile Viterbi (false)
  double proxy_err = 0;               // tr(E H' Eᵀ)/tr(W H' Wᵀ) with LDLQ; relative MSE in the rotated domain otherwise

  // A descriptor over these tensors (valid while *this lives and is not moved).
  TrellisWeight view(const std::string& key = "") const;
};

// Quantizes one Linear. weight_hf: (out, in) row-major f32 (HF orientation, real dims). hessian: (in, in)
// row-major f32, H = XᵀX / rows of calibration inputs, or nullptr for plain Viterbi. Multi-threaded.
EncodedLinear quantize_linear(const float* weight_hf, int64_t out, int64_t in, const float* hessian,
                              const EncodeOptions& opt);

// A group of Linears of one shape (out, in), each quantized exactly as quantize_linear would (the same files bit for
// bit), with their LDLQ batched (quantize_ldlq_batch): on the GPU, a layer's routed experts in one group keep the
// Viterbi busy where one Linear at a time leaves most SMs idle. weights[b] as weight_hf, hessians[b] as hessian
// (nullptr: plain Viterbi for that one), seeds[b] in place of opt.seed. Holds every member's rotated weight, Hessian
// and factor at once (for in = 2048, out = 1536: ~46 MB each).
std::vector<EncodedLinear> quantize_linears(std::span<const float* const> weights, int64_t out, int64_t in,
                                            std::span<const float* const> hessians, std::span<const uint64_t> seeds,
                                            const EncodeOptions& opt);

// quantize_linears in two halves, for a caller that overlaps the CPU half of one group with the GPU half of the one
// before (quantize_checkpoint on the GPU): prepare_linears does the signs, scales, Hadamards, scale search and block
// LDL (CPU; the inputs may be freed after it), encode_prepared the LDLQ / plain Viterbi (the GPU with device Cuda),
// the proxy errors and packing. The same results as quantize_linears.
struct PreparedLinears;
struct PreparedLinearsDelete {
  void operator()(PreparedLinears* p) const;
};
using PreparedLinearsPtr = std::unique_ptr<PreparedLinears, PreparedLinearsDelete>;
PreparedLinearsPtr prepare_linears(std::span<const float* const> weights, int64_t out, int64_t in,
                                   std::span<const float* const> hessians, std::span<const uint64_t> seeds,
                                   const EncodeOptions& opt);
// prepare_linears in two steps, for a caller that works ahead of its Hessians: rotate_linears does what depends on the
// weights alone (signs, scales, Hadamards, the scale search: the weights may be freed after it), add_hessians the rest
// (suh, the rotated weight, H' and the block LDL) once the Hessians are known (hessians[b] as in prepare_linears).
PreparedLinearsPtr rotate_linears(std::span<const float* const> weights, int64_t out, int64_t in,
                                  std::span<const uint64_t> seeds, const EncodeOptions& opt);
void add_hessians(PreparedLinears& group, std::span<const float* const> hessians);
std::vector<EncodedLinear> encode_prepared(PreparedLinears& group);

// --- building blocks (exposed for tests and the CUDA twin) ---

// Tile (tk, tn) of a row-major (rows x cols) matrix, in walk order: dst[p] = a[16tk + walk_k(p)][16tn + walk_n(p)].
void gather_tile(const float* a, int64_t cols, int64_t tk, int64_t tn, float* dst);
void scatter_tile(const float* src, int64_t cols, int64_t tk, int64_t tn, float* a);

// Global scale search on a rotated-domain weight (k x n, multiples of 16): samples tiles along a wrapped
// diagonal of width 3 plus the highest- and lowest-RMS tiles; coarse grid 0.1..1.9 (step 0.2) on every third
// sample tile, fine grid of 5 points 0.075 apart around the best on all of them, parabolic refinement.
// Returns g such that the encoder quantizes g·W. Each grid is one batch of Viterbi calls (all its scales at once);
// the coarse grid starts with 0.7..1.3 and grows while the best is at an edge (whole_coarse_grid: all 10 points, the
// same g where the error curve has one basin on the grid).
float global_scale_search(const float* w, int64_t k, int64_t n, int K, Codebook cb,
                          EncodeDevice dev = EncodeDevice::Cpu);
// The same for several weights of one shape, each its own search, in a few Viterbi calls for all (a group of 64
// experts: ~29 K, rarely a few more small ones, and ~109 K tiles, where one Linear's calls of ~1 K tiles leave a GPU
// mostly idle). Same results.
std::vector<float> global_scale_search_batch(std::span<const float* const> w, int64_t k, int64_t n, int K, Codebook cb,
                                             EncodeDevice dev = EncodeDevice::Cpu, bool whole_coarse_grid = false);

// The global scale the search finds for i.i.d. Gaussian weights after the encoder's row normalisation (rows at
// the 3INST codebook RMS, 1.2437): bench/results/trellis_encoder.md's g divided by 1.2437. A cheap stand-in for
// the search (which encodes ~340 sample tiles per Linear, more than small Linears hold).
float gaussian_scale(int K, Codebook cb);

// Plain per-tile Viterbi of a rotated-domain weight (k x n): states (tiles_k x tiles_n x 256) and the
// reconstruction (k x n). Returns the squared error sum.
double quantize_plain(const float* w, int64_t k, int64_t n, int K, Codebook cb, uint16_t* states, float* recon,
                      EncodeDevice dev = EncodeDevice::Cpu);

// LDLQ of a rotated-domain weight (k x n) with the block-LDL factor L (k x k, unit diagonal blocks zeroed):
// blocks of 16 rows from the last to the first, each quantized from W_r + Σ_{s>r} L[s,r]ᵀ(W_s − Ŵ_s): one Viterbi
// call of n/16 tiles per block (the blocks depend on each other, so k/16 calls one after another).
void quantize_ldlq(const float* w, const float* l, int64_t k, int64_t n, int K, Codebook cb, uint16_t* states,
                   float* recon, EncodeDevice dev = EncodeDevice::Cpu);

// LDLQ of count = w.size() rotated-domain weights of one shape (k x n) and K at once, each with its own factor l[b]:
// bit for bit what quantize_ldlq gives for each, but each 16-row block step is one Viterbi call over all of them.
// The 64 routed experts of a GLM-4.7-Flash layer give 64 x 96 = 6144 tiles a step where one expert gives 96, which
// leaves most of a 132-SM GPU idle (the fast kernel runs one tile per SM at a time, ~1.2 ms each). On the GPU
// (trellis_ldlq_cuda.h) the weights, factors, running products and codes stay on the device for all k/16 steps.
// With dev Cuda and h (the rotated Hessians H') it also writes proxy[b] = tr(EᵀH'E)/tr(WᵀH'W) (trellis_ldlq_cuda.h);
// on the CPU proxy is left as it is (quantize_linears computes it there while packing).
void quantize_ldlq_batch(std::span<const float* const> w, std::span<const float* const> l, int64_t k, int64_t n, int K,
                         Codebook cb, std::span<uint16_t* const> states, std::span<float* const> recon,
                         EncodeDevice dev = EncodeDevice::Cpu, std::span<const float* const> h = {},
                         std::span<double> proxy = {});

}  // namespace trellm::trellis
