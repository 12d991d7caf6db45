// The EXL3 trellis format, declared once for host and device (ggml-common style), and THE decode
// definition: state extraction for K = 1..8, the three codebooks (3INST, MCG, MUL1) and the
// tensor-core walk order inside a 16x16 tile. Every CPU op, the encoder and every CUDA kernel use these
// functions; nothing else in trellm may re-derive a state or a codebook value.
//
// Spec: ../shared/TRELLIS.md §1.2 (walk order), §1.3 (bitstream), §2.1 (states), §2.2 (codebooks).
// Behaviour read from exllamav3 (not copied): ext/quant/exl3_dq.cuh (dq, dq_dispatch),
// ext/quant/codebook.cuh, ext/quant/pack.cu (pack/unpack_trellis_kernel), ext/quant/reconstruct.cu.
//
// Vocabulary:
//   tile      16 input rows (k) x 16 output columns (n) of the rotated-domain weight Q, stored as one
//             circular bitstream of 256*K bits = 16K uint16 = 8K uint32 words.
//   position  p = 0..255, the order in which the trellis walks the tile (tensor-core fragment order).
//   state     the 16-bit window of the circular stream ending at bit (p+1)*K; the codebook maps it to an
//             fp16 weight. Consecutive states overlap in 16-K bits (shift register of length L = 16).
#pragma once
#include <cstdint>

#include "core/half.h"
#include "core/hd.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace trellm::trellis {

// ---------------------------------------------------------------------------------------------------------
// Format constants (declared once; the static_asserts are the contract with the checkpoint layout).

constexpr int kTileDim = 16;                       // a tile is 16 x 16 weights
constexpr int kTileElems = kTileDim * kTileDim;    // 256 trellis positions per tile
constexpr int kStateBits = 16;                     // L: the shift register / state width
constexpr int kMinK = 1, kMaxK = 8;                // bits per weight
constexpr int kHadamardDim = 128;                  // incoherence transform block (both sides)
constexpr int kPadTo = 128;                        // in/out are zero-padded to a multiple of this

// Fixed codebook multipliers; a checkpoint's .mcg / .mul1 scalar must equal them (TRELLIS.md §1.1).
constexpr uint32_t kInst3Mul = 89226354u;          // 3INST: x*a + b  (QTIP's 3INST constants)
constexpr uint32_t kInst3Add = 64248484u;
constexpr uint32_t kMcgMul = 0xCBAC1FEDu;
constexpr uint32_t kMul1Mul = 0x83DCD12Du;
constexpr uint32_t kFpMaskAnd = 0x8FFF8FFFu;       // keep sign, low 2 exponent bits and mantissa per half
constexpr uint32_t kFpMaskXor = 0x3B603B60u;       // QTIP fpmask 996162400: exponent field -> 12..15
constexpr uint16_t kMul1Scale = 0x1EEE;            // fp16 0.0067672729... ~ 1/147.77
constexpr uint16_t kMul1Bias = 0xC931;             // fp16 -10.3828125
// RMS of the 3INST codebook over all 65536 states; exllamav3's `codebook_scale` (folded into suh).
constexpr float kCodebookScale3Inst = 1.24371088f;

enum class Codebook : uint8_t { Inst3 = 0, Mcg = 1, Mul1 = 2 };

constexpr const char* codebook_name(Codebook cb) {
  return cb == Codebook::Inst3 ? "3inst" : cb == Codebook::Mcg ? "mcg" : "mul1";
}

// Per-K tile sizes. A tile is 256*K bits.
TRELLM_HD constexpr int tile_u16(int K) { return kTileElems * K / 16; }  // 16K uint16 in .trellis
TRELLM_HD constexpr int tile_u32(int K) { return kTileElems * K / 32; }  // 8K uint32 words
TRELLM_HD constexpr int tile_bytes(int K) { return kTileElems * K / 8; }  // 32K bytes

static_assert(kTileElems == 256 && kStateBits == 16);
static_assert(tile_u16(1) == 16 && tile_u16(4) == 64 && tile_u16(8) == 128);
static_assert(tile_u32(1) == 8 && tile_u32(8) == 64);
static_assert(tile_bytes(2) == 64, "2 bits x 256 weights = 64 bytes");
static_assert(kHadamardDim % kTileDim == 0 && kPadTo % kHadamardDim == 0);
static_assert((kFpMaskAnd & 0x70007000u) == 0 && (kFpMaskXor & 0x30003000u) == 0x30003000u,
              "mask/xor force exponent bits 14..12 to 011: |half| in [2^-3, 2^1), never denormal/Inf/NaN");

