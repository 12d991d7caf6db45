// Kernel clocks (built with -DTRELLM_KERNEL_CLOCKS=ON): every block's first thread records, around its
// dependency wait (grid_wait, pdl.cuh), when it reached the wait and when the wait returned, on the GPU's
// global nanosecond timer, with its launch (%gridid) and SM. Host side: kernel_clocks.h.
//
// Why the wait: in a captured decode step every kernel waits on its predecessor there, so the earliest return
// over a kernel's blocks is when its dependency resolved ("release"), and release(k+1) - release(k) is the
// time kernel k holds the step's critical path: its work after the wait plus the latency until its dependents
// may run. The blocks' arrival before the release says whether the launch and prologue were hidden (arrival
// well before release) or on the path (arrival = release). Off by default: the records cost a global atomic
// per block.
//
// Marks: a kernel may also stamp the points after its wait where its tile's chain waits on something else
// (mark_point(): activations staged, MMAs done, split-k ticket taken, output stored). They go into the block's own
// record, so they cost a store each, and they split a kernel's path share into its hops (kernel_timeline.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace trellm::cuda::clocks {

// The points a block may mark after its wait, in chain order (Record::t_mark; the host's kMarkNames).
enum Mark : int {
  kInputs = 0,  // the lead warp staged its activations (input transform done)
  kMath = 1,    // the lead warp's MMAs are done
  kArrived = 2, // the block's partial is stored and its split-k ticket taken (all warps)
  kStored = 3,  // the last block of a column group stored the output
  kMarks = 4
};

struct Record {
  uint64_t grid;    // %gridid: one value per launch
  uint64_t t_wait;  // %globaltimer (ns) when the block reached its wait
  uint64_t t_go;    // ... and when the wait returned
  uint32_t sm;      // %smid
  uint32_t block;   // linear block index
  uint64_t t_mark[kMarks];  // when the block passed each Mark; 0: it did not
};
static_assert(sizeof(Record) == 64);

struct Sink {
  Record* rec;      // nullptr: not recording
  unsigned* count;  // records written (may pass cap: those past it are dropped and counted)
  unsigned cap;
};

#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
// One sink per translation unit (the library is built without relocatable device code, so a __constant__
// variable is per TU): each TU registers a setter at static initialisation, kernel_clocks.cu calls them all.
static __constant__ Sink tu_sink;
using SinkSetter = cudaError_t (*)(const Sink&);
int register_sink_setter(SinkSetter set);
namespace {
cudaError_t set_tu_sink(const Sink& s) { return cudaMemcpyToSymbol(tu_sink, &s, sizeof s); }
[[maybe_unused]] const int tu_sink_registered = register_sink_setter(&set_tu_sink);
}  // namespace

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ bool lead_thread() { return threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0; }

// The block's record index for its marks, kept by its lead thread (the only one that reads or writes it).
__device__ __forceinline__ unsigned& record_slot() {
  __shared__ unsigned slot;
  return slot;
}

// The wait (griddepcontrol.wait on sm_90, passed in as `wait`) with the block's record around it.
template <typename Wait>
__device__ __forceinline__ void clocked_wait(Wait wait) {
  const bool lead = lead_thread();
  const Sink s = tu_sink;
  const uint64_t t0 = lead && s.rec ? global_ns() : 0;
  wait();
  if (lead) {
    record_slot() = ~0u;
    if (!s.rec) return;
    const uint64_t t1 = global_ns();
    uint64_t grid;
    uint32_t sm;
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const unsigned i = atomicAdd(s.count, 1u);
    if (i < s.cap) {
      s.rec[i] = Record{grid, t0, t1, sm, blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), {0, 0, 0, 0}};
      record_slot() = i;
    }
  }
}
#endif

// The block passed point m (its lead thread records; nothing unless built with clocks and recording).
__device__ __forceinline__ void mark_point(Mark m) {
#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS && defined(__CUDA_ARCH__)
  if (!lead_thread()) return;
  const unsigned i = record_slot();
  if (i != ~0u) tu_sink.rec[i].t_mark[m] = global_ns();
#else
  (void)m;
#endif
}
// A block that marks without a wait of its own (the step runner's tiles): its marks record nothing.
__device__ __forceinline__ void mark_unrecorded() {
#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS && defined(__CUDA_ARCH__)
  if (lead_thread()) record_slot() = ~0u;
#endif
}

}  // namespace trellm::cuda::clocks
