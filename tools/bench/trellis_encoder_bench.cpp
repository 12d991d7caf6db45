// Trellis encoder benchmark: i.i.d. N(0,1) MSE at the scale the encoder's own search picks, for every K and
// codebook, and encode speed (tiles/s) of the CPU tail-biting Viterbi. Prints a markdown table and one JSON
// line per configuration (for bench/results/trellis_encoder.{md,jsonl}).
//
//   trellis_encoder_bench [--tiles N] [--kmax K] [--threads T] [--seed S]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/thread_pool.h"
#include "quant/trellis_encode.h"
#include "quant/trellis_viterbi.h"

using namespace trellm;
using namespace trellm::trellis;

int main(int argc, char** argv) {
  int64_t tiles = 256;
  int kmax = 8, threads = 0;
  uint64_t seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tiles")) tiles = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--kmax")) kmax = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--seed")) seed = std::strtoull(argv[i + 1], nullptr, 10);
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 1;
    }
  }
  if (threads > 0) ThreadPool::set_global_threads(threads);
  const int nthreads = ThreadPool::global().size();
  // a k x n matrix of `tiles` tiles: 16 tile rows
  const int64_t k = 16 * kTileDim, n = tiles / 16 * kTileDim;
  std::printf("| K | codebook | MSE | g | encode tiles/s (%d threads) |\n|---|---|---|---|---|\n", nthreads);
  std::vector<std::string> json;
  for (int K = 1; K <= kmax; K++)
    for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1}) {
      Rng rng(seed * 100 + K);
      std::vector<float> w(size_t(k * n)), scaled(w.size()), recon(w.size());
      std::vector<uint16_t> states(w.size());
      for (auto& v : w) v = rng.normal();
      const float g = global_scale_search(w.data(), k, n, K, cb);
      for (size_t i = 0; i < w.size(); i++) scaled[i] = w[i] * g;
      const auto t0 = std::chrono::steady_clock::now();
      quantize_plain(scaled.data(), k, n, K, cb, states.data(), recon.data());
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double mse = 0;
      for (size_t i = 0; i < w.size(); i++) mse += std::pow(double(recon[i]) / g - w[i], 2);
      mse /= double(w.size());
      const double tps = double(k / 16 * n / 16) / sec;
      std::printf("| %d | %s | %.5g | %.3f | %.0f |\n", K, codebook_name(cb), mse, g, tps);
      std::fflush(stdout);
      char line[256];
      std::snprintf(line, sizeof line,
                    "{\"K\": %d, \"codebook\": \"%s\", \"tiles\": %lld, \"mse\": %.6g, \"g\": %.4f, \"tiles_per_s\": %.1f, "
                    "\"threads\": %d}",
                    K, codebook_name(cb), (long long)(k / 16 * n / 16), mse, g, tps, nthreads);
      json.push_back(line);
    }
  for (auto& l : json) std::printf("%s\n", l.c_str());
  return 0;
}
