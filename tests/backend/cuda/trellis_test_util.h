// Shared by the trellis kernel tests and benchmarks: random trellis weights on the host (random words are
// valid codes), their device twins, and small CUDA helpers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "backend/cuda/trellis_kernels.h"
#include "core/half.h"
#include "core/rng.h"
#include "quant/trellis_weight.h"

#define TT_CHECK(expr)                                                                          \
  do {                                                                                          \
    cudaError_t e_ = (expr);                                                                    \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, #expr); \
      std::abort();                                                                             \
    }                                                                                           \
  } while (0)

namespace trellm::testing {

inline bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* dev_upload(const std::vector<T>& h) {
  T* d = nullptr;
  TT_CHECK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  TT_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> dev_download(const T* d, size_t n) {
  std::vector<T> h(n);
  TT_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// A random trellis weight (host buffers owned here) and its device copy.
struct RandomTrellis {
  std::vector<uint16_t> trel, suh, svh;
  std::vector<float> bias;
  trellis::TrellisWeight host;
  cuda::DeviceTrellis dev{};
  std::vector<void*> dptrs;

  RandomTrellis(Rng& rng, int in, int out, int K, int cb, bool with_bias, bool upload = true) {
    const int inp = (in + 127) / 128 * 128, outp = (out + 127) / 128 * 128;
    trel.resize(size_t(inp / 16) * (outp / 16) * 16 * K);
    for (auto& v : trel) v = uint16_t(rng.next_u32());
    suh.resize(inp);
    svh.resize(outp);
    // Magnitudes like a real checkpoint's: suh ~ rowRMS/1.24, svh ~ column scale, random signs.
    for (auto& v : suh) v = f32_to_f16((rng.uniform() < 0.5f ? -1.0f : 1.0f) * rng.uniform(0.02f, 0.08f));
    for (auto& v : svh) v = f32_to_f16((rng.uniform() < 0.5f ? -1.0f : 1.0f) * rng.uniform(0.5f, 1.5f));
    host.key = "random";
    host.K = K;
    host.codebook = trellis::Codebook(cb);
    host.in = in, host.out = out, host.in_padded = inp, host.out_padded = outp;
    host.trellis = trel.data(), host.suh = suh.data(), host.svh = svh.data();
    if (with_bias) {
      bias.resize(out);
      for (auto& v : bias) v = rng.normal();
      host.bias = TensorView(bias.data(), DType::F32, {int64_t(out)});
    }
    dev.K = K, dev.codebook = cb, dev.in = in, dev.out = out, dev.in_padded = inp, dev.out_padded = outp;
    if (upload) {
      dev.trellis = track(dev_upload(trel));
      dev.suh = track(dev_upload(suh));
      dev.svh = track(dev_upload(svh));
      dev.bias = with_bias ? track(dev_upload(bias)) : nullptr;
    }
  }
  ~RandomTrellis() {
    for (void* p : dptrs) cudaFree(p);
  }
  RandomTrellis(const RandomTrellis&) = delete;
  RandomTrellis& operator=(const RandomTrellis&) = delete;

 private:
  template <typename T>
  T* track(T* p) {
    dptrs.push_back(const_cast<void*>(static_cast<const void*>(p)));
    return p;
  }
};

}  // namespace trellm::testing
