#include <cxxabi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernel_clocks.cuh"
#include "backend/cuda/kernel_clocks.h"
#include "core/error.h"

namespace trellm::cuda::clocks {

static_assert(sizeof(ClockRecord) == sizeof(Record), "the host and device records must agree");

namespace {
bool g_live = false;

#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
std::vector<SinkSetter>& setters() {
  static std::vector<SinkSetter> v;  // filled during static initialisation, read after main starts
  return v;
}
void set_all(const Sink& s) {
  for (SinkSetter set : setters()) TRELLM_CUDA_CHECK(set(s));
}
#endif
}  // namespace

#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
int register_sink_setter(SinkSetter set) {
  setters().push_back(set);
  return 0;
}
bool built() { return true; }
#else
bool built() { return false; }
#endif

Recorder::Recorder(size_t max_records) : cap_(max_records) {
  if (!built()) fail("kernel clocks: this build has none (configure with -DTRELLM_KERNEL_CLOCKS=ON)");
  if (g_live) fail("kernel clocks: a recorder is already live");
  if (max_records == 0 || max_records > (1u << 30)) fail("kernel clocks: ", max_records, " records asked for (1 .. 2^30)");
  TRELLM_CUDA_CHECK(cudaMalloc(&rec_, max_records * sizeof(Record)));
  TRELLM_CUDA_CHECK(cudaMalloc(&count_, sizeof(unsigned)));
  TRELLM_CUDA_CHECK(cudaMemset(count_, 0, sizeof(unsigned)));
  TRELLM_CUDA_CHECK(cudaDeviceSynchronize());
#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
  set_all(Sink{static_cast<Record*>(rec_), count_, unsigned(max_records)});
#endif
  g_live = live_ = true;
}

std::vector<ClockRecord> Recorder::collect(uint64_t* dropped) {
  TRELLM_ASSERT(live_, "kernel clocks: collect() twice");
  TRELLM_CUDA_CHECK(cudaDeviceSynchronize());
#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
  set_all(Sink{nullptr, nullptr, 0});
#endif
  unsigned n = 0;
  TRELLM_CUDA_CHECK(cudaMemcpy(&n, count_, sizeof n, cudaMemcpyDeviceToHost));
  std::vector<ClockRecord> out(std::min<size_t>(n, cap_));
  TRELLM_CUDA_CHECK(cudaMemcpy(out.data(), rec_, out.size() * sizeof(Record), cudaMemcpyDeviceToHost));
  if (dropped) *dropped = n - out.size();
  live_ = g_live = false;
  return out;
}

Recorder::~Recorder() {
  if (live_) {
    cudaDeviceSynchronize();
#if defined(TRELLM_KERNEL_CLOCKS) && TRELLM_KERNEL_CLOCKS
    for (SinkSetter set : setters()) set(Sink{nullptr, nullptr, 0});
#endif
    g_live = false;
  }
  cudaFree(rec_);
  cudaFree(count_);
}

std::vector<GraphKernel> graph_kernels(cudaGraph_t g) {
  size_t nn = 0, ne = 0;
  TRELLM_CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &nn));
  std::vector<cudaGraphNode_t> nodes(nn);
  TRELLM_CUDA_CHECK(cudaGraphGetNodes(g, nodes.data(), &nn));
  TRELLM_CUDA_CHECK(cudaGraphGetEdges(g, nullptr, nullptr, nullptr, &ne));
  std::vector<cudaGraphNode_t> from(ne), to(ne);
  std::vector<cudaGraphEdgeData> data(ne);  // PDL edges carry data: a query without it is refused as lossy
  TRELLM_CUDA_CHECK(cudaGraphGetEdges(g, from.data(), to.data(), data.data(), &ne));
  std::unordered_map<cudaGraphNode_t, size_t> idx;
  for (size_t i = 0; i < nn; i++) idx[nodes[i]] = i;
  std::vector<int> indeg(nn, 0);
  std::vector<std::vector<size_t>> next(nn);
  for (size_t e = 0; e < ne; e++) {
    next[idx.at(from[e])].push_back(idx.at(to[e]));
    indeg[idx.at(to[e])]++;
  }
  // Kahn's order, always the lowest ready index first: a captured single-stream step is a chain.
  std::vector<size_t> ready, order;
  for (size_t i = 0; i < nn; i++)
    if (indeg[i] == 0) ready.push_back(i);
  while (!ready.empty()) {
    auto it = std::min_element(ready.begin(), ready.end());
    const size_t i = *it;
    ready.erase(it);
    order.push_back(i);
    for (size_t j : next[i])
      if (--indeg[j] == 0) ready.push_back(j);
  }
  std::vector<GraphKernel> out;
  for (size_t i : order) {
    cudaGraphNodeType type;
    TRELLM_CUDA_CHECK(cudaGraphNodeGetType(nodes[i], &type));
    if (type != cudaGraphNodeTypeKernel) continue;
    cudaKernelNodeParams p = {};
    if (cudaGraphKernelNodeGetParams(nodes[i], &p) != cudaSuccess) {  // a driver-API launch (a library's kernel)
      cudaGetLastError();
      out.push_back(GraphKernel{"?", INT64_MAX});
      continue;
    }
    const char* raw = nullptr;
    std::string name = "?";
    if (cudaFuncGetName(&raw, p.func) == cudaSuccess && raw) {
      int status = 0;
      char* dm = abi::__cxa_demangle(raw, nullptr, nullptr, &status);
      name = short_kernel_name(status == 0 && dm ? dm : raw);
      std::free(dm);
    } else {
      cudaGetLastError();  // a library's kernel (cuBLAS): no runtime name
    }
    out.push_back(GraphKernel{name, int64_t(p.gridDim.x) * p.gridDim.y * p.gridDim.z});
  }
  return out;
}

}  // namespace trellm::cuda::clocks
