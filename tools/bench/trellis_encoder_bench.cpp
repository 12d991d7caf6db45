// Trellis encoder benchmark: i.i.d. N(0,1) MSE at the scale the encoder's own search picks, for every K and
// codebook, and encode speed (tiles/s) of the CPU tail-biting Viterbi. Prints a markdown table and one JSON
// line per configuration (for bench/results/trellis_encoder.{md,jsonl}).
//
//   trellis_encoder_bench [--tiles N] [--kmax K] [--threads T] [--seed S] [--json FILE]
//   trellis_encoder_bench --cuda [--tiles N] [--kmax K] [--json FILE]    GPU Viterbi speed (tiles/s, median of 3 calls of N tiles)
//                                                          and agreement with the CPU; use N >= 4096 on a big GPU
#include <algorithm>
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
#include "quant/trellis_viterbi_cuda.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// The JSON lines after the table, on stdout and appended to `path` when given.
int emit(const std::vector<std::string>& json, const char* path) {
  for (auto& l : json) std::printf("%s\n", l.c_str());
  if (!path) return 0;
  FILE* f = std::fopen(path, "a");
  if (!f) {
    std::fprintf(stderr, "--json %s: cannot open for appending\n", path);
    return 1;
  }
  for (auto& l : json) std::fprintf(f, "%s\n", l.c_str());
  return std::fclose(f) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t tiles = 256;
  int kmax = 8, threads = 0;
  uint64_t seed = 1;
  bool cuda = false;
  const char* json_path = nullptr;  // --json FILE: the JSON lines are appended there too
  for (int i = 1; i < argc; i++)
    if (!std::strcmp(argv[i], "--cuda")) {
      cuda = true;
      for (int j = i; j + 1 < argc; j++) argv[j] = argv[j + 1];
      argc--;
      break;
    }
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tiles")) tiles = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--kmax")) kmax = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--seed")) seed = std::strtoull(argv[i + 1], nullptr, 10);
    else if (!std::strcmp(argv[i], "--json")) json_path = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 1;
    }
  }
  if (threads > 0) ThreadPool::set_global_threads(threads);
  if (cuda) {
    // GPU speed: tiles of i.i.d. N(0,1)*1.1 (speed does not depend on the values); a warm-up call, then `reps` timed
    // calls of all `tiles` tiles (host<->device copies included: what the encoder sees), median reported.
    // Agreement: the states of the first 8 tiles against the CPU encoder. K = 2..6 run the fast kernels, K = 1, 7, 8
    // the generic one (trellis_viterbi.cu).
    if (!viterbi_cuda_available()) {
      std::fprintf(stderr, "no CUDA device\n");
      return 1;
    }
    const int reps = 3;
    std::printf("| K | codebook | kernel | tiles | GPU tiles/s (median of %d) | states equal to the CPU's (first 8 tiles) |\n"
                "|---|---|---|---|---|---|\n", reps);
    std::vector<std::string> json;
    for (int K = 1; K <= kmax; K++)
      for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1}) {
        Rng rng(seed * 100 + K);
        std::vector<float> w(size_t(tiles) * 256), recon(w.size()), rc(8 * 256);
        std::vector<uint16_t> states(w.size()), sc(8 * 256);
        for (auto& v : w) v = rng.normal() * 1.1f;
        viterbi_encode_tiles_cuda(w.data(), tiles, K, cb, states.data(), recon.data());  // warm-up: scratch grown
        std::vector<double> secs;
        for (int r = 0; r < reps; r++) {
          const auto t0 = std::chrono::steady_clock::now();
          viterbi_encode_tiles_cuda(w.data(), tiles, K, cb, states.data(), recon.data());
          secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(secs.begin(), secs.end());
        const double tps = double(tiles) / secs[secs.size() / 2];
        viterbi_encode_tiles(w.data(), std::min<int64_t>(tiles, 8), K, cb, sc.data(), rc.data());
        const bool same = std::equal(sc.begin(), sc.begin() + std::min<int64_t>(tiles, 8) * 256, states.begin());
        const char* kernel = K >= 2 && K <= 6 ? "fast" : "generic";
        std::printf("| %d | %s | %s | %lld | %.0f | %s |\n", K, codebook_name(cb), kernel, (long long)tiles, tps,
                    same ? "yes" : "NO");
        std::fflush(stdout);
        char line[256];
        std::snprintf(line, sizeof line,
                      "{\"K\": %d, \"codebook\": \"%s\", \"kernel\": \"%s\", \"tiles\": %lld, \"gpu_tiles_per_s\": %.1f, "
                      "\"equal_to_cpu\": %s}",
                      K, codebook_name(cb), kernel, (long long)tiles, tps, same ? "true" : "false");
        json.push_back(line);
      }
    return emit(json, json_path);
  }
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
  return emit(json, json_path);
}
