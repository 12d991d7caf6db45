// A captured step's kernels on the GPU's clock: which kernel holds the critical path for how long, and whether
// its launch was hidden. Built from the in-kernel clocks of backend/cuda/kernel_clocks.cuh (one record per block
// around its dependency wait); plain host code, so the analysis is tested without a GPU.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace trellm {

// The points after its wait that a kernel may mark (cuda::clocks::Mark), in chain order.
constexpr int kClockMarks = 4;
constexpr const char* kMarkNames[kClockMarks] = {"inputs", "math", "arrived", "stored"};

// One block's record (the device layout of cuda::clocks::Record).
struct ClockRecord {
  uint64_t launch;  // one value per kernel launch (%gridid)
  uint64_t t_wait;  // ns: the block reached its dependency wait
  uint64_t t_go;    // ns: the wait returned
  uint32_t sm, block;
  uint64_t t_mark[kClockMarks] = {};  // ns: the block passed each mark; 0: it did not
};

// A kernel node of the step's graph, in launch order.
struct GraphKernel {
  std::string name;  // short_kernel_name() of the entry point
  int64_t blocks;    // grid size
};

// What a backend's clocks recorded (Backend::kernel_clocks_end).
struct KernelClocks {
  std::vector<ClockRecord> records;
  std::vector<GraphKernel> kernels;  // of the step graph launched last
  uint64_t dropped = 0;              // blocks past max_records
};

struct KernelSpan {   // StepTimeline::kernels[k]: the graph's kernel k
  int blocks;         // blocks that recorded (a block that exits before its wait records nothing)
  double release_us;  // its earliest wait return, from the step's first
  double lead_us;     // release - its earliest arrival at the wait: > 0 when launch and prologue were hidden
  double path_us;     // the next kernel's release - this one's: its share of the step's critical path
  double last_go_us;  // the latest wait return - the release: how late its last block started
  // Per mark, the last block to pass it, from the release (its hop ends there); -1: no block marked it.
  double mark_us[kClockMarks];
  // Per mark, the mean over the blocks that passed it of the time from the block's own previous point (its wait
  // return or its previous mark) to it: what the hop costs one block, apart from when the block started. -1: none.
  double block_us[kClockMarks];
};

struct StepTimeline {
  std::vector<KernelSpan> kernels;  // as many as the graph has kernels
  double step_us;                   // the next step's first release - this step's
};

// Orders the records by wait return, cuts them into launches (runs of one launch id) and the launches into steps of kernels.size()
// launches; the last step recorded only closes the one before it, so records of S steps give S - 1 timelines.
// Throws (naming the counts) when the launches do not make whole steps, or a launch has more blocks than its
// kernel's grid: the records do not belong to this graph, or some kernel did not record.
std::vector<StepTimeline> build_timeline(std::span<const ClockRecord> records, std::span<const GraphKernel> kernels);

// Per kernel name, per step, averaged over the steps: how many launches, their summed critical-path share,
// and their mean lead. In first-launch order.
struct KernelSummary {
  std::string name;
  int launches;       // per step
  double path_us;     // summed over its launches in a step
  double lead_us;     // mean over its launches
  double hidden;      // fraction of its launches whose first block was waiting >= 0.5 us before the release
  double last_go_us;  // mean over its launches
  double mark_us[kClockMarks];   // mean over its launches of KernelSpan::mark_us; -1: none marked it
  double block_us[kClockMarks];  // mean over its launches of KernelSpan::block_us; -1: none marked it
};
std::vector<KernelSummary> summarize(const std::vector<StepTimeline>& steps, std::span<const GraphKernel> kernels);

// The steps' critical path cut along the marks, summed over the kernels of a step and averaged over the steps
// (the split issue 16 asks the persistent kernel for: waiting, loading, computing). A kernel that marks its hops
// contributes its path share in five parts: start (from its release until its last block was past the wait),
// staging (until the last block staged its inputs), compute (until the last block's MMAs were done), tail (until
// the last block passed its last mark: the split-k ticket and the sums) and drain (the rest of its share: the
// grid's end reaching the next kernel's wait). A part whose mark the kernel does not make is 0 and its time falls
// into the next part it makes. A kernel without marks contributes its whole share as `unmarked`. The parts add up
// to step_us.
struct StepSplit {
  double start_us = 0, staging_us = 0, compute_us = 0, tail_us = 0, drain_us = 0, unmarked_us = 0;
  double step_us = 0;
};
StepSplit split_step(const std::vector<StepTimeline>& steps);

// "void trellm::cuda::tk::gemv_kernel<3>(trellm::cuda::tk::LinearArgs)" -> "gemv_kernel<3>": the demangled
// entry point without return type, namespaces and parameters.
std::string short_kernel_name(const std::string& demangled);

}  // namespace trellm
