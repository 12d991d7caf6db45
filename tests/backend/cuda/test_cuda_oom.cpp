// Running out of GPU memory (issue 17): loading weights that do not fit, a KV cache larger than what is left, and a
// prompt longer than the cache each end in an Error whose message gives the numbers, and leave the process able to
// go on — after the memory is back, the same model loads and serves.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <regex>

#include "core/error.h"
#include "model/glm4_moe_lite.h"
#include "runtime/engine.h"

using namespace trellm;

namespace {

const std::string kModel = std::string(TRELLM_MODELS_DIR) + "/tiny-glm-3bit";

// Occupies all but `leave` bytes of the GPU's free memory until destroyed.
struct Balloon {
  std::vector<void*> held;
  explicit Balloon(size_t leave) {
    size_t free_b = 0, total_b = 0;
    EXPECT_EQ(cudaMemGetInfo(&free_b, &total_b), cudaSuccess);
    // Several pieces (one allocation may not take everything that is free).
    for (size_t piece = size_t(1) << 34; piece >= (size_t(1) << 20); piece /= 2) {
      while (true) {
        EXPECT_EQ(cudaMemGetInfo(&free_b, &total_b), cudaSuccess);
        if (free_b < leave + piece) break;
        void* p = nullptr;
        if (cudaMalloc(&p, piece) != cudaSuccess) {
          cudaGetLastError();
          break;
        }
        held.push_back(p);
      }
    }
  }
  ~Balloon() {
    for (void* p : held) cudaFree(p);
  }
};

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::vector<int32_t> greedy(Engine& e, std::vector<int32_t> prompt, int n) {
  GenParams p;
  p.sampling.temperature = 0;
  p.max_tokens = n;
  p.ignore_eos = true;
  auto r = e.submit(std::move(prompt), p);
  e.run_until_idle();
  std::vector<int32_t> out;
  for (const auto& t : r->wait_all()) out.push_back(t.id);
  EXPECT_EQ(r->error(), "");
  return out;
}

}  // namespace

TEST(CudaOutOfMemory, WeightsKvCacheAndLongPromptGiveTheNumbers) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto gpu = make_cuda_backend(0);
  {
    Balloon b(size_t(2) << 20);  // 2 MiB left: the 10 MB checkpoint cannot be placed
    const std::string msg = message_of([&] { Model::load(kModel, *gpu); });
    EXPECT_TRUE(std::regex_search(msg, std::regex("tiny-glm-3bit: the weights do not fit on cuda:0.*: [0-9]+ MiB placed "
                                                  "of a [0-9]+ MiB checkpoint when out of GPU memory: need [0-9]+ MiB "
                                                  "more but [0-9]+ MiB of [0-9]+ MiB are free; quantize to fewer bits")))
        << msg;
  }
  auto m = Model::load(kModel, *gpu);  // the failed load gave its memory back
  EngineOptions o;
  o.context = 512;
  o.kv_memory_gb = 4e3;  // 4 TB
  const std::string kv = message_of([&] { Engine e(*m, o); });
  EXPECT_TRUE(std::regex_search(kv, std::regex("the KV cache of [0-9]+ blocks x 64 tokens x 8 layers \\([0-9.e+]+ GB "
                                               "[A-Z0-9]+\\) does not fit: out of GPU memory: need [0-9]+ MiB more but "
                                               "[0-9]+ MiB of [0-9]+ MiB are free; lower --kv-memory")))
      << kv;
  // What the failed cache had allocated is free again: a cache of nearly all the memory fits now.
  const auto [used, total] = gpu->memory_used_total();
  o.kv_memory_gb = 0.8 * double(total - used) / 1e9;
  Engine big(*m, o);
  EXPECT_EQ(greedy(big, {1, 2, 3}, 4).size(), 4u);

  GenParams p;
  p.max_tokens = 8;
  const std::string lp = message_of([&] { big.submit(std::vector<int32_t>(600, 7), p); });
  EXPECT_NE(lp.find("the prompt (600 tokens) plus max_tokens (8) is 608 tokens, more than the context of 512"),
            std::string::npos) << lp;
  // A cache smaller than the context caps it: a prompt longer than the whole cache is refused with its size.
  o.kv_memory_gb = 0;
  o.kv_blocks = 2;
  Engine small(*m, o);
  const std::string lc = message_of([&] { small.submit(std::vector<int32_t>(300, 7), p); });
  EXPECT_NE(lc.find("the request needs 308 tokens of KV cache (prompt 300 + max_tokens 8) but the whole cache holds "
                    "128 tokens (2 blocks of 64)"), std::string::npos) << lc;
  EXPECT_EQ(greedy(small, {1, 2, 3}, 4).size(), 4u);  // and both engines serve on
  EXPECT_EQ(greedy(big, {4, 5}, 3).size(), 3u);
}
