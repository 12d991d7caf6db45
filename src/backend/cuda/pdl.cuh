// Programmatic dependent launch (PDL, sm_90): how the decode step's ~16 kernels per layer overlap.
//
// A kernel launched with the PDL attribute may start while its predecessor is still running. Its blocks first
// do what does not depend on the predecessor (issue their weight loads into shared memory or L2), then call
// grid_wait(), which returns once the predecessor has finished and its writes are visible. Every kernel that
// is launched this way calls grid_wait() before it reads an activation or writes any global memory, and every
// grid has blocks that wait before they end, so the chain stays ordered transitively (kernel n finishing
// implies kernel n-1 finished). grid_launch_dependents() lets the next kernel's blocks be scheduled early;
// without it they start when this grid ends. Both are no-ops when the launch carried no PDL attribute.
//
// Why: a decode step is ~750 small dependent kernels (bench/results/e2e.md); without PDL each pays its launch
// and its first weight round trip on the critical path.
#pragma once
#include <cuda_runtime.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernel_clocks.cuh"

namespace trellm::cuda {

__device__ __forceinline__ void grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
  clocks::clocked_wait([] { asm volatile("griddepcontrol.wait;\n" ::: "memory"); });
#else
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
#endif
}
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Asks L2 to fetch [p, p + bytes) (16-byte aligned, bytes a multiple of 16) without waiting: a hint, no
// data dependence. sm_90 bulk prefetch; nothing on older targets.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// True on sm_90+ unless the environment sets TRELLM_PDL=0 (A/B timing, debugging).
bool pdl_enabled();

// The integer in environment variable `name` (a kernel knob for A/B runs), or `otherwise` when it is unset or empty.
int env_int(const char* name, int otherwise);

// Launches kernel<<<grid, block, smem, s>>>(args...), with the PDL attribute when pdl && pdl_enabled(), in
// thread-block clusters of `cluster` blocks when that is more than one (the caller checked that they fit).
template <typename... Params, typename... Actual>
void launch_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl, dim3 cluster,
                      Actual... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl && pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x, attr[n].val.clusterDim.y = cluster.y, attr[n].val.clusterDim.z = cluster.z;
    n++;
  }
  cfg.attrs = attr;
  cfg.numAttrs = unsigned(n);
  TRELLM_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...));
}
template <typename... Params, typename... Actual>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl, Actual... args) {
  launch_clustered(kernel, grid, block, smem, s, pdl, dim3(1, 1, 1), args...);
}

// Whether clusters of `cluster` blocks of `kernel` (block threads, smem bytes of dynamic shared memory each) can
// be resident at all on this device (cudaOccupancyMaxActiveClusters > 0). Clusters above 8 need the kernel's
// cudaFuncAttributeNonPortableClusterSizeAllowed set first.
bool clusters_fit(const void* kernel, dim3 grid, dim3 block, size_t smem, dim3 cluster);

}  // namespace trellm::cuda
