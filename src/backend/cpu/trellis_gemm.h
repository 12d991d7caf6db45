// The fused CPU trellis product: Q (in_padded x out_padded, EXL3 tiles) times activations, with every tile decoded
// on the fly into registers (one row or two) or into a small per-thread strip buffer (more rows: each tile is
// decoded once per call, whatever the number of rows). No decoded copy of a weight is ever kept.
//
// Variants (chosen once at run time from the CPU's features, every one checked against the scalar one by
// tests/backend/test_trellis_cpu.cpp): scalar (portable, the reference), AVX2+FMA+F16C, AVX-512 (F/BW/DQ/VL),
// AVX-512 FP16 (+VBMI2: the fp16 sum / fma of the codebooks in hardware, 32 states per instruction), and NEON
// with the Armv8.2 fp16 arithmetic. The decoders take their state windows, walk order and codebook constants
// from quant/trellis_decode.h (the one decode definition) and are bit-exact with it.
//
// Activations go in "position order": a tile's 256 weights are decoded in trellis walk order p = 32c + l (c = 0..7
// chunks of 32), and weight p multiplies x[16 tk + walk_k(l)] and adds into column walk_n(p) = c + 8((l >> 2) & 1).
// So every variant reads the same permuted copy xp of the activations and no decoded weight is ever moved.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "quant/trellis_decode.h"

namespace trellm::cpu {

enum class TrellisIsa : uint8_t { Scalar, Avx2, Avx512, Avx512Fp16, Neon };
const char* trellis_isa_name(TrellisIsa isa);
// Compiled into this binary and supported by this CPU.
bool trellis_isa_supported(TrellisIsa isa);
std::vector<TrellisIsa> trellis_supported_isas();
// The variant the CPU backend uses: the best supported one unless a test forced another.
TrellisIsa trellis_active_isa();
// Internal selector (tests, dev benchmarks): use `isa` for every later product; it must be supported.
void trellis_force_isa(TrellisIsa isa);

// One trellis-coded matrix: (tiles_k x tiles_n) tiles of 16K uint16 each, row-major (TRELLIS.md §1.1).
struct TrellisTiles {
  const uint16_t* trellis = nullptr;
  int K = 0;
  trellis::Codebook cb = trellis::Codebook::Inst3;
  int64_t tiles_k = 0, tiles_n = 0;
  const uint16_t* tile(int64_t tk, int64_t tn) const { return trellis + trellis::tile_offset(tk, tn, tiles_n, K); }
};

constexpr int kChunk = 32;  // positions per decode chunk; 8 chunks per tile

// xp[(r * tiles_k + tk) * 32 + l] = x[r * ldx + 16 tk + walk_k(l)]: rows of tiles_k * 16 values.
void permute_x(const float* x, int64_t ldx, int64_t m, int64_t tiles_k, float* xp);
// y[r * ldy + 16 (tn - tn0) + n] = Σ_k x[r][k] · Q[k][16 tn + n] for strips tn in [tn0, tn1), rows r < m (y starts at
// strip tn0's first column); xp from permute_x.
// Single-threaded; f32 products, per-column sums in a fixed order (a row's result does not depend on m, on the
// strip range it was computed in or on the thread that ran it).
void trellis_strips(TrellisIsa isa, const TrellisTiles& t, const float* xp, int64_t m, float* y, int64_t ldy,
                    int64_t tn0, int64_t tn1);
// The transposed product over a column range: u[r * ldu + 16 (tk - tk0) + k] = Σ_{n in strips [tn0, tn1)} Q[16 tk + k][n]
// z[r * ldz + n - 16 tn0] for tile rows tk in [tk0, tk1) (z starts at strip tn0's first column). Single-threaded.
void trellis_strips_t(TrellisIsa isa, const TrellisTiles& t, const float* z, int64_t ldz, int64_t m, float* u, int64_t ldu,
                      int64_t tk0, int64_t tk1, int64_t tn0, int64_t tn1);
// The 256 weights of one tile as f32, in walk order (out[p] = Q[walk_k(p)][walk_n(p)]): the variant's decoder alone.
void trellis_decode_tile(TrellisIsa isa, const uint16_t* tile, int K, trellis::Codebook cb, float out[256]);
// x[i] = fp16(x[i]) (round to nearest even), n values.
void round_to_f16(TrellisIsa isa, float* x, int64_t n);

// Work items of a multi-threaded product: strip groups that keep a tile row's decoded strip buffer in L2.
int64_t trellis_strip_group(int64_t tiles_k, int64_t m);

}  // namespace trellm::cpu
