// Host side of the kernel clocks (kernel_clocks.cuh): a recorder that points every translation unit's sink at
// one device buffer, and the kernel nodes of a captured graph in launch order, to name what was recorded.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/kernel_timeline.h"

namespace trellm::cuda::clocks {

// Built with -DTRELLM_KERNEL_CLOCKS=ON.
bool built();

// Recording from construction until collect(); one recorder at a time. Throws trellm::Error when the build has
// no clocks or another recorder is live.
class Recorder {
 public:
  explicit Recorder(size_t max_records);
  ~Recorder();
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;
  // Waits for the device, stops recording and returns the records; *dropped = blocks past max_records.
  std::vector<ClockRecord> collect(uint64_t* dropped);

 private:
  void* rec_ = nullptr;
  unsigned* count_ = nullptr;
  size_t cap_ = 0;
  bool live_ = false;
};

// The kernel nodes of `g` in dependency order (ties in node order), with short names and grid sizes.
std::vector<GraphKernel> graph_kernels(cudaGraph_t g);

}  // namespace trellm::cuda::clocks
