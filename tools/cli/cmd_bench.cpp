// trellm bench: end-to-end speed of a model (a checkpoint, or a synthetic full-size GLM-4.7-Flash with random
// trellis codes built on the GPU in seconds; speed does not depend on weight values). Prints load time,
// prefill and decode speed, memory, bytes per token against the measured copy-bandwidth roofline, and time
// by layer part; --json appends one JSON line per figure (BENCHMARKS.md "How to report a figure").
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"
#include "git_commit.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/timer.h"
#include "format/tokenizer_json.h"
#include "model/glm4_moe_lite.h"
#include "runtime/engine.h"
#include "runtime/generate.h"

namespace trellm::cli {

namespace {

struct BenchArgs {
  std::string model, synthetic, save, device = "auto", json, codebook = "mcg", prompt_lens = "512,2048,8192",
              depths = "0,1024,4096,32768";
  int bits = 3, head_bits = 6, layers = 0, decode_tokens = 64, repeats = 3, prefill_chunk = 2048;
  std::string batch;          // batched engine: batch sizes, e.g. "1,8,32,64" (then the single-sequence parts are skipped)
  int batch_depth = 1024;     // prompt tokens per sequence before the measured decode steps
  int prefix_prompt = 8192;   // prefix-cache TTFT: prompt length (0: skip)
  std::string speculative;    // "mtp": the speculative-decoding benchmark instead
  std::string draft_tokens = "1,2,3,4";
  std::string prompt_file;    // speculative: the prompt's text (else random tokens, meaningless acceptance)
  std::string kernel_clocks;  // CSV of every kernel launch of the clocked decode steps (needs TRELLM_KERNEL_CLOCKS)
  std::string command;
  CudaOptions cuda;           // --mla-prefill
};

std::vector<int> parse_list(const std::string& s, const char* flag) {
  std::vector<int> out;
  for (int32_t v : parse_ids(s)) out.push_back(v);
  if (out.empty()) fail(flag, ": empty list");
  return out;
}

// This process's resident set (VmRSS) and its peak (VmHWM) in GB, from /proc/self/status (Linux; 0 elsewhere): the
// CPU backend's memory figures (its weights are host memory or the checkpoint's mapping).
std::pair<double, double> rss_gb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  double rss = 0, hwm = 0;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stod(line.substr(6)) * 1024 / 1e9;
    if (line.rfind("VmHWM:", 0) == 0) hwm = std::stod(line.substr(6)) * 1024 / 1e9;
  }
  return {rss, hwm};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}


struct Reporter {
  const BenchArgs& a;
  std::string gpu, date, shape;
  std::ofstream out;
  explicit Reporter(const BenchArgs& args) : a(args) {
    if (!a.json.empty()) {
      out.open(a.json, std::ios::app);
      if (!out) fail(a.json, ": cannot open for appending");
    }
    std::time_t t = std::time(nullptr);
    char b[16];
    std::strftime(b, sizeof b, "%Y-%m-%d", std::gmtime(&t));
    date = b;
  }
  void figure(const std::string& bench, const std::string& metric, const std::string& detail, double value,
              const std::string& unit, double limit = 0) {
    if (!out.is_open()) return;
    nlohmann::ordered_json j = {{"date", date}, {"gpu", gpu}, {"commit", TRELLM_GIT_COMMIT}, {"command", a.command},
                                {"bench", bench}, {"metric", metric}, {"shape", shape + (detail.empty() ? "" : " " + detail)},
                                {"value", value}, {"unit", unit}};
    if (limit > 0) j["limit"] = limit;
    out << j.dump() << "\n";
  }
};

// Bytes one decode step of `batch` rows at `depth` reads: every weight but the routed experts once, the routed
// experts each layer's rows picked at least once (random tokens: 1 - (1 - k/E)^batch of them), and every row's
// cache.
double step_bytes(const Model& m, int batch, int depth, DType kv_dtype) {
  const Config& c = m.config();
  const double k_over_e = double(c.num_experts_per_tok) / double(std::max<int64_t>(1, c.n_routed_experts));
  const double routed = m.routed_expert_bytes_total();
  const double rest = m.weight_bytes_per_token() - routed * k_over_e;
  return rest + routed * (1.0 - std::pow(1.0 - k_over_e, batch)) + double(batch) * m.kv_bytes_per_token(depth, kv_dtype);
}

