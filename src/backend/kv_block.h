// The paged latent cache's addressing, one definition for the host (CPU backend, model, runtime) and the device
// (every CUDA kernel that reads or writes cache rows). Framework-free, so kernel headers include it.
//
// Each layer's cache is one pool of fixed-size blocks; a sequence owns a block table (pool block ids), and its token
// p lives at pool row table[p / kKvBlockTokens] * kKvBlockTokens + p % kKvBlockTokens. 64 tokens per block = the
// attention kernels' key tile, so one key tile is one contiguous block (FlashMLA's choice too); a block of
// GLM-4.7-Flash's 47 layers holds 64 x 54,144 B = 3.47 MB in bf16.
#pragma once
#include <cstdint>

#include "core/hd.h"

namespace trellm {

constexpr int kKvBlockTokens = 64;

TRELLM_HD int64_t kv_pool_row(const int32_t* table, int64_t p) {
  return int64_t(table[p / kKvBlockTokens]) * kKvBlockTokens + p % kKvBlockTokens;
}

// Blocks that hold `tokens` positions (at least one).
TRELLM_HD int kv_blocks_for(int64_t tokens) { return tokens <= 0 ? 1 : int((tokens + kKvBlockTokens - 1) / kKvBlockTokens); }

}  // namespace trellm