// ---------------------------------------------------------------------------------------------------------
// Walk order (§1.2): position p = 8t + j, t = lane 0..31, j = 0..7, is the mma.m16n8k16 B fragment:
//   r0 = 2(t mod 4), c0 = t/4; j&3 -> row r0 + {0, 1, 8, 9}; j>>2 -> column c0 + {0, 8}.
// Rows k are input features, columns n output features of the (in, out) tile.

TRELLM_HD constexpr int walk_k(int p) {
  const int t = p >> 3, j = p & 7;
  return 2 * (t & 3) + (j & 1) + ((j & 2) << 2);  // (j&2)<<2 = 8 when j&3 >= 2
}
TRELLM_HD constexpr int walk_n(int p) {
  const int t = p >> 3, j = p & 7;
  return (t >> 2) + ((j & 4) << 1);  // (j&4)<<1 = 8 for j >= 4
}
// Inverse: the position of tile element (k, n).
TRELLM_HD constexpr int walk_pos(int k, int n) {
  const int t = 4 * (n & 7) + ((k & 6) >> 1);
  const int j = (k & 1) | ((k >> 3) << 1) | ((n >> 3) << 2);
  return 8 * t + j;
}

static_assert(walk_k(0) == 0 && walk_n(0) == 0 && walk_k(1) == 1 && walk_k(2) == 8 && walk_k(3) == 9);
static_assert(walk_n(4) == 8 && walk_k(8) == 2 && walk_n(32) == 1 && walk_k(255) == 15 && walk_n(255) == 15);
static_assert(walk_pos(15, 15) == 255 && walk_pos(9, 15) == 231 && walk_pos(2, 0) == 8);

// ---------------------------------------------------------------------------------------------------------
// Bitstream (§1.3). Stream bit b is bit 31 - (b mod 32) of word b/32 (MSB first). In the .trellis int16
// view, element 2m holds the word's low half and 2m+1 its high half, so word m is simply the
// little-endian uint32 at uint16 offset 2m. Built from two uint16 loads: no alignment or aliasing
// assumptions and independent of host endianness. (A kernel may load the uint32 directly.)

TRELLM_HD uint32_t tile_word(const uint16_t* tile, int m) {
  return uint32_t(tile[2 * m]) | (uint32_t(tile[2 * m + 1]) << 16);
}

// State at position p: the window [b_end-16, b_end) of the circular stream, b_end = (p+1)K (+256K so the wrap of
// state 0 stays non-negative). Words i0 <= i1 (indices mod 8K) hold the window; in the 64-bit concatenation
// W[i0]:W[i1] stream bit b sits at bit 32(i1+1)-1-b, so the window is (W[i0]:W[i1]) >> shift.
// constexpr: SIMD decoders derive their lane tables from this same definition at compile time.
struct StateWindow {
  int i0, i1, shift;
};
TRELLM_HD constexpr StateWindow state_window(int K, int p) {
  const int n_words = 8 * K;
  const int b_end = (p + 1) * K + kTileElems * K;
  const int i1 = (b_end - 1) >> 5, i0 = (b_end - 16) >> 5;
  return {i0 % n_words, i1 % n_words, 32 * (i1 + 1) - b_end};
}
TRELLM_HD uint32_t window_bits(uint32_t w_i0, uint32_t w_i1, int shift) {
  return uint32_t(((uint64_t(w_i0) << 32) | w_i1) >> shift) & 0xFFFFu;
}

// From the tile's words W[0..8K).
TRELLM_HD uint32_t state_at_words(const uint32_t* W, int K, int p) {
  const StateWindow w = state_window(K, p);
  return window_bits(W[w.i0], W[w.i1], w.shift);
}

// From the .trellis uint16 view directly.
TRELLM_HD uint32_t state_at(const uint16_t* tile, int K, int p) {
  const StateWindow w = state_window(K, p);
  return window_bits(tile_word(tile, w.i0), tile_word(tile, w.i1), w.shift);
}