// In-kernel clocks of `steps` replayed decode steps at depth D (one more closes the last): which kernel holds the
// critical path for how long, summed per kernel name, and every launch into a.kernel_clocks (CSV).
void run_kernel_clocks(Generator& gen, Backend& backend, Reporter& rep, int D, int steps, int layers,
                       double step_ms_unclocked, std::ofstream& csv) {
  backend.kernel_clocks_begin(size_t(1) << 21);  // 2 M blocks (64 MB): ~50 K blocks a step
  gen.decode_steps(1, D, steps + 1);
  const KernelClocks kc = backend.kernel_clocks_end();
  if (kc.dropped) fail("kernel clocks: ", kc.dropped, " block records past the buffer's 2^21; measure fewer steps");
  const auto tl = build_timeline(kc.records, kc.kernels);
  const StepSplit sp = split_step(tl);  // the step cut along the marks (printed last); its step_us: the mean step
  const double step_us = sp.step_us;
  std::printf("\n  kernel clocks, depth %d: %zu kernels a step, %.1f us a step clocked (%.1f us unclocked), mean of %zu steps\n",
              D, kc.kernels.size(), step_us, 1e3 * step_ms_unclocked, tl.size());
  std::printf("  %-44s %8s %10s %7s %10s %9s %7s\n", "kernel", "a step", "path us", "% step", "us each", "lead us", "hidden");
  auto sum = summarize(tl, kc.kernels);
  std::sort(sum.begin(), sum.end(), [](const KernelSummary& x, const KernelSummary& y) { return x.path_us > y.path_us; });
  const std::string shape = "depth=" + std::to_string(D);
  for (const KernelSummary& k : sum) {
    std::printf("  %-44.44s %8d %10.1f %7.1f %10.2f %9.2f %6.0f%%\n", k.name.c_str(), k.launches, k.path_us,
                100 * k.path_us / step_us, k.path_us / k.launches, k.lead_us, 100 * k.hidden);
    rep.figure("kernel_clocks", "path_us " + k.name, shape, k.path_us, "us");
  }
  rep.figure("kernel_clocks", "step_us_clocked", shape, step_us, "us");
  // The hops of the kernels that mark them (kernel_clocks.cuh), twice: from the release, when the last block
  // started and passed each mark ("then": the rest of the path share, the drain and the completion reaching the
  // next kernel's wait); and what one block pays for each hop from its own previous point, which separates a
  // hop's cost from how late the blocks started. A kernel marked a point in both or in neither.
  auto cells = [](const double (&v)[kClockMarks]) {
    for (double m : v) m >= 0 ? std::printf(" %8.2f", m) : std::printf(" %8s", "-");
  };
  auto header = [](std::initializer_list<const char*> first) {
    std::printf("  %-44s", "kernel");
    for (const char* n : first) std::printf(" %8s", n);
    for (const char* n : kMarkNames) std::printf(" %8s", n);
  };
  std::printf("\n  their hops, us from the release (the last block to pass each point; mean per launch):\n");
  header({"us each", "last go"});
  std::printf(" %8s\n", "then");
  for (const KernelSummary& k : sum) {
    const double end = *std::max_element(std::begin(k.mark_us), std::end(k.mark_us));
    if (end < 0) continue;
    const double each = k.path_us / k.launches;
    std::printf("  %-44.44s %8.2f %8.2f", k.name.c_str(), each, k.last_go_us);
    cells(k.mark_us);
    std::printf(" %8.2f\n", each - end);
    for (int m = 0; m < kClockMarks; m++)
      if (k.mark_us[m] >= 0) {
        rep.figure("kernel_clocks", std::string("mark_us ") + kMarkNames[m] + " " + k.name, shape, k.mark_us[m], "us");
        rep.figure("kernel_clocks", std::string("block_us ") + kMarkNames[m] + " " + k.name, shape, k.block_us[m], "us");
      }
  }
  std::printf("\n  the same hops a block pays, us from its own previous point (mean over blocks and launches):\n");
  header({});
  std::printf("\n");
  for (const KernelSummary& k : sum) {
    if (*std::max_element(std::begin(k.block_us), std::end(k.block_us)) < 0) continue;
    std::printf("  %-44.44s", k.name.c_str());
    cells(k.block_us);
    std::printf("\n");
  }
  // The whole step cut along the same marks: how much of it waits (start and drain), stages inputs, computes,
  // sums split-k partials, or sits in kernels that mark nothing.
  std::printf("\n  the step along the marks (every kernel's path share; unmarked: kernels without marks):\n");
  std::printf("  %-10s %10s %12s %7s\n", "part", "us a step", "us a layer", "% step");
  const std::pair<const char*, double> parts[] = {{"start", sp.start_us},  {"staging", sp.staging_us},
                                                  {"compute", sp.compute_us}, {"tail", sp.tail_us},
                                                  {"drain", sp.drain_us},  {"unmarked", sp.unmarked_us}};
  for (const auto& [name, us] : parts) {
    std::printf("  %-10s %10.1f %12.2f %7.1f\n", name, us, us / std::max(1, layers), 100 * us / std::max(1e-9, step_us));
    rep.figure("kernel_clocks", std::string("step_part_us ") + name, shape, us, "us");
  }
  for (size_t s = 0; s < tl.size(); s++)
    for (size_t i = 0; i < tl[s].kernels.size(); i++) {
      const KernelSpan& k = tl[s].kernels[i];
      csv << D << "," << s << "," << i << ",\"" << kc.kernels[i].name << "\"," << k.blocks << "," << k.release_us << ","
          << k.lead_us << "," << k.path_us << "," << k.last_go_us;
      for (double m : k.mark_us) csv << "," << m;
      for (double m : k.block_us) csv << "," << m;
      csv << "\n";
    }
}

