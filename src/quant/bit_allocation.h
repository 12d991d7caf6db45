// Bit allocation for a fractional average bitrate (TRELLIS.md §4.6): every quantized Linear gets an integer
// K; the base is floor(bpw) and +1 steps are spent group by group, in order of group priority and then of
// closeness to either end of the layer stack (end layers matter most), until the average would exceed bpw.
// Read from exllamav3 (not copied): exllamav3/conversion/allocation.py (create_q_strategy; we keep integer K
// only, no half-integer rates). The head (lm_head, head_bits) is allocated by the caller outside this budget.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace trellm::trellis {

struct AllocTarget {
  std::string key;     // module key, e.g. "model.layers.3.mlp.experts.17.down_proj"
  int64_t numel = 0;   // weights counted for the budget (exllamav3 counts the 128-padded in x out)
  // Tensors of one group are always promoted together (e.g. the q/kv projections of a layer, or all experts
  // of a layer). The first ".<number>." in the group name is its layer index within its stack (the prefix).
  std::string group;
  int priority = 0;    // higher is promoted first
  int hq_extra = 0;    // with hq: floor K >= base + hq_extra (exllamav3's select_hq_bits)
};

struct Allocation {
  std::map<std::string, int> K;  // per key
  double average_bits = 0;       // the real numel-weighted average of the budgeted tensors
};

// Fails (trellm::Error) for bpw outside [1, 8], a duplicate key or a non-positive numel.
Allocation allocate_bits(const std::vector<AllocTarget>& targets, double bpw, bool hq = false);

}  // namespace trellm::trellis
