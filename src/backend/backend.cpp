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

void Backend::kernel_clocks_begin(size_t) {
  fail("kernel clocks: the ", name(), " backend has none (they need CUDA and a build configured with -DTRELLM_KERNEL_CLOCKS=ON)");
}
KernelClocks Backend::kernel_clocks_end() { fail("kernel clocks: the ", name(), " backend has none"); }

std::unique_ptr<StepGraph> Backend::capture(const std::function<void()>& step) { return std::make_unique<DirectStep>(step); }

bool cuda_available() {
#ifdef TRELLM_HAVE_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

const char* mla_prefill_name(CudaOptions::MlaPrefill m) {
  switch (m) {
    case CudaOptions::MlaPrefill::Auto: return "auto";
    case CudaOptions::MlaPrefill::Absorbed: return "absorbed";
    case CudaOptions::MlaPrefill::Expanded: return "expanded";
  }
  TRELLM_ASSERT(false, "MlaPrefill ", int(m));
  return "";
}

CudaOptions::MlaPrefill parse_mla_prefill(const std::string& s, const std::string& where) {
  for (auto m : {CudaOptions::MlaPrefill::Auto, CudaOptions::MlaPrefill::Absorbed, CudaOptions::MlaPrefill::Expanded})
    if (s == mla_prefill_name(m)) return m;
  fail(where, " ", s, ": expected auto, absorbed or expanded");
}

std::string CudaOptions::describe() const {
  return mla_prefill == MlaPrefill::Auto ? "" : str_cat("mla prefill ", mla_prefill_name(mla_prefill));
}

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaOptions& options) {
#ifdef TRELLM_HAVE_CUDA
  return std::make_unique<CudaBackend>(device, options);
#else
  (void)options;
  fail("this trellm was built without CUDA (configure with nvcc on the PATH, or -DTRELLM_CUDA=ON)");
#endif
}

int64_t SpecVerify::sequences() const {
  const int64_t m = params.nbytes() / int64_t(sizeof(SamplingParams)), V = target.cols();
  TRELLM_ASSERT(K >= 0 && m >= 1 && params.nbytes() == size_t(m) * sizeof(SamplingParams) && target.dtype == DType::F32 &&
                    target.rows() == m * (K + 1) && tokens.numel() == m * (K + 1) && steps.numel() == m &&
                    out.numel() == m * (K + 2) && (K == 0 || (src.numel() == m && draft.cols() == V)),
                "spec_verify: ", m, " sequences of ", K, " drafts, target ", shape_str(target), " draft ", shape_str(draft));
  return m;
}

int64_t SpecPrepare::sequences() const {
  const int64_t m = steps.numel();
  TRELLM_ASSERT(K >= 1 && j >= 0 && j < K && result.numel() == m * (K + 2) && base.numel() >= m && steps_out.numel() >= m,
                "spec_prepare: ", m, " sequences, K ", K, ", step ", j);
  return m;
}

}  // namespace trellm