// The batched engine: total decode tok/s at each batch size with every sequence `depth` tokens deep, and the
// time to first token of a long prompt cold and then warm from the prefix cache.
void run_batch_bench(const BenchArgs& a, Model& model, Backend& backend, Reporter& rep, double bw) {
  const Config& c = model.config();
  Rng rng(11);
  auto random_prompt = [&](int n) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& x : p) x = int32_t(rng.next_u32() % uint32_t(c.vocab_size));
    return p;
  };
  std::printf("\n  batched decode   depth %d, %d steps measured (median of %d)\n", a.batch_depth, a.decode_tokens, a.repeats);
  std::printf("  %6s %12s %14s %10s %16s %14s\n", "batch", "total tok/s", "per-stream", "ms/step", "roofline tok/s", "% of roofline");
  for (int B : parse_list(a.batch, "--batch")) {
    EngineOptions o;
    o.max_seqs = B;
    o.max_step_tokens = a.prefill_chunk;
    o.context = a.batch_depth + a.decode_tokens * (a.repeats + 1) + 8;
    o.kv_blocks = B * kv_blocks_for(o.context) + 1;
    o.prefix_caching = false;
    Engine e(model, o);
    GenParams p;
    p.sampling.temperature = 0;
    p.ignore_eos = true;
    p.max_tokens = a.decode_tokens * (a.repeats + 1) + 4;
    std::vector<std::shared_ptr<Request>> reqs;
    for (int i = 0; i < B; i++) reqs.push_back(e.submit(random_prompt(a.batch_depth), p));
    // Until every sequence has its first token: prompts are in, every later step is decode only.
    std::vector<size_t> got(reqs.size(), 0);
    std::vector<GenToken> sink;
    auto all_started = [&] {
      bool all = true;
      for (size_t i = 0; i < reqs.size(); i++) {
        sink.clear();
        reqs[i]->wait(sink, std::chrono::milliseconds(0));
        got[i] += sink.size();
        all = all && got[i] > 0;
      }
      return all;
    };
    while (!all_started()) e.step();
    for (int w = 0; w < 3; w++) e.step();  // graph capture of this bucket
    std::vector<double> rates;
    for (int r = 0; r < a.repeats; r++) {
      const int64_t g0 = e.stats().generation_tokens;
      backend.synchronize();
      Timer t;
      for (int s = 0; s < a.decode_tokens; s++) e.step();
      rates.push_back(double(e.stats().generation_tokens - g0) / t.seconds());
    }
    const double v = median(rates);
    const double bytes = step_bytes(model, B, a.batch_depth, backend.kv_dtype());
    const double limit = bw > 0 ? double(B) * bw / bytes : 0;
    std::printf("  %6d %12.1f %14.1f %10.3f %16.0f %14.1f\n", B, v, v / B, 1e3 * B / v, limit, limit > 0 ? 100 * v / limit : 0);
    const std::string shape = "batch=" + std::to_string(B) + " depth=" + std::to_string(a.batch_depth);
    rep.figure("batched_decode", "decode_tok_s_total", shape, v, "tok/s", limit);
    rep.figure("batched_decode", "decode_tok_s_per_stream", shape, v / B, "tok/s");
    for (auto& r : reqs) r->cancel();
    e.step();
  }
  if (a.prefix_prompt <= 0) return;
  // ---- prefix cache: the same long prompt twice; the second finds its full blocks cached ----
  EngineOptions o;
  o.max_seqs = 2;
  o.max_step_tokens = a.prefill_chunk;
  o.context = a.prefix_prompt + 16;
  o.kv_blocks = 2 * kv_blocks_for(o.context) + 1;
  Engine e(model, o);
  GenParams p;
  p.sampling.temperature = 0;
  p.max_tokens = 1;
  const std::vector<int32_t> prompt = random_prompt(a.prefix_prompt);
  auto ttft = [&] {
    backend.synchronize();
    Timer t;
    auto r = e.submit(prompt, p);
    e.run_until_idle();
    r->wait_all();
    return t.seconds();
  };
  ttft();  // warm-up: scratch, cuBLAS, and the cache now holds the prompt's blocks
  const double warm = ttft();
  // Cold: a prompt the cache has not seen (same length).
  const std::vector<int32_t> other = random_prompt(a.prefix_prompt);
  backend.synchronize();
  Timer t;
  auto r = e.submit(other, p);
  e.run_until_idle();
  r->wait_all();
  const double cold = t.seconds();
  std::printf("\n  prefix cache: %d-token prompt, time to first token cold %.1f ms, warm %.1f ms (%.1f %% of cold; %lld of %lld "
              "prompt tokens hit)\n",
              a.prefix_prompt, 1e3 * cold, 1e3 * warm, 100 * warm / cold, (long long)e.stats().prefix_hit_tokens,
              (long long)e.stats().prefix_query_tokens);
  const std::string shape = "prompt=" + std::to_string(a.prefix_prompt);
  rep.figure("prefix_cache", "ttft_cold_ms", shape, 1e3 * cold, "ms");
  rep.figure("prefix_cache", "ttft_warm_ms", shape, 1e3 * warm, "ms");
}

