// The persistent decode kernel's task runner (issue 16; v0 in docs/megakernel.md), without the tasks' math yet:
// one block per worker walks its list of the step plan's tiles (backend/step_plan.h, flatten()), waits on the
// counters each tile depends on (ld.acquire, a bounded spin), runs the tile's body and arrives on its counter
// (a release). What it proves and measures before any task body moves in:
//   - Check mode: a tile's body verifies that every tile it depends on wrote this step's stamp, then writes its
//     own. A wrong dependency list, a missing fence or an out-of-order list shows as a bad stamp or a timeout
//     that names the worker, the tile and the counter.
//   - Empty mode: the body does nothing, so a step is the schedule's floor: counter latency and the runner's
//     own overhead along the plan's critical path. Per-tile clocks give the dependent latency the cost model
//     assumes (CostModel::dependent_us).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "backend/cuda/trellis_kernels.h"
#include "backend/step_plan.h"

namespace trellm::cuda {

struct RunnerTileClock {
  uint64_t t_free;   // ns: the worker reached the tile (its previous tile arrived)
  uint64_t t_ready;  // every counter it waits for was complete
  uint64_t t_done;   // it was about to arrive on its counter (read before the release, so before any consumer's t_ready)
};

struct RunnerStatus {
  uint32_t bad_stamps = 0;  // dependencies whose stamp was not this step's
  int first_bad_tile = -1;  // a tile that saw one, and the producer it read
  int first_bad_producer = -1;
  int timeout_worker = -1;  // a worker that gave up waiting: at this tile, for this counter, which held this value
  int timeout_tile = -1;
  int timeout_counter = -1;
  uint32_t timeout_value = 0;
  std::string describe(const step::StepPlan& p) const;  // "" when clean
};

class StepRunner {
 public:
  enum class Mode { Check, Empty };
  // The plan's per_sm lists become the workers (one block each, all resident: a cooperative launch, refused with
  // an error when the device cannot hold them). Up to 4 workers a SM (the plan's name "per_sm" then means per
  // worker): more than one lets several tiles' latencies overlap on an SM, as several CTAs of a kernel do.
  // timeout_ms bounds every wait.
  StepRunner(const step::StepPlan& plan, Mode mode, double timeout_ms = 2000.0);
  ~StepRunner();
  StepRunner(const StepRunner&) = delete;
  StepRunner& operator=(const StepRunner&) = delete;

  // Sets every counter to `step` · arrivals, as if steps 0 .. step - 1 had run (the 32-bit wrap, tested).
  void start_at(uint32_t step);
  // GEMV tiles decode the first `tiles` (0 to 8) 16-row k tiles of their first weight chunk before their counter
  // wait, 4 KB of shared memory each (tk::gemv_decode_ahead). 0 (default): none.
  void set_decode_ahead(int tiles);
  // Launches step number `step` on `s` (after steps before it); with clocks, each tile's times are kept.
  void launch(uint32_t step, cudaStream_t s, bool clocks = false);
  // The first task body: a chain of trellis GEMVs y_s[m, out_s] = x_s · W_s, every tile a GEMV tile (column
  // group, k-split) of trellis_matmul's own plan, one counter per column group. Stage s + 1 may read stage s's
  // output (x_{s+1} = y_s): its tiles then wait per tile for the column groups their k range covers (every
  // group when its input is RMS-normalised, as the norm reads the full row), the persistent kernel's grain.
  // Each stage has its own workspace (trellis_workspace_bytes for 8 rows, initialised), as trellis_matmul's; the
  // same arithmetic, so the same bits as trellis_matmul / trellis_matmul_normed. K = 3 only for now.
  struct GemvStage {
    const DeviceTrellis* w;
    const float* x;
    float* y;
    void* workspace;
    const float* norm_w = nullptr;  // x RMS-normalised first (trellis_matmul_normed)
    float eps = 0.0f;
  };
  static constexpr int kMaxGemvStages = 64;  // their arguments live in device memory
  void launch_gemvs(uint32_t step, const std::vector<GemvStage>& stages, int m, cudaStream_t s, bool clocks = false);
  // The plan for launch_gemvs: stage s of shape (in_padded, out_padded); chained: stage s + 1 reads stage s's
  // output (else independent); normed as GemvStage::norm_w. Tiles round-robin over `workers` in topological order.
  struct GemvShape {
    int in_padded, out_padded;
    bool normed = false;
  };
  static step::StepPlan gemv_plan(int m, const std::vector<GemvShape>& stages, bool chained, int workers);
  // Waits for the device; the status of every launch since the last call.
  RunnerStatus status();
  std::vector<uint32_t> counters();          // their values now
  std::vector<RunnerTileClock> tile_clocks();  // of the last clocked launch, per tile

 private:
  struct Device;
  Device* d_;
  const step::StepPlan& plan_;
  Mode mode_;
  uint64_t timeout_ns_;
};

}  // namespace trellm::cuda
