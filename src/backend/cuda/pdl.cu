#include <cstdlib>
#include <cstring>

#include "backend/cuda/pdl.cuh"

namespace trellm::cuda {

bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("TRELLM_PDL");
    if (e && std::strcmp(e, "0") == 0) return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    return major >= 9;
  }();
  return on;
}

int env_int(const char* name, int otherwise) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : otherwise;
}

bool clusters_fit(const void* kernel, dim3 grid, dim3 block, size_t smem, dim3 cluster) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster.x, attr[0].val.clusterDim.y = cluster.y, attr[0].val.clusterDim.z = cluster.z;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a refusal (e.g. no clusters before sm_90) is an answer, not a sticky error
    return false;
  }
  return n > 0;
}

}  // namespace trellm::cuda