// Speculative decoding at batch 1 through the engine: plain decoding, then for each K the verification forward of
// K + 1 rows alone (a captured step), the engine's speculative step (verification + K draft steps), the measured
// acceptance and tok/s, and the tok/s the measured step costs would give at acceptance alpha:
// (1 - alpha^(K+1)) / (1 - alpha) tokens per step.
void run_spec_bench(const BenchArgs& a, Model& model, Backend& backend, Reporter& rep) {
  const Config& c = model.config();
  std::vector<int32_t> prompt;
  if (!a.prompt_file.empty()) {
    const std::string text = format::read_text_file(a.prompt_file);
    prompt = load_tokenizer(a.model).encode(text);
    if (int(prompt.size()) < a.batch_depth) fail(a.prompt_file, ": ", prompt.size(), " tokens, fewer than --batch-depth ", a.batch_depth);
    prompt.resize(size_t(a.batch_depth));
  } else {
    Rng rng(13);
    for (int i = 0; i < a.batch_depth; i++) prompt.push_back(int32_t(rng.next_u32() % uint32_t(c.vocab_size)));
  }
  const int D = a.batch_depth;
  // The engine with B sequences (the same prompt, no prefix caching), `steps` decode steps measured (median of the
  // repeats): total tok/s and ms per step.
  auto engine_run = [&](int K, Engine::Stats* stats, int B = 1) {
    const int steps = a.decode_tokens;
    EngineOptions o;
    o.max_seqs = B;
    o.max_step_tokens = a.prefill_chunk;
    o.context = D + steps * (a.repeats + 2) * (K + 1) + 64;
    o.kv_blocks = B * kv_blocks_for(o.context) + 1;
    o.prefix_caching = false;
    o.draft_tokens = K;
    o.spec_max_seqs = B;
    Engine e(model, o);
    GenParams p;
    p.sampling.temperature = 0;
    p.ignore_eos = true;
    p.max_tokens = o.context - D - 8;
    std::vector<std::shared_ptr<Request>> reqs;
    for (int i = 0; i < B; i++) reqs.push_back(e.submit(prompt, p));
    while (e.stats().generation_tokens < B && e.step()) {
    }
    for (auto& r : reqs) {
      std::vector<GenToken> sink;
      if (r->wait(sink, std::chrono::milliseconds(0)) == FinishReason::Error) fail("the engine failed: ", r->error());
    }
    for (int w = 0; w < 3; w++) e.step();  // graph capture
    const Engine::Stats s0 = e.stats();
    std::vector<double> rates, ms;
    for (int rep_i = 0; rep_i < a.repeats; rep_i++) {
      const int64_t g0 = e.stats().generation_tokens;
      backend.synchronize();
      Timer t;
      for (int s = 0; s < steps; s++) e.step();
      const double sec = t.seconds();
      rates.push_back(double(e.stats().generation_tokens - g0) / sec);
      ms.push_back(1e3 * sec / steps);
    }
    Engine::Stats s1 = e.stats();
    s1.spec_steps -= s0.spec_steps, s1.spec_draft_tokens -= s0.spec_draft_tokens, s1.spec_accepted_tokens -= s0.spec_accepted_tokens;
    if (stats) *stats = s1;
    for (auto& r : reqs) r->cancel();
    e.step();
    return std::pair{median(rates), median(ms)};
  };
  // One forward of `rows` rows of one sequence at depth D, captured and replayed: its time in ms.
  auto verify_ms = [&](int rows) {
    RunState rs = model.make_run_state(rows);
    KvCache kv = model.make_kv_cache(D + rows + 1);
    std::vector<int32_t> toks(prompt.begin(), prompt.begin() + rows);
    model.forward(rs, kv, toks.data(), rows, D, true);
    Model::Layout l;
    l.n = rows;
    l.bound = int(kv.token_capacity());
    l.table_stride = kv.blocks;
    l.logits = Logits::All;
    auto g = backend.capture([&] { model.forward_uploaded(rs, kv, l); });
    for (int w = 0; w < 3; w++) g->launch();
    std::vector<double> ms;
    for (int rep_i = 0; rep_i < a.repeats; rep_i++) {
      backend.synchronize();
      Timer t;
      for (int s = 0; s < a.decode_tokens; s++) g->launch();
      backend.synchronize();
      ms.push_back(1e3 * t.seconds() / a.decode_tokens);
    }
    return median(ms);
  };
  const auto [plain_tok_s, plain_ms] = engine_run(0, nullptr);
  const double one_ms = verify_ms(1);
  std::printf("\n  speculative decoding (MTP), batch 1, depth %d%s; plain decode %.1f tok/s (%.3f ms per step; forward "
              "of 1 row %.3f ms)\n",
              D, a.prompt_file.empty() ? ", random prompt" : "", plain_tok_s, plain_ms, one_ms);
  rep.figure("speculative", "plain_decode_tok_s", "depth=" + std::to_string(D), plain_tok_s, "tok/s");
  rep.figure("speculative", "forward_ms", "rows=1 depth=" + std::to_string(D), one_ms, "ms");
  std::printf("  %3s %14s %10s %12s %11s %10s %10s %9s %24s\n", "K", "verify K+1 ms", "x 1 row", "step ms", "draft ms/K",
              "accepted", "tok/step", "tok/s", "expected tok/s a=.6/.7/.8");
  for (int K : parse_list(a.draft_tokens, "--draft-tokens")) {
    if (K < 1 || K > kMaxDraftTokens) fail("--draft-tokens ", K, " must be in 1..", kMaxDraftTokens);
    Engine::Stats st;
    const auto [tok_s, step_ms] = engine_run(K, &st);
    const double v_ms = verify_ms(K + 1);
    const double acc = st.spec_draft_tokens ? double(st.spec_accepted_tokens) / double(st.spec_draft_tokens) : 0;
    const double per_step = st.spec_steps ? double(st.spec_accepted_tokens + st.spec_steps) / double(st.spec_steps) : 0;
    double expect[3];
    const double alphas[3] = {0.6, 0.7, 0.8};
    for (int i = 0; i < 3; i++) expect[i] = (1 - std::pow(alphas[i], K + 1)) / (1 - alphas[i]) / (step_ms / 1e3);
    std::printf("  %3d %14.3f %10.2f %12.3f %11.3f %9.1f%% %10.2f %9.1f %8.0f %7.0f %7.0f\n", K, v_ms, v_ms / one_ms, step_ms,
                (step_ms - v_ms) / K, 100 * acc, per_step, tok_s, expect[0], expect[1], expect[2]);
    const std::string shape = "K=" + std::to_string(K) + " depth=" + std::to_string(D);
    rep.figure("speculative", "verify_ms", shape, v_ms, "ms");
    rep.figure("speculative", "verify_over_one_row", shape, v_ms / one_ms, "x");
    rep.figure("speculative", "step_ms", shape, step_ms, "ms");
    rep.figure("speculative", "draft_ms_per_token", shape, (step_ms - v_ms) / K, "ms");
    rep.figure("speculative", "acceptance", shape, acc, "fraction");
    rep.figure("speculative", "tokens_per_step", shape, per_step, "tokens");
    rep.figure("speculative", "decode_tok_s", shape, tok_s, "tok/s");
    rep.figure("speculative", "speedup_measured", shape, tok_s / plain_tok_s, "x");
    for (int i = 0; i < 3; i++)
      rep.figure("speculative", "expected_tok_s", shape + " alpha=" + std::to_string(alphas[i]).substr(0, 3), expect[i], "tok/s");
  }
  if (a.batch.empty()) return;
  // Where it stops paying: at B sequences a speculative step costs t_spec, a plain one t_plain; speculation wins
  // when its tokens per step (1 - a^(K+1)) / (1 - a) exceed t_spec / t_plain, i.e. above a break-even acceptance.
  std::printf("\n  batch   plain ms/step   K   spec ms/step   ratio   break-even acceptance\n");
  for (int B : parse_list(a.batch, "--batch")) {
    const double t_plain = engine_run(0, nullptr, B).second;
    for (int K : parse_list(a.draft_tokens, "--draft-tokens")) {
      const double t_spec = engine_run(K, nullptr, B).second, ratio = t_spec / t_plain;
      double lo = 0, hi = 1;  // tokens per step grow with the acceptance: bisect
      for (int it = 0; it < 50; it++) {
        const double mid = (lo + hi) / 2;
        ((1 - std::pow(mid, K + 1)) / (1 - mid) < ratio ? lo : hi) = mid;
      }
      const bool never = ratio >= K + 1;
      std::printf("  %5d %15.3f %3d %14.3f %7.2f   %s\n", B, t_plain, K, t_spec, ratio,
                  never ? "never (more than K+1 tokens' cost)" : std::to_string(hi).substr(0, 4).c_str());
      const std::string shape = "batch=" + std::to_string(B) + " K=" + std::to_string(K) + " depth=" + std::to_string(D);
      rep.figure("speculative_batch", "plain_ms_per_step", shape, t_plain, "ms");
      rep.figure("speculative_batch", "spec_ms_per_step", shape, t_spec, "ms");
      rep.figure("speculative_batch", "break_even_acceptance", shape, never ? 1.0 : hi, "fraction");
    }
  }
}

