// Quantization quality on small checkpoints: quantize each model at K = 2, 3, 4, 6, 8 (every Linear, lm_head
// included, at K), with and without calibration, then compare the next-token distributions of the quantized
// model with the unquantized one over a fixed token sequence: mean KL(P_ref || P_quant) over positions and
// top-1 agreement. Prints a markdown table and one JSON line per configuration (bench/results/quantize_fixtures.*).
//
//   quantize_quality_bench [--model DIR]... [--bits 2,3,4,6,8] [--modes plain,ldlq] [--eval-tokens N]
//                          [--cal-rows R] [--cal-len L] [--no-scale-search] [--codebook mcg] [--tmp DIR]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/rng.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "model/glm4_moe_lite.h"
#include "model/glm4_moe_lite_quantize.h"
#include "runtime/metrics.h"
#include "runtime/sampler.h"

using namespace trellm;
namespace fs = std::filesystem;

namespace {

std::vector<float> all_logits(const std::string& dir, const std::vector<int32_t>& ids) {
  auto backend = make_cpu_backend();
  auto m = Model::load(dir, *backend);
  RunState rs = m->make_run_state(int(ids.size()));
  KvCache kv = m->make_kv_cache(int(ids.size()));
  m->forward(rs, kv, ids.data(), int(ids.size()), 0, true);
  const int64_t v = m->config().vocab_size;
  std::vector<float> out(size_t(ids.size()) * size_t(v));
  std::memcpy(out.data(), rs.logits.data, out.size() * sizeof(float));
  return out;
}

std::vector<int32_t> random_ids(uint64_t seed, int64_t n, int64_t vocab) {
  Rng r(seed);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& t : v) t = int32_t(r.next_u32() % uint32_t(vocab));
  return v;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) out.push_back(x);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> models;
  std::string bits = "2,3,4,6,8", modes = "plain,ldlq", codebook = "mcg", tmp = "/tmp/trellm_qq";
  int64_t eval_tokens = 64, cal_rows = 8, cal_len = 256;
  bool scale_search = true;
  for (int i = 1; i < argc; i++) {
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(std::string(argv[i]) + " needs a value");
      return argv[++i];
    };
    if (!std::strcmp(argv[i], "--model")) models.push_back(next());
    else if (!std::strcmp(argv[i], "--bits")) bits = next();
    else if (!std::strcmp(argv[i], "--modes")) modes = next();
    else if (!std::strcmp(argv[i], "--eval-tokens")) eval_tokens = std::stoll(next());
    else if (!std::strcmp(argv[i], "--cal-rows")) cal_rows = std::stoll(next());
    else if (!std::strcmp(argv[i], "--cal-len")) cal_len = std::stoll(next());
    else if (!std::strcmp(argv[i], "--codebook")) codebook = next();
    else if (!std::strcmp(argv[i], "--tmp")) tmp = next();
    else if (!std::strcmp(argv[i], "--no-scale-search")) scale_search = false;
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 1;
    }
  }
  if (models.empty()) {
    std::fprintf(stderr, "give at least one --model DIR\n");
    return 1;
  }
  std::vector<std::string> json;
  std::printf("| model | K | calibration | mean KL (nats) | median KL | max KL | top-1 agree | bpw (all Linears) | quantize s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& dir : models) {
    const Config c = Config::from_json_file((fs::path(dir) / "config.json").string());
    // Evaluation tokens and calibration rows: seeded random ids (a random-weight model has no better data).
    const std::vector<int32_t> eval = random_ids(12345, eval_tokens, c.vocab_size);
    std::vector<std::vector<int32_t>> cal;
    for (int64_t r = 0; r < cal_rows; r++) cal.push_back(random_ids(1000 + uint64_t(r), cal_len, c.vocab_size));
    const std::vector<float> ref = all_logits(dir, eval);
    for (const std::string& b : split(bits))
      for (const std::string& mode : split(modes)) {
        const int K = std::stoi(b);
        QuantizeModelOptions o;
        o.out_dir = tmp + "/" + fs::path(dir).filename().string() + "_k" + b + "_" + mode;
        fs::remove_all(o.out_dir);
        fs::remove_all(o.out_dir + ".partial");
        o.bits = K;
        o.head_bits = K;
        o.codebook = trellis::parse_codebook(codebook, "--codebook");
        o.scale_search = scale_search;
        if (mode == "ldlq") {
          o.calibration = cal;
          o.calibration_cols = cal_len;
        }
        Timer t;
        const QuantizeModelResult r = quantize_model(dir, o);
        const double secs = t.seconds();
        const std::vector<float> q = all_logits(o.out_dir, eval);
        const double kl = mean_kl_divergence(ref.data(), q.data(), eval_tokens, c.vocab_size);
        // Per position: a few large values over a small median mean routing flips (a token whose top-k experts
        // change), which scale with the error's magnitude rather than its square.
        std::vector<double> per(static_cast<size_t>(eval_tokens));
        for (int64_t p = 0; p < eval_tokens; p++)
          per[size_t(p)] = kl_divergence(ref.data() + p * c.vocab_size, q.data() + p * c.vocab_size, c.vocab_size);
        std::sort(per.begin(), per.end());
        const double median = per[per.size() / 2], worst = per.back();
        int64_t agree = 0;
        for (int64_t p = 0; p < eval_tokens; p++)
          agree += argmax(ref.data() + p * c.vocab_size, c.vocab_size) == argmax(q.data() + p * c.vocab_size, c.vocab_size);
        const std::string name = fs::path(dir).filename().string();
        std::printf("| %s | %d | %s | %.3g | %.3g | %.3g | %lld/%lld | %.3f | %.1f |\n", name.c_str(), K,
                    mode == "ldlq" ? "LDLQ" : "none (plain Viterbi)", kl, median, worst, (long long)agree, (long long)eval_tokens,
                    r.plan.all_bits, secs);
        std::fflush(stdout);
        char line[768];
        std::snprintf(line, sizeof line,
                      "{\"model\": \"%s\", \"K\": %d, \"calibration\": \"%s\", \"mean_kl\": %.6g, \"median_kl\": %.6g, "
                      "\"max_kl\": %.6g, \"top1_agree\": %.4f, "
                      "\"eval_tokens\": %lld, \"ldlq_linears\": %lld, \"plain_linears\": %lld, \"quantize_s\": %.2f, "
                      "\"threads\": %d, \"scale_search\": %s, \"codebook\": \"%s\"}",
                      name.c_str(), K, mode.c_str(), kl, median, worst, double(agree) / double(eval_tokens), (long long)eval_tokens,
                      (long long)r.ldlq, (long long)r.plain, secs, ThreadPool::global().size(),
                      scale_search ? "true" : "false", codebook.c_str());
        json.push_back(line);
        fs::remove_all(o.out_dir);
      }
  }
  for (const auto& l : json) std::printf("%s\n", l.c_str());
  return 0;
}
