// Packing trellis states into the EXL3 bitstream and back (TRELLIS.md §1.3). The encoder produces full
// 16-bit states per walk position; the stream keeps the low K bits of each, MSB first, and the decoder
// (trellis_decode.h) recovers every state as a 16-bit window of the circular stream. A state sequence
// round-trips exactly when it is tail-biting: state(p) >> K == state(p-1) mod 2^(16-K) for every p,
// including p = 0 against p = 255.
// Read from exllamav3 (not copied): ext/quant/pack.cu (pack_trellis_kernel, unpack_trellis_kernel).
#pragma once
#include <cstdint>

#include "core/hd.h"
#include "quant/trellis_decode.h"

namespace trellm::trellis {

// states: 256 values in walk order (position p); tile: 16K uint16 in the .trellis int16 layout.
TRELLM_HD void pack_tile(const uint16_t* states, int K, uint16_t* tile) {
  const uint32_t mask = (1u << K) - 1;
  uint64_t acc = 0;  // bit accumulator, MSB first; at most 31 + 8 bits pending
  int nacc = 0, m = 0;
  for (int p = 0; p < kTileElems; p++) {
    acc = (acc << K) | (states[p] & mask);
    nacc += K;
    if (nacc >= 32) {
      const uint32_t w = uint32_t(acc >> (nacc - 32));
      nacc -= 32;
      acc &= (uint64_t(1) << nacc) - 1;
      tile[2 * m] = uint16_t(w & 0xFFFFu);  // low half first: the int16-pair swap
      tile[2 * m + 1] = uint16_t(w >> 16);
      m++;
    }
  }
  // 256K bits is always a whole number of words (8K), so nothing is left over.
}

TRELLM_HD void unpack_tile(const uint16_t* tile, int K, uint16_t* states) {
  for (int p = 0; p < kTileElems; p++) states[p] = uint16_t(state_at(tile, K, p));
}

// True when the 256 states form a valid circular shift-register path for K bits per step.
TRELLM_HD bool is_tail_biting(const uint16_t* states, int K) {
  const uint32_t overlap = (1u << (kStateBits - K)) - 1;
  for (int p = 0; p < kTileElems; p++) {
    const uint32_t prev = states[(p + kTileElems - 1) % kTileElems];
    if ((uint32_t(states[p]) >> K) != (prev & overlap)) return false;
  }
  return true;
}

}  // namespace trellm::trellis