int run_bench(const BenchArgs& a) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // figures appear as they are measured, also into a log file
  auto backend = make_backend(a.device, a.cuda);
  Reporter rep(a);
  rep.gpu = backend->name();
  const auto prompt_lens = parse_list(a.prompt_lens, "--prompt-lens");
  const auto depths = parse_list(a.depths, "--depths");
  if (a.decode_tokens < 1 || a.repeats < 1) fail("--decode-tokens and --repeats must be >= 1");
  if (!a.kernel_clocks.empty() && (!a.batch.empty() || !a.speculative.empty()))
    fail("--kernel-clocks clocks the single-sequence decode steps; it does not combine with --batch or --speculative");
  if (!a.kernel_clocks.empty() && !backend->kernel_clocks_available())  // before the minutes of loading
    fail("--kernel-clocks: the ", backend->name(), " backend records none (CUDA, configured with -DTRELLM_KERNEL_CLOCKS=ON)");

  // ---- load ----
  Timer t;
  std::unique_ptr<Model> model;
  if (!a.model.empty() == !a.synthetic.empty()) fail("give exactly one of --model DIR and --synthetic glm-4.7-flash|tiny");
  if (!a.model.empty()) {
    model = Model::load(a.model, *backend);
    rep.shape = a.model;
  } else {
    SyntheticSpec spec;
    spec.bits = a.bits;
    spec.head_bits = a.head_bits;
    spec.codebook = trellis::parse_codebook(a.codebook, "--codebook");
    Config c;
    if (a.synthetic == "glm-4.7-flash") c = Config::glm47_flash();
    else if (a.synthetic == "tiny") c = Config::glm47_flash_tiny();
    else fail("--synthetic ", a.synthetic, ": unknown (glm-4.7-flash or tiny)");
    if (a.layers < 0 || a.layers > c.num_hidden_layers)
      fail("--layers ", a.layers, ": the ", a.synthetic, " shape has 1..", c.num_hidden_layers, " decoder layers");
    if (a.layers > 0) {  // the first N layers of the stack (layer 0 dense, as in the model)
      c.num_hidden_layers = a.layers;
      c.mlp_sparse.resize(size_t(a.layers));
    }
    model = Model::synthetic(c, *backend, spec);
    rep.shape = a.synthetic + " synthetic " + std::to_string(a.bits) + "bpw head " + std::to_string(a.head_bits) +
                (a.layers > 0 ? ", " + std::to_string(a.layers) + " layers" : "");
  }
  backend->synchronize();
  const double load_s = t.seconds();
  if (!a.save.empty()) {  // write the model as a checkpoint and stop (then: trellm bench --model DIR)
    Timer ts;
    model->save(a.save);
    std::printf("trellm bench: wrote %s (%.2f GB of weights) in %.1f s\n", a.save.c_str(), model->weight_bytes_total() / 1e9,
                ts.seconds());
    return 0;
  }
  const auto mem_load = backend->memory_used_total();
  const Config& c = model->config();
  const double bw = backend->copy_bandwidth();  // bytes/s, read + written

  std::printf("trellm bench: %s on %s\n", rep.shape.c_str(), backend->name().c_str());
  std::printf("  load                 %.2f s\n", load_s);
  rep.figure("load", "load_s", "", load_s, "s");
  if (mem_load.second) {
    std::printf("  GPU memory after load %.2f GB of %.2f GB (weights %.2f GB)\n", mem_load.first / 1e9, mem_load.second / 1e9,
                model->weight_bytes_total() / 1e9);
    rep.figure("memory", "gpu_mem_after_load_gb", "", mem_load.first / 1e9, "GB");
  }
  if (bw > 0) std::printf("  copy bandwidth       %.0f GB/s (read + write, 1 GiB device copy)\n", bw / 1e9);
  if (backend->host_memory()) {
    const auto [rss, hwm] = rss_gb();
    std::printf("  RSS after load       %.2f GB, peak %.2f GB (weights %.2f GB)\n", rss, hwm, model->weight_bytes_total() / 1e9);
    rep.figure("memory", "rss_after_load_gb", "", rss, "GB");
  }

  if (!a.speculative.empty()) {  // with --batch: also where speculation stops paying
    if (!a.prompt_file.empty() && a.model.empty()) fail("--prompt-file needs --model (its tokenizer)");
    run_spec_bench(a, *model, *backend, rep);
    return 0;
  }
  if (!a.batch.empty()) {
    run_batch_bench(a, *model, *backend, rep, bw);
    return 0;
  }
  const int max_prompt = *std::max_element(prompt_lens.begin(), prompt_lens.end());
  const int max_depth = *std::max_element(depths.begin(), depths.end());
  const int ctx = std::max(max_prompt, max_depth + a.decode_tokens) + 1;
  if (ctx > c.max_position_embeddings) fail("the requested lengths exceed max_position_embeddings = ", c.max_position_embeddings);
  Generator gen(*model, ctx, std::min(a.prefill_chunk, max_prompt));
  Rng rng(7);

  // ---- prefill ----
  std::printf("\n  prefill      tokens    tok/s (median of %d)\n", a.repeats);
  for (int L : prompt_lens) {
    std::vector<int32_t> prompt(static_cast<size_t>(L));
    for (auto& x : prompt) x = int32_t(rng.next_u32() % uint32_t(c.vocab_size));
    gen.prefill(std::vector<int32_t>(prompt.begin(), prompt.begin() + std::min(L, 64)));  // warm-up
    std::vector<double> rates;
    for (int r = 0; r < a.repeats; r++) {
      backend->synchronize();
      Timer tp;
      gen.prefill(prompt);
      backend->synchronize();
      rates.push_back(L / tp.seconds());
    }
    const double v = median(rates);
    std::printf("  %12d %12.0f\n", L, v);
    rep.figure("prefill", "prefill_tok_s", "prompt=" + std::to_string(L), v, "tok/s");
  }
  const auto mem_fwd = backend->memory_used_total();
  if (mem_fwd.second) {
    std::printf("  GPU memory after forward %.2f GB\n", mem_fwd.first / 1e9);
    rep.figure("memory", "gpu_mem_after_forward_gb", "ctx=" + std::to_string(ctx), mem_fwd.first / 1e9, "GB");
  }
  if (backend->host_memory()) {
    const auto [rss, hwm] = rss_gb();
    std::printf("  RSS after forward    %.2f GB, peak %.2f GB\n", rss, hwm);
    rep.figure("memory", "rss_after_forward_gb", "ctx=" + std::to_string(ctx), rss, "GB");
    rep.figure("memory", "rss_peak_gb", "ctx=" + std::to_string(ctx), hwm, "GB");
  }

  // ---- decode at depth (cache rows past the prefills hold random values: speed does not depend on them) ----
  std::ofstream clocks_csv;
  if (!a.kernel_clocks.empty()) {
    clocks_csv.open(a.kernel_clocks);
    if (!clocks_csv) fail("--kernel-clocks ", a.kernel_clocks, ": cannot open for writing");
    clocks_csv << "depth,step,index,kernel,blocks,release_us,lead_us,path_us,last_go_us";
    for (const char* n : kMarkNames) clocks_csv << "," << n << "_us";
    for (const char* n : kMarkNames) clocks_csv << ",block_" << n << "_us";
    clocks_csv << "\n";
  }
  for (TensorView layer : gen.kv_cache().layers) backend->fill_random(layer, 99, 1.0f);
  const DType kvt = gen.kv_cache().layers[0].dtype;
  std::printf("\n  decode       depth    tok/s     ms/tok   MB/tok   roofline tok/s   %% of roofline\n");
  for (int D : depths) {
    gen.decode_steps(1, D, std::min(4, a.decode_tokens));  // warm-up (captures the step once)
    std::vector<double> rates;
    for (int r = 0; r < a.repeats; r++) {
      backend->synchronize();
      Timer td;
      gen.decode_steps(1, D, a.decode_tokens);
      rates.push_back(a.decode_tokens / td.seconds());
    }
    const double v = median(rates);
    const double bytes = model->weight_bytes_per_token() + model->kv_bytes_per_token(D, kvt);
    const double limit = bw > 0 ? bw / bytes : 0;
    std::printf("  %12d %8.1f %10.3f %8.1f %16.0f %14.1f\n", D, v, 1e3 / v, bytes / 1e6, limit, limit > 0 ? 100 * v / limit : 0);
    rep.figure("decode", "decode_tok_s", "depth=" + std::to_string(D), v, "tok/s", limit);
    rep.figure("decode", "bytes_per_token_mb", "depth=" + std::to_string(D), bytes / 1e6, "MB");
    if (clocks_csv.is_open())
      run_kernel_clocks(gen, *backend, rep, D, 8, int(model->config().num_hidden_layers), 1e3 / v, clocks_csv);
  }

  // ---- time by layer part: one instrumented (uncaptured) decode step at depth 0 and at the deepest depth, and
  // one prefill forward of the longest prompt's first chunk (events between the parts: launches are not
  // overlapped, so the parts add up to more than a captured step) ----
  PartTimer timer;
  timer.backend = backend.get();
  RunState& rs = gen.run_state();
  auto part_row = [&](const char* what, int n, int pos0, const std::string& label) {
    std::vector<int32_t> toks(static_cast<size_t>(n)), pos(static_cast<size_t>(n));
    for (int i = 0; i < n; i++) toks[size_t(i)] = int32_t(rng.next_u32() % uint32_t(c.vocab_size)), pos[size_t(i)] = pos0 + i;
    const std::vector<int32_t> seq(static_cast<size_t>(n), 0);  // the generator's one sequence (its table is on the backend)
    backend->from_host(rs.tokens.data, toks.data(), 4 * size_t(n));
    backend->from_host(rs.pos.data, pos.data(), 4 * size_t(n));
    backend->from_host(rs.seq.data, seq.data(), 4 * size_t(n));
    Model::Layout lay;
    lay.n = n;
    lay.bound = pos0 + n;
    lay.table_stride = gen.kv_cache().blocks;
    rs.timer = &timer;
    timer.begin();
    model->forward_uploaded(rs, gen.kv_cache(), lay);
    rs.timer = nullptr;
    auto ms = timer.collect();
    std::printf("  %10d", n == 1 ? pos0 : n);
    for (int p = 0; p < int(Part::Count); p++) {
      std::printf(" %10.3f", ms[p]);
      rep.figure(what, std::string("ms_") + part_name(Part(p)), label, ms[p], "ms");
    }
    std::printf("\n");
  };
  std::printf("\n  time by part (one decode step, ms)\n  %10s", "depth");
  for (int p = 0; p < int(Part::Count); p++) std::printf(" %10s", part_name(Part(p)));
  std::printf("\n");
  for (int D : {0, max_depth}) part_row("decode_parts", 1, D, "depth=" + std::to_string(D));
  const int pn = std::min(max_prompt, std::min(a.prefill_chunk, rs.max_tokens));
  std::printf("\n  time by part (one prefill forward from position 0, ms)\n  %10s", "tokens");
  for (int p = 0; p < int(Part::Count); p++) std::printf(" %10s", part_name(Part(p)));
  std::printf("\n");
  part_row("prefill_parts", pn, 0, "tokens=" + std::to_string(pn));
  return 0;
}

}  // namespace

