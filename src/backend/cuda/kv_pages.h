// The paged latent cache as the CUDA kernels see it (backend/kv_block.h: kKvBlockTokens, kv_pool_row): a pool of 64-row
// blocks, one block table per sequence, one sequence per query row. Every kernel that reads or writes cache rows
// resolves them here, on the device, so a captured graph follows the tables and positions written between
// replays. Framework-free (raw device pointers); shared by the elementwise, v1 and tensor-core MLA kernels.
#pragma once
#include <cstdint>

#include "backend/kv_block.h"
#include "core/hd.h"

namespace trellm::cuda {

struct KvPages {
  const int32_t* tables = nullptr;  // device I32 [n_tables, max_blocks]: pool block ids per sequence
  const int32_t* seq = nullptr;     // device I32 [n]: query row i uses table seq[i]
  int max_blocks = 0;               // row stride of tables

  // The block table of query row i (device memory: call on the device).
  TRELLM_HD const int32_t* table(int i) const { return tables + int64_t(seq[i]) * max_blocks; }
  // The same pages seen from query row `row0` on (the sub-view of a run: a pointer offset).
  TRELLM_HD KvPages from(int row0) const { return KvPages{tables, seq + row0, max_blocks}; }
};

}  // namespace trellm::cuda
