// Device memory of the encoder's GPU passes (trellis_ldlq.cu, block_ldl.cu): freed on every path out, an exception
// from a later allocation included. Stream-ordered (cudaMallocAsync / cudaFreeAsync on the caller's lane): a
// cudaFree would wait for the whole device, i.e. for the other lanes' queued Viterbi steps too.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <string_view>

#include "core/error.h"

namespace trellm::trellis {

template <typename T>
struct DeviceArray {
  T* p = nullptr;
  cudaStream_t s = nullptr;
  explicit DeviceArray(cudaStream_t stream) : s(stream) {}
  DeviceArray(size_t count, cudaStream_t stream, std::string_view what) : s(stream) { alloc(count, what); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (p) cudaFreeAsync(p, s);
  }
  // `what` names the array for the error ("the batched LDLQ's weights"); `hint` ends it ("; quantize fewer ...").
  void alloc(size_t count, std::string_view what, std::string_view hint = {}) {
    const cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&p), count * sizeof(T), s);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear it: the next launch check must not see this one
      p = nullptr;
      fail("cannot allocate ", what, " (", double(count * sizeof(T)) / 1e9, " GB) on the GPU: ", cudaGetErrorString(e),
           hint);
    }
  }
};

}  // namespace trellm::trellis