static BenchArgs g_bench;

void record_command_line(int argc, char** argv) {
  std::string cmd = "trellm";
  for (int i = 1; i < argc; i++) cmd += std::string(" ") + argv[i];
  g_bench.command = cmd;
}

void add_bench(CLI::App& app) {
  BenchArgs& a = g_bench;
  auto* cmd = app.add_subcommand("bench", "End-to-end speed: load, prefill, decode at depth, memory, roofline");
  cmd->add_option("-m,--model", a.model, "Model directory");
  cmd->add_option("--synthetic", a.synthetic, "Random weights in a model's shapes instead: glm-4.7-flash or tiny");
  cmd->add_option("--bits", a.bits, "Synthetic: trellis bits of the linear layers (0 = dense bf16)")->capture_default_str();
  cmd->add_option("--head-bits", a.head_bits, "Synthetic: trellis bits of lm_head (0 = dense bf16)")->capture_default_str();
  cmd->add_option("--codebook", a.codebook, "Synthetic: mcg, mul1 or 3inst")->capture_default_str();
  cmd->add_option("--layers", a.layers, "Synthetic: only the first N decoder layers (0 = all; e.g. a full-size checkpoint "
                  "of a few layers for the quantizer's measurements)")->capture_default_str();
  cmd->add_option("--save", a.save, "Write the (synthetic) model to this directory as a checkpoint, then stop");
  cmd->add_option("--prompt-lens", a.prompt_lens, "Prefill prompt lengths")->capture_default_str();
  cmd->add_option("--depths", a.depths, "Decode depths (tokens already in the cache)")->capture_default_str();
  cmd->add_option("--decode-tokens", a.decode_tokens, "Tokens per decode measurement")->capture_default_str();
  cmd->add_option("--repeats", a.repeats, "Repeats per figure (the median is reported)")->capture_default_str();
  cmd->add_option("--prefill-chunk", a.prefill_chunk, "Rows per prefill forward")->capture_default_str();
  cmd->add_option("--batch", a.batch, "Batched engine instead: total decode tok/s at these batch sizes (e.g. 1,8,32,64), then "
                  "the prefix-cache time to first token");
  cmd->add_option("--batch-depth", a.batch_depth, "Batched: prompt tokens per sequence before decoding")->capture_default_str();
  cmd->add_option("--prefix-prompt", a.prefix_prompt, "Batched: prompt length of the prefix-cache TTFT (0: skip)")
      ->capture_default_str();
  cmd->add_option("--speculative", a.speculative,
                  "Speculative decoding instead ('mtp'): plain vs speculative decode at batch 1, verification cost, "
                  "acceptance, expected tok/s at acceptance 0.6 / 0.7 / 0.8 (depth: --batch-depth)")
      ->check(CLI::IsMember({"mtp"}));
  cmd->add_option("--draft-tokens", a.draft_tokens, "Speculative: draft counts to measure")->capture_default_str();
  cmd->add_option("--prompt-file", a.prompt_file, "Speculative: a text file whose first --batch-depth tokens are the prompt");
  cmd->add_option("--device", a.device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  add_cuda_options(cmd, a.cuda);
  cmd->add_option("--json", a.json, "Append one JSON line per figure to this file");
  cmd->add_option("--kernel-clocks", a.kernel_clocks,
                  "Also clock 8 decode steps at each depth in the kernels (a build with -DTRELLM_KERNEL_CLOCKS=ON): print "
                  "each kernel's share of the step's critical path and write every launch to this CSV file");
  cmd->callback([] { std::exit(run_bench(a)); });
}


}  // namespace trellm::cli
