#include "backend/backend.h"

#include "core/error.h"

#include <chrono>

#ifdef TRELLM_HAVE_CUDA
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#endif

namespace trellm {

namespace {
class DirectStep final : public StepGraph {
 public:
  explicit DirectStep(std::function<void()> f) : f_(std::move(f)) {}
  void launch() override { f_(); }

 private:
  std::function<void()> f_;
};
}  // namespace

// Host-clock events for backends without their own (synchronising first so the times mean something).
int Backend::record_event() {
  synchronize();
  host_events_.push_back(std::chrono::steady_clock::now());
  return int(host_events_.size()) - 1;
}
double Backend::elapsed_ms(int from, int to) {
  return std::chrono::duration<double, std::milli>(host_events_.at(size_t(to)) - host_events_.at(size_t(from))).count();
}

std::unique_ptr<StepGraph> Backend::capture(const std::function<void()>& step) { return std::make_unique<DirectStep>(step); }

bool cuda_available() {
#ifdef TRELLM_HAVE_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
#ifdef TRELLM_HAVE_CUDA
  return std::make_unique<CudaBackend>(device);
#else
  fail("this trellm was built without CUDA (configure with nvcc on the PATH, or -DTRELLM_CUDA=ON)");
#endif
}

}  // namespace trellm
