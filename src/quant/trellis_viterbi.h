// Tail-biting Viterbi encoder for one 16x16 trellis tile (TRELLIS.md §4.5), CPU.
//
// The trellis: a state is 16 bits; consecutive states overlap in 16-K bits (state(p) >> K ==
// state(p-1) mod 2^(16-K)). Nodes are those (16-K)-bit overlaps; a step from node o' to node o emits the
// state s = (k << (16-K)) | o for one of the 2^K values k whose predecessor node s >> K is o'. The cost of a
// path is the squared error sum_p (decode(s_p) - w_p)^2 with decode from trellis_decode.h.
//
// Tail-biting follows QTIP's two-pass approximation, as exllamav3 does: one unconstrained pass over the
// sequence rotated by 128 fixes the overlap e = state(0) >> K from the best path, then a second pass from
// position 0 starts in node e and must end in node e. Costs are fp32 (exllamav3 uses fp16; any valid
// tail-biting path is format-compatible, TRELLIS.md §8.10). Ties keep the lowest k.
// Read from exllamav3 (not copied): ext/quant/quantize_tiles_kernel.cuh; QTIP lib/codebook/bitshift.py.
#pragma once
#include <cstdint>
#include <string>

#include "quant/trellis_decode.h"

namespace trellm::trellis {

// All 65536 codebook values as float (exact fp16 values), built once per codebook; thread-safe.
const float* codebook_table(Codebook cb);

// Encodes one tile. w: 256 target values in walk order, already in codebook units. Writes the 256 tail-biting
// states (walk order) and, if recon != nullptr, their decoded values. Returns the squared error sum.
// Working memory (~4 MB at K = 1, less for larger K) is thread-local and reused.
double viterbi_encode_tile(const float* w, int K, Codebook cb, uint16_t* states, float* recon = nullptr);

// Encodes n tiles (n x 256 floats, walk order each) in parallel on the global thread pool.
// states: n x 256; recon: n x 256 or nullptr. Returns the total squared error.
double viterbi_encode_tiles(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon = nullptr);

// Where the encoder's Viterbi runs. Both give the same states bit for bit (trellis_viterbi_cuda.h), so the choice
// changes only the time: ~400 tiles/s on 2 CPU cores, 19-48 K tiles/s on an H100 for large batches.
enum class EncodeDevice { Cpu, Cuda };
const char* encode_device_name(EncodeDevice d);  // "cpu", "cuda"

// True when this build has the CUDA encoder (TRELLM_HAVE_CUDA) and a CUDA device is present.
bool cuda_encoder_available();

// "cpu", "cuda", "cuda:N" or "auto" (cuda when cuda_encoder_available()). "cuda" without a usable GPU, "cuda:N"
// beyond the devices there are, or either in a build without CUDA, fails with a message that starts with `what`
// (e.g. "--device cuda"). "cuda:N" also makes device N the encoder's (plain "cuda" and "auto": device 0).
EncodeDevice parse_encode_device(const std::string& name, const std::string& what);

// Encodes n tiles on `dev`: viterbi_encode_tiles, or viterbi_encode_tiles_cuda (which must be compiled in; see
// parse_encode_device). Same arguments and results; the returned error sum may differ in the last bits (a double
// sum in another order).
double encode_tiles(const float* w, int64_t n, int K, Codebook cb, EncodeDevice dev, uint16_t* states,
                    float* recon = nullptr);

}  // namespace trellm::trellis