// The 8 states of one lane (positions 8t .. 8t+7: one B fragment pair) from at most three consecutive
// words. The bits needed span [(8t+1)K - 16, (8t+8)K), 7K+16 <= 72 bits; the window start lies at a bit
// offset of at most 31 (K=7: 31 + 65 = 96, K=8: 24 + 72 = 96), so three words always suffice. This is
// the shape a fast kernel wants (3 loads, 8 shifts); the scalar state_at() is the reference it must match.
TRELLM_HD void lane_states(const uint32_t* W, int K, int t, uint32_t out[8]) {
  const int n_words = 8 * K;
  const int start = (8 * t + 1) * K - 16 + kTileElems * K;  // first bit of the first window, made >= 0
  const int a = start >> 5;
  const uint32_t w0 = W[a % n_words], w1 = W[(a + 1) % n_words], w2 = W[(a + 2) % n_words];
  if (K <= 6) {
    // Realign once per lane so the last window ends at bit 0: v = (w0:w1:w2) >> (96 - e_7). Every window then
    // sits at a compile-time offset (7-j)K of v (all fit: 7K + 16 <= 64), so a kernel pays one funnel shift
    // and one mask per state instead of a lane-dependent choice between two shifts (GEMV K=3 SASS: 16 -> 8
    // shifts and no predicate spills per tile; lm_head GEMV 286 -> 176 µs on an H100 together with decode_pair).
    const int off = start - 32 * a;  // window j ends at off + 16 + jK (relative to word a)
    const int R = 80 - 7 * K - off;  // = 96 - e_7, in [0, 64]
    const uint64_t hi = (uint64_t(w0) << 32) | w1, lo = (uint64_t(w1) << 32) | w2;
    const uint64_t v = R >= 32 ? hi >> (R - 32) : R == 0 ? lo : (lo >> R) | (uint64_t(w0) << (64 - R));
    for (int j = 0; j < 8; j++) out[j] = uint32_t(v >> ((7 - j) * K)) & 0xFFFFu;
    return;
  }
  for (int j = 0; j < 8; j++) {
    const int e = (8 * t + j + 1) * K + kTileElems * K - 32 * a;  // window end relative to word a, <= 96
    // e <= 64: the window lies in w0:w1; otherwise e >= 65, so its start e-16 >= 49 lies in w1:w2.
    out[j] = e <= 64 ? window_bits(w0, w1, 64 - e) : window_bits(w1, w2, 96 - e);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Codebooks (§2.2): state (zero-extended to uint32, arithmetic mod 2^32) -> fp16 bits.
//
// fp16 semantics: 3INST/MCG add two fp16 halves with one round-to-nearest-even; MUL1 is a fused
// multiply-add with a single rounding. The device uses the hardware half ops. The host computes in fp32
// and rounds once, which is identical because every intermediate is exact in fp32:
//  - 3INST/MCG: both halves have exponent field 12..15 (|h| in [1/8, 2)), so their exponent gap is <= 3
//    and the sum needs at most 11 + 3 + 1 = 15 significand bits < 24.
//  - MUL1: s = 1024 + bytesum is an integer <= 2044 (11 bits), the scale 0x1EEE = 1774 * 2^-18 (11 bits):
//    the product is a multiple of 2^-18 below 16, and adding -10.3828125 (a multiple of 2^-7) stays a
//    multiple of 2^-18 below 16: <= 22 significand bits < 24.

// The 3INST / MCG tail: mask/xor into two fp16 halves, return fp16(lo + hi).
TRELLM_HD uint16_t sum_halves(uint32_t x) {
  x = (x & kFpMaskAnd) ^ kFpMaskXor;
#if defined(__CUDA_ARCH__)
  const __half r = __hadd(__ushort_as_half(uint16_t(x & 0xFFFFu)), __ushort_as_half(uint16_t(x >> 16)));
  return __half_as_ushort(r);
#else
  return f32_to_f16(f16_to_f32(uint16_t(x & 0xFFFFu)) + f16_to_f32(uint16_t(x >> 16)));
#endif
}

TRELLM_HD uint16_t decode_3inst(uint32_t state) { return sum_halves(state * kInst3Mul + kInst3Add); }

TRELLM_HD uint16_t decode_mcg(uint32_t state) { return sum_halves(state * kMcgMul); }

TRELLM_HD uint16_t decode_mul1(uint32_t state) {
  const uint32_t x = state * kMul1Mul;
  const uint32_t bytesum = (x & 0xFFu) + ((x >> 8) & 0xFFu) + ((x >> 16) & 0xFFu) + (x >> 24);  // 0..1020
  const uint16_t s = uint16_t(0x6400u + bytesum);  // fp16 1024 + bytesum, exact (spacing 1 in [1024,2048))
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__hfma(__ushort_as_half(s), __ushort_as_half(kMul1Scale), __ushort_as_half(kMul1Bias)));
#else
  return f32_to_f16(f16_to_f32(s) * f16_to_f32(kMul1Scale) + f16_to_f32(kMul1Bias));
#endif
}

template <Codebook CB>
TRELLM_HD uint16_t decode_state(uint32_t state) {
  if constexpr (CB == Codebook::Inst3) return decode_3inst(state);
  else if constexpr (CB == Codebook::Mcg) return decode_mcg(state);
  else return decode_mul1(state);
}

// Two states at once -> two fp16 in one word (low half = s0), the layout of an mma B-fragment register.
// The SAME codebook arithmetic as decode_state, arranged for the GPU's paired fp16 units: on the device the
// two products are split into (lo0,lo1) / (hi0,hi1) with two byte permutes and summed by one HADD2
// (3INST/MCG), or the two byte sums (dp4a) are packed and put through one HFMA2 (MUL1) — 1.5 instead of
// 2.5 instructions per state after the multiply (SASS of the GEMV at K=3). Every fp16 operation is the same
// single rounding as decode_state's, so the result is bit-identical; the host simply calls decode_state
// (tests/backend/cuda checks the device path bit for bit through the dequantize kernel).
template <Codebook CB>
TRELLM_HD uint32_t decode_pair(uint32_t s0, uint32_t s1) {
#if defined(__CUDA_ARCH__)
  if constexpr (CB == Codebook::Mul1) {
    const uint32_t b0 = __dp4a(s0 * kMul1Mul, 0x01010101u, 0x6400u), b1 = __dp4a(s1 * kMul1Mul, 0x01010101u, 0x6400u);
    const uint32_t s = __byte_perm(b0, b1, 0x5410);  // fp16 1024 + bytesum, both lanes exact
    const __half2 r = __hfma2(*reinterpret_cast<const __half2*>(&s), __half2half2(__ushort_as_half(kMul1Scale)),
                              __half2half2(__ushort_as_half(kMul1Bias)));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    uint32_t x0 = CB == Codebook::Inst3 ? s0 * kInst3Mul + kInst3Add : s0 * kMcgMul;
    uint32_t x1 = CB == Codebook::Inst3 ? s1 * kInst3Mul + kInst3Add : s1 * kMcgMul;
    // (x & mask) ^ xor as ONE lop3 (LUT 0x6A) with both constants in registers; written as C, ptxas emits
    // two LOP3s with immediates (one immediate slot per LOP3).
    asm("lop3.b32 %0, %0, %1, %2, 0x6A;" : "+r"(x0) : "r"(kFpMaskAnd), "r"(kFpMaskXor));
    asm("lop3.b32 %0, %0, %1, %2, 0x6A;" : "+r"(x1) : "r"(kFpMaskAnd), "r"(kFpMaskXor));
    const uint32_t lo = __byte_perm(x0, x1, 0x5410), hi = __byte_perm(x0, x1, 0x7632);
    const __half2 r = __hadd2(*reinterpret_cast<const __half2*>(&lo), *reinterpret_cast<const __half2*>(&hi));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
#else
  return uint32_t(decode_state<CB>(s0)) | (uint32_t(decode_state<CB>(s1)) << 16);
#endif
}

// Runtime-dispatched variant for reference code (kernels should use the template).
TRELLM_HD uint16_t decode_state(Codebook cb, uint32_t state) {
  switch (cb) {
    case Codebook::Inst3: return decode_3inst(state);
    case Codebook::Mcg: return decode_mcg(state);
    default: return decode_mul1(state);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Whole-tile decode (reference helper, host or one device thread): fp16 bits of Q[k][n] row-major.
TRELLM_HD void decode_tile(const uint16_t* tile, int K, Codebook cb, uint16_t out[kTileDim * kTileDim]) {
  for (int p = 0; p < kTileElems; p++)
    out[walk_k(p) * kTileDim + walk_n(p)] = decode_state(cb, state_at(tile, K, p));
}

// Offset, in uint16, of tile (tk, tn) in a .trellis tensor of shape (in/16, out/16, 16K): row-major tiles.
TRELLM_HD constexpr int64_t tile_offset(int64_t tk, int64_t tn, int64_t tiles_n, int K) {
  return (tk * tiles_n + tn) * tile_u16(K);
}

}  // namespace trellm::trellis
