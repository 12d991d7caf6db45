#include "backend/cuda/step_runner.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <atomic>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/trellis_linear.cuh"
#include "backend/cuda/trellis_plan.h"
#include "core/error.h"

namespace trellm::cuda {

namespace {

struct DevStatus {
  unsigned bad;
  int bad_tile, bad_producer;
  int to_worker, to_tile, to_counter;
  unsigned to_value;
  int abort;  // a worker gave up: the others stop waiting too, so the launch ends
};
constexpr DevStatus kClean = {0, -1, -1, -1, -1, -1, 0, 0};

struct Args {
  const int32_t *sm_begin, *sm_tiles, *dep_begin, *deps, *tile_counter, *arrivals, *tile_desc;
  const int32_t *cnt_begin, *cnt_tiles;  // counter c's producer tiles: cnt_tiles[cnt_begin[c] .. cnt_begin[c + 1])
  uint32_t* counters;
  uint32_t* stamps;  // per tile: stamp_of(step, tile) once it ran (check mode)
  DevStatus* st;
  RunnerTileClock* clk;  // per tile, or nullptr
  uint32_t step;
  uint64_t timeout_ns;
};

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint32_t ld_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Distinct for every step of a tile (1,000,003 is odd, so invertible mod 2^32) and never 0 at step 0.
__host__ __device__ __forceinline__ uint32_t stamp_of(uint32_t step, int tile) { return step * 1000003u + uint32_t(tile) + 1u; }

// The tiles' bodies. Each is called by all threads of the worker's block with the tile's number and a `wait`
// that it must call exactly once, after what it may do before its producers are done (its weight loads) and
// before anything that reads their outputs.
struct EmptyBody {
  template <typename Wait>
  __device__ void operator()(const Args&, int, unsigned char*, Wait wait) const { wait(); }
};
// Check mode: plain loads, so the acquire must make the producers' stores visible to every thread.
struct CheckBody {
  template <typename Wait>
  __device__ void operator()(const Args& a, int i, unsigned char*, Wait wait) const {
    wait();
    for (int d = a.dep_begin[i]; d < a.dep_begin[i + 1]; d++) {
      const int c = a.deps[d];
      for (int q = a.cnt_begin[c] + int(threadIdx.x); q < a.cnt_begin[c + 1]; q += int(blockDim.x)) {
        const int p = a.cnt_tiles[q];
        if (a.stamps[p] != stamp_of(a.step, p) && atomicAdd(&a.st->bad, 1u) == 0) a.st->bad_tile = i, a.st->bad_producer = p;
      }
    }
    if (threadIdx.x == 0) a.stamps[i] = stamp_of(a.step, i);
  }
};
// Every tile a GEMV tile of one of a chain's trellis linears (tile_desc: stage as the layer, group, split), K
// bits: the persistent form of gemv_kernel, the same arithmetic (tk::gemv_tile).
// The stages' arguments live in device memory (a chain may be longer than the kernel parameters hold).
template <int K>
struct GemvBody {
  const tk::LinearArgs* la;
  template <typename Wait>
  __device__ void operator()(const Args& a, int i, unsigned char* smem, Wait wait) const {
    tk::gemv_tile<K>(la[a.tile_desc[4 * i + 1]], a.tile_desc[4 * i + 2], a.tile_desc[4 * i + 3], smem, wait);
  }
};

// kFences: a full fence (__threadfence) after the waits and before the release, on top of the acquire loads and
// the release reduction (which already order the block's accesses: bar.sync makes them the releasing thread's
// predecessors). Kept as the A/B baseline: TRELLM_RUNNER_FENCES=1.
// kPerSm: workers (blocks) per SM the launch bounds allow for (1 to 4), so that several tiles' latencies
// overlap on an SM, as several CTAs of a kernel do.
template <bool kFences, int kPerSm, typename Body>
__global__ void __launch_bounds__(256, kPerSm) step_runner_kernel(const Args a, const Body body) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int abort_s;
  clocks::mark_unrecorded();  // its tiles' kernel-clock marks (gemv_tile) have no launch record here
  const int w = blockIdx.x;
  for (int k = a.sm_begin[w]; k < a.sm_begin[w + 1]; k++) {
    const int i = a.sm_tiles[k];
    const uint64_t t_free = a.clk && threadIdx.x == 0 ? now_ns() : 0;
    uint64_t t_ready = 0;
    if (threadIdx.x == 0) abort_s = 0;
    __syncthreads();
    // Wait: a thread per counter (a tile waits for at most a few hundred). A worker that gives up leaves the
    // launch: every thread of the block exits here, the abort flag releases the other workers.
    auto wait = [&] {
      for (int d = a.dep_begin[i] + int(threadIdx.x); d < a.dep_begin[i + 1]; d += int(blockDim.x)) {
        const int c = a.deps[d];
        const uint32_t target = step::counter_target(a.step, uint32_t(a.arrivals[c]));
        uint32_t v;
        uint64_t t0 = 0;
        for (int n = 1; !step::counter_reached(v = ld_acquire(a.counters + c), target); n++) {
          if ((n & 255) != 0) continue;  // the timer every 256 polls
          const uint64_t t = now_ns();
          if (t0 == 0) t0 = t;
          if (t - t0 > a.timeout_ns || *reinterpret_cast<volatile int*>(&a.st->abort)) {
            if (atomicCAS(&a.st->to_worker, -1, w) == -1) a.st->to_tile = i, a.st->to_counter = c, a.st->to_value = v;
            atomicExch(&a.st->abort, 1);
            abort_s = 1;
            break;
          }
        }
      }
      if (kFences) __threadfence();
      __syncthreads();
      if (abort_s) asm volatile("exit;");
      if (a.clk && threadIdx.x == 0) t_ready = now_ns();
    };
    body(a, i, smem, wait);
    __syncthreads();  // every thread's stores, then one release for the block
    if (threadIdx.x == 0) {
      if (a.clk) a.clk[i] = RunnerTileClock{t_free, t_ready, now_ns()};  // before the release: causally first
      if (kFences) __threadfence();
      red_release(a.counters + a.tile_counter[i], 1u);
    }
  }
}

template <int kPerSm, typename Body>
void launch_runner_n(const Args& a, int workers, const Body& body, size_t smem, cudaStream_t s) {
  static const bool fences = [] {
    const char* e = std::getenv("TRELLM_RUNNER_FENCES");
    return e && std::strcmp(e, "1") == 0;
  }();
  static std::atomic<bool> opted{false};
  if (!opted.exchange(true)) {
    const int most = 227 * 1024 / kPerSm - 2048;  // of the SM's 228 KB: the blocks' reserved 1 KB, static smem
    TRELLM_CUDA_CHECK(cudaFuncSetAttribute(step_runner_kernel<true, kPerSm, Body>, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
    TRELLM_CUDA_CHECK(cudaFuncSetAttribute(step_runner_kernel<false, kPerSm, Body>, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(workers));
  cfg.blockDim = dim3(256);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = fences ? cudaLaunchKernelEx(&cfg, step_runner_kernel<true, kPerSm, Body>, a, body)
                              : cudaLaunchKernelEx(&cfg, step_runner_kernel<false, kPerSm, Body>, a, body);
  if (e == cudaErrorCooperativeLaunchTooLarge)
    fail("step runner: ", workers, " workers of ", smem, " B shared memory each (", kPerSm,
         " a SM) do not fit the device at once; a plan with fewer workers, or less shared memory per tile");
  TRELLM_CUDA_CHECK(e);
}

// Workers per SM for `workers` blocks: 1 to 4.
int per_sm_for(int workers) {
  const int sms = tk::sm_count();
  return std::clamp((workers + sms - 1) / sms, 1, 4);
}

template <typename Body>
void launch_runner(const Args& a, int workers, const Body& body, size_t smem, cudaStream_t s) {
  switch (per_sm_for(workers)) {
    case 1: return launch_runner_n<1>(a, workers, body, smem, s);
    case 2: return launch_runner_n<2>(a, workers, body, smem, s);
    case 3: return launch_runner_n<3>(a, workers, body, smem, s);
    default: return launch_runner_n<4>(a, workers, body, smem, s);
  }
}

template <typename T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  TRELLM_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) TRELLM_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

}  // namespace

struct StepRunner::Device {
  std::vector<int32_t*> arrays;
  Args a{};
  size_t tiles = 0, counters = 0;
  int workers = 0;
  // What la_dev holds, for the stages and m it was made from (uploaded again only when they change).
  std::vector<GemvStage> gemv_stages;
  int gemv_m = 0;
  size_t la_cap = 0;
  tk::LinearArgs* la_dev = nullptr;
  int decode_ahead = 0;
};

StepRunner::StepRunner(const step::StepPlan& plan, Mode mode, double timeout_ms)
    : d_(new Device), plan_(plan), mode_(mode), timeout_ns_(uint64_t(timeout_ms * 1e6)) {
  const step::StepLists f = step::flatten(plan);
  d_->tiles = plan.tiles.size();
  d_->counters = size_t(plan.counters());
  d_->workers = int(plan.per_sm.size());
  if (d_->workers < 1 || d_->tiles == 0) fail("step runner: a plan with ", d_->workers, " workers and ", d_->tiles, " tiles");
  // Counter -> its producer tiles (check mode reads every producer's stamp).
  std::vector<int32_t> cnt_begin(d_->counters + 1, 0), cnt_tiles(d_->tiles);
  for (int32_t c : f.tile_counter) cnt_begin[size_t(c) + 1]++;
  for (size_t c = 0; c < d_->counters; c++) cnt_begin[c + 1] += cnt_begin[c];
  std::vector<int32_t> fill(cnt_begin.begin(), cnt_begin.end() - 1);
  for (size_t i = 0; i < d_->tiles; i++) cnt_tiles[size_t(fill[size_t(f.tile_counter[i])]++)] = int32_t(i);
  auto up = [&](const std::vector<int32_t>& v) {
    d_->arrays.push_back(upload(v));
    return d_->arrays.back();
  };
  Args& a = d_->a;
  a.sm_begin = up(f.sm_begin), a.sm_tiles = up(f.sm_tiles), a.dep_begin = up(f.dep_begin), a.deps = up(f.deps);
  a.tile_counter = up(f.tile_counter), a.arrivals = up(f.arrivals), a.cnt_begin = up(cnt_begin), a.cnt_tiles = up(cnt_tiles);
  a.tile_desc = up(f.tile_desc);
  TRELLM_CUDA_CHECK(cudaMalloc(&a.counters, d_->counters * 4));
  TRELLM_CUDA_CHECK(cudaMalloc(&a.stamps, d_->tiles * 4));
  TRELLM_CUDA_CHECK(cudaMalloc(&a.st, sizeof(DevStatus)));
  TRELLM_CUDA_CHECK(cudaMalloc(&a.clk, d_->tiles * sizeof(RunnerTileClock)));
  TRELLM_CUDA_CHECK(cudaMemset(a.stamps, 0, d_->tiles * 4));
  TRELLM_CUDA_CHECK(cudaMemcpy(a.st, &kClean, sizeof kClean, cudaMemcpyHostToDevice));
  a.timeout_ns = timeout_ns_;
  start_at(0);
  int dev = 0, coop = 0;
  TRELLM_CUDA_CHECK(cudaGetDevice(&dev));
  TRELLM_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
  if (!coop) fail("step runner: this device has no cooperative launch (every worker must be resident)");
  const int sms = tk::sm_count();
  if (d_->workers > 4 * sms)
    fail("step runner: the plan has ", d_->workers, " workers, at most 4 a SM run at once (", 4 * sms, " on this device)");
}

StepRunner::~StepRunner() {
  cudaDeviceSynchronize();
  for (int32_t* p : d_->arrays) cudaFree(p);
  cudaFree(d_->a.counters);
  cudaFree(d_->a.stamps);
  cudaFree(d_->a.st);
  cudaFree(d_->a.clk);
  cudaFree(d_->la_dev);
  delete d_;
}

void StepRunner::start_at(uint32_t step) {
  std::vector<uint32_t> c(d_->counters);
  for (size_t i = 0; i < c.size(); i++) c[i] = step * uint32_t(plan_.counter_info[i].arrivals);  // mod 2^32
  TRELLM_CUDA_CHECK(cudaMemcpy(d_->a.counters, c.data(), c.size() * 4, cudaMemcpyHostToDevice));
}

void StepRunner::set_decode_ahead(int tiles) {
  TRELLM_ASSERT(tiles >= 0 && tiles <= tk::kMaxDecodeAhead, "step runner: ", tiles, " k tiles decoded ahead (0 to ",
                tk::kMaxDecodeAhead, ")");
  d_->decode_ahead = tiles;
  d_->gemv_stages.clear();  // the stages' arguments hold it
}

void StepRunner::launch(uint32_t step, cudaStream_t s, bool clocks) {
  Args a = d_->a;
  a.step = step;
  if (!clocks) a.clk = nullptr;
  if (mode_ == Mode::Check) launch_runner(a, d_->workers, CheckBody{}, 0, s);
  else launch_runner(a, d_->workers, EmptyBody{}, 0, s);
}

void StepRunner::launch_gemvs(uint32_t step, const std::vector<GemvStage>& stages, int m, cudaStream_t s, bool clocks) {
  TRELLM_ASSERT(!stages.empty() && int(stages.size()) <= kMaxGemvStages, "step runner: ", stages.size(), " GEMV stages (1 to ",
                kMaxGemvStages, ")");
  std::vector<tk::LinearArgs> la(stages.size());
  size_t smem = 0, tiles = 0;
  for (size_t i = 0; i < stages.size(); i++) {
    const GemvStage& g = stages[i];
    const DeviceTrellis& w = *g.w;
    TRELLM_ASSERT(w.K == 3, "step runner: the GEMV task is instantiated for K = 3 (the synthetic model's), not ", w.K);
    const tk::LinearPlan lp = tk::plan_linear(m, w.in_padded, w.out_padded);
    TRELLM_ASSERT(lp.gemv, "step runner: m = ", m, " is not a GEMV");
    const tk::WorkspaceLayout l = tk::linear_layout(lp, g.workspace);
    la[i] = tk::LinearArgs{w, g.x, l.xh, g.y, m, lp.splits, lp.a_pitch, l.partial, l.counters, w, g.y, lp.groups,
                                w.out_padded, g.norm_w, g.eps};
    la[i].ahead = d_->decode_ahead;
    smem = std::max(smem, size_t(tk::kStagesGemv) * 2048 * w.K + size_t(m + 1) * lp.a_pitch * 2 +
                              size_t(la[i].ahead) * tk::kDecodedTileBytes);  // as run_gemv
    tiles += size_t(lp.groups) * size_t(lp.splits);
  }
  TRELLM_ASSERT(tiles == d_->tiles, "step runner: GEMVs of ", tiles, " tiles on a plan of ", d_->tiles,
                " (gemv_plan builds the matching one)");
  auto same = [](const GemvStage& u, const GemvStage& v) {
    return u.w == v.w && u.x == v.x && u.y == v.y && u.workspace == v.workspace && u.norm_w == v.norm_w && u.eps == v.eps;
  };
  if (m != d_->gemv_m || !std::equal(stages.begin(), stages.end(), d_->gemv_stages.begin(), d_->gemv_stages.end(), same)) {
    if (d_->la_cap < la.size()) {
      TRELLM_CUDA_CHECK(cudaFree(d_->la_dev));
      TRELLM_CUDA_CHECK(cudaMalloc(&d_->la_dev, la.size() * sizeof(tk::LinearArgs)));
      d_->la_cap = la.size();
    }
    TRELLM_CUDA_CHECK(cudaMemcpyAsync(d_->la_dev, la.data(), la.size() * sizeof(tk::LinearArgs), cudaMemcpyHostToDevice, s));
    TRELLM_CUDA_CHECK(cudaStreamSynchronize(s));  // la is a local: the copy must be done before it goes
    d_->gemv_stages = stages, d_->gemv_m = m;
  }
  const GemvBody<3> body{d_->la_dev};
  Args a = d_->a;
  a.step = step;
  if (!clocks) a.clk = nullptr;
  launch_runner(a, d_->workers, body, smem, s);
}

step::StepPlan StepRunner::gemv_plan(int m, const std::vector<GemvShape>& stages, bool chained, int workers) {
  TRELLM_ASSERT(!stages.empty() && int(stages.size()) <= kMaxGemvStages, "step runner: ", stages.size(), " GEMV stages");
  step::StepPlan p;
  int prev_counter0 = 0, prev_groups = 0;
  for (int s = 0; s < int(stages.size()); s++) {
    const tk::LinearPlan lp = tk::plan_linear(m, stages[size_t(s)].in_padded, stages[size_t(s)].out_padded);
    TRELLM_ASSERT(lp.gemv, "step runner: m = ", m, " is not a GEMV");
    const int counter0 = p.counters();
    for (int g = 0; g < lp.groups; g++) p.counter_info.push_back({step::Task::AttnIn, s, g, lp.splits});
    for (int z = 0; z < lp.splits; z++) {
      // The k range of split z, in input features, as gemv_tile splits the chunks: the previous stage's column
      // groups (128 columns, one chunk each) it reads.
      const int c0 = z * lp.chunks / lp.splits, c1 = (z + 1) * lp.chunks / lp.splits;
      std::vector<int> deps;
      if (chained && s > 0) {
        const bool all = stages[size_t(s)].normed;
        for (int g = 0; g < prev_groups; g++)
          if (all || (g * tk::kGroupCols < c1 * tk::kChunk && (g + 1) * tk::kGroupCols > c0 * tk::kChunk)) deps.push_back(prev_counter0 + g);
      }
      for (int g = 0; g < lp.groups; g++) p.tiles.push_back(step::Tile{step::Task::AttnIn, s, g, z, 0, 0, 0, false, deps, counter0 + g});
    }
    prev_counter0 = counter0, prev_groups = lp.groups;
  }
  p.per_sm.resize(size_t(workers));
  for (size_t i = 0; i < p.tiles.size(); i++) p.per_sm[i % size_t(workers)].push_back(int(i));
  return p;
}

RunnerStatus StepRunner::status() {
  TRELLM_CUDA_CHECK(cudaDeviceSynchronize());
  DevStatus h;
  TRELLM_CUDA_CHECK(cudaMemcpy(&h, d_->a.st, sizeof h, cudaMemcpyDeviceToHost));
  TRELLM_CUDA_CHECK(cudaMemcpy(d_->a.st, &kClean, sizeof kClean, cudaMemcpyHostToDevice));
  RunnerStatus r;
  r.bad_stamps = h.bad, r.first_bad_tile = h.bad_tile, r.first_bad_producer = h.bad_producer;
  r.timeout_worker = h.to_worker, r.timeout_tile = h.to_tile, r.timeout_counter = h.to_counter, r.timeout_value = h.to_value;
  return r;
}

std::vector<uint32_t> StepRunner::counters() {
  TRELLM_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint32_t> c(d_->counters);
  TRELLM_CUDA_CHECK(cudaMemcpy(c.data(), d_->a.counters, c.size() * 4, cudaMemcpyDeviceToHost));
  return c;
}

std::vector<RunnerTileClock> StepRunner::tile_clocks() {
  TRELLM_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<RunnerTileClock> c(d_->tiles);
  TRELLM_CUDA_CHECK(cudaMemcpy(c.data(), d_->a.clk, c.size() * sizeof(RunnerTileClock), cudaMemcpyDeviceToHost));
  return c;
}

std::string RunnerStatus::describe(const step::StepPlan& p) const {
  std::string s;
  auto tile = [&](int i) {
    const step::Tile& t = p.tiles[size_t(i)];
    return str_cat("tile ", i, " (", step::task_name(t.task), " layer ", t.layer, " group ", t.group, " split ", t.split, ")");
  };
  if (bad_stamps) s += str_cat(bad_stamps, " stale dependencies; first: ", tile(first_bad_tile), " read ", tile(first_bad_producer), "; ");
  if (timeout_worker >= 0) {
    const step::CounterInfo& c = p.counter_info[size_t(timeout_counter)];
    s += str_cat("worker ", timeout_worker, " gave up at ", tile(timeout_tile), " waiting for ", step::task_name(c.task), " layer ",
                 c.layer, " group ", c.group, " (counter ", timeout_counter, " at ", timeout_value, ")");
  }
  return s;
}

}  // namespace trellm::cuda
