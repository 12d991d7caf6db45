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

}  // namespace trellm::cuda
