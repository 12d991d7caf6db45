// The decode step as a task graph for the persistent decode kernel (issue 16, docs/megakernel.md): the tiles of
// every task of every layer, the per-tile dependencies (counters in global memory on the device), and a static
// per-SM schedule built once on the host per (model, rows, context). Host code only: the kernel that walks the
// lists lives in backend/cuda; this file decides what it walks, and proves (simulate) that it cannot deadlock.
//
// A tile finalizes one output group of its task when it is the group's last tile to arrive (split-k: the last
// split sums the partials), and a consumer tile waits for the output groups it reads, not for whole tasks: a q_b
// column group needs every q_a group (the q norm reads the full row), a head's q absorb only its own two q_b
// groups, an o_proj k-split only the heads its k range covers, a down tile only its own job's gate/up groups.
//
// Deadlock freedom: tiles are numbered in a topological order (each tile's producers have smaller numbers) and
// every SM runs its list in increasing number. Then the unfinished tile with the smallest number is always
// runnable: its producers are smaller, so finished, and every earlier tile on its SM is smaller, so finished.
// Any durations, any order of progress between SMs: the step completes. A data-dependent tile (an MLA split past
// the context length) still runs, does nothing, and arrives.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/hd.h"

namespace trellm::step {

// Counters are never reset: they carry the step (graph replay) number. Before step n (0, 1, ...) a counter of
// `arrivals` tiles holds n · arrivals; a consumer of step n waits until it reaches (n + 1) · arrivals. 32-bit
// counters wrap after ~2^32 / arrivals steps, so the comparison is modular: right while the distance stays below
// 2^31 (a consumer is never more than one step ahead). One definition for the host twin and the kernel.
TRELLM_HD uint32_t counter_target(uint32_t step, uint32_t arrivals) { return (step + 1u) * arrivals; }
TRELLM_HD bool counter_reached(uint32_t value, uint32_t target) { return int32_t(value - target) >= 0; }

enum class Task : uint8_t {
  Embed,        // the token rows' embedding (1 tile)
  AttnIn,       // attention norm + q_a ‖ kv_a GEMV: column groups of both × k-splits
  QB,           // q_a norm + q_b GEMV: column groups × k-splits
  KvAppend,     // kv norm, rope, latent cache append (1 tile)
  QAbsorb,      // per head: rope of q_rope, q_nope · W_uk -> the 512-wide q latent
  MlaSplit,     // per (row, head, context split): partial softmax · latents
  MlaCombine,   // per head: the splits combined, · W_uv -> 256 values
  OProj,        // o_proj GEMV: column groups × k-splits (a split's k range covers a few heads)
  Router,       // residual add, post-attention norm, gate: 8 tiles of 8 experts (the last to arrive takes the
                // top-k, as split-k's last block sums); the dense layer's: 1 tile, the norm
  GateUp,       // MoE: per (job = row × slot, column group, gate|up, k-split); the shared expert is the last slot
  Down,         // MoE: per (job, column group, k-split); the row's jobs summed into the residual
  DenseGateUp,  // the dense layer's gate|up GEMV
  DenseDown,    // the dense layer's down GEMV (a split's k range covers a few gate/up groups)
  Head,         // final norm + lm_head GEMV column groups
  Sample,       // the next token per row (1 tile)
};
const char* task_name(Task t);

// The shapes of a decode step (filled from the model's Config by the caller: backend code does not see models).
struct StepShape {
  int layers = 47, dense_layers = 1;  // the first dense_layers layers have a dense MLP, the rest MoE
  int hidden = 2048, q_lora = 768, kv_lora = 512, rope = 64, nope = 192, v_head = 256, heads = 20;
  int dense_inter = 10240, moe_inter = 1536, top_k = 4, shared_experts = 1;
  int vocab = 154880;
  int rows = 1;        // sequences decoded together (1..8)
  int context = 1024;  // keys in the cache per row (sizes the MLA splits)
  static StepShape glm47_flash();
};

// What the schedule's cost model assumes (µs, per SM; one tile at a time per SM). The defaults are the H200's
// floors: the exact EXL3 decode at full issue ~0.8 ms per 3.6 G weights over 132 SMs (docs/kernels.md) = 29 ps
// per weight and SM; 4.8 TB/s / 132 = 36 bytes per ns and SM for the latents; dependent_us: a counter's
// release seen by its consumer plus the consumer's activation load (two L2 round trips).
struct CostModel {
  int sms = 132;
  double ps_per_weight = 29.0;
  double bytes_per_ns = 36.0;
  double dependent_us = 1.5;
  double tile_us = 0.3;  // fixed per-tile work: the split-k partial store and arrival
  // Decode ahead (docs/megakernel.md, v2): a tile's weights are decoded as soon as its SM is free, before its
  // counters are complete; only the rest waits. A routed expert's weights are known once the router has run.
  bool decode_ahead = true;
  // The plan's grain: a GEMV's k-splits give about `waves` tiles per SM (fewer, larger tiles pay the fixed
  // per-tile cost less often; more, smaller ones shorten each dependent stage).
  // Today's multi-kernel path for comparison: every task a kernel, so a task's tiles start only once every tile
  // of the task before has ended, plus boundary_us (the grid's drain and the PDL wait's release). The
  // scheduler's times only: simulate() runs the counters alone.
  bool kernel_boundaries = false;
  double boundary_us = 2.0;
  double waves = 0.5;  // with decode ahead: within 2 % of the best at 1 row (0.25), the best at 8 (docs/megakernel.md)
};

struct Tile {
  Task task;
  int layer;              // -1: embed, layers: head and sample
  int group;              // the output group it finalizes (with its task and layer: a counter)
  int split;              // k-split or context split
  int64_t weights;        // weights it decodes
  int64_t bytes;          // other bytes it reads once its counters are complete (latents)
  int64_t weight_bytes;   // bytes of unquantized weights (the router's gate), read ahead like the decode
  bool routed;            // a routed expert's: which weights is known after the router (deps[0])
  std::vector<int> deps;  // counters it waits for (each: all tiles of that output group arrived)
  int counter;            // the counter it arrives on
};

struct CounterInfo {
  Task task;
  int layer, group;
  int arrivals;  // how many tiles arrive on it: its target per step
};

struct StepPlan {
  StepShape shape;
  std::vector<Tile> tiles;                // topological order
  std::vector<CounterInfo> counter_info;  // per counter
  std::vector<std::vector<int>> per_sm;   // tile numbers, increasing, per SM
  double step_us = 0;                     // its makespan
  double critical_path_us = 0;            // the longest dependency chain (no SM contention): a lower bound
  std::vector<double> critical_path_by_task;  // its time per Task (index: int(Task)), boundaries included
  int counters() const { return int(counter_info.size()); }
};

// The tiles and their dependencies in topological order (no schedule yet).
StepPlan build_tiles(const StepShape& s, const CostModel& m);
// build_tiles, then list scheduling in tile order: each tile to the SM where the cost model starts it first.
StepPlan build_step_plan(const StepShape& s, const CostModel& m = {});

// The schedule as flat arrays, as the kernel reads them (cudaMemcpy once per plan): SM k runs tiles
// sm_tiles[sm_begin[k] .. sm_begin[k+1]); tile i waits for counters deps[dep_begin[i] .. dep_begin[i+1]) and then
// arrives on tile_counter[i]; counter c expects arrivals[c] tiles a step. tile_desc[4i .. 4i+4) = (task, layer,
// group, split): what tile i computes (the kernel maps (task, layer) to its weights and buffers).
struct StepLists {
  std::vector<int32_t> sm_begin, sm_tiles, dep_begin, deps, tile_counter, arrivals, tile_desc;
};
StepLists flatten(const StepPlan& p);

// Every task's output lives in one buffer reused by every layer (as the engine's RunState), so a tile that
// writes task T's buffer for layer l + 1 must come after every tile that reads T's output of layer l (a read is
// a wait on one of its counters), through dependencies. Returns "" or the first write that could overtake a read.
std::string check_buffer_reuse(const StepPlan& p);

// A tile's time in two parts (µs): `ahead` may run before its counters are complete (its weights' decode, with
// decode_ahead; a routed tile's only after the router), `after` runs once they are.
struct TileTime {
  double ahead, after;
};
TileTime tile_time(const StepPlan& p, const CostModel& m, int i);

// Runs per_sm as the device would (each SM in list order; a tile's ahead part once its SM is free (a routed
// tile's: and the router done), the rest once its counters are complete) with the given times per tile. Returns
// the makespan, or a negative value with `why` naming the SM, the tile and the counter it waits for when no SM
// can move (a deadlock).
double simulate(const StepPlan& p, const std::vector<TileTime>& t, std::string* why = nullptr);

// The schedule's floor: p's lists run by simulate() with no work in the tiles, only m's dependent_us and tile_us
// (what the task runner's empty tiles measure, bench_step_runner).
double schedule_floor(const StepPlan& p, const CostModel& m);

}  // namespace trellm::step
