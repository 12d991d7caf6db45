// Encoding time of full-size GLM-4.7-Flash Linears (issue 18 part 3): a MoE layer's Linears (the 64 routed experts'
// gate/up and down projections, the shared expert, the five attention projections), optionally the dense layer 0 and
// lm_head, with random weights and random positive definite Hessians (diagonal + rank 16: the cost of LDLQ does not
// depend on the values), encoded by quantize_linears in the groups `trellm quantize` forms (one batch per layer,
// shape and K; at most --group members), every phase timed. Then the projection to the whole model (46 MoE layers,
// the dense layer, lm_head). Calibration (capture) time is not in it: this is the encoder's share.
//
//   quantize_layer_bench [--experts N] [--bits K] [--head-bits K] [--device cpu|cuda|cuda:N] [--group G]
//                        [--parts moe,dense,head] [--overlap] [--in-flight N] [--json FILE]
// --overlap: the MoE layer once more as quantize_checkpoint runs it on the GPU, each group's CPU half (prepare, LDL)
// overlapping the GPU half (LDLQ, proxy, packing) of the up to N groups before it (--in-flight, default 2 as
// quantize_checkpoint; N > 1 needs all 64 experts); its wall time is the layer figure then.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "model/glm4_moe_lite.h"
#include "quant/trellis_encode.h"
#include "quant/trellis_viterbi.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

struct Group {
  std::string name;
  int count;
  int64_t out, in;
  int K;
  double weight = 1;  // how many times the projection counts it (experts: 64 / --experts)
};

// H = diag(d) + U·Uᵀ / 16, U (in x 16) Gaussian, d in [0.5, 1.5): positive definite, a few dominant directions.
std::vector<float> random_hessian(int64_t in, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> u(size_t(in * 16));
  for (auto& v : u) v = rng.normal();
  std::vector<float> h(size_t(in * in));
  parallel_for(in, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
      for (int64_t j = 0; j < in; j++) {
        float s = 0;
        for (int r = 0; r < 16; r++) s += u[i * 16 + r] * u[j * 16 + r];
        h[i * in + j] = s / 16.0f;
      }
  });
  for (int64_t i = 0; i < in; i++) h[i * in + i] += 0.5f + rng.uniform();
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  int experts = 64, bits = 3, head_bits = 6, group = 64, in_flight = 2;
  std::string device = "auto", parts = "moe";
  const char* json_path = nullptr;
  bool overlap = false;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--overlap") {
      overlap = true;
      continue;
    }
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--experts") experts = std::atoi(next());
    else if (a == "--bits") bits = std::atoi(next());
    else if (a == "--head-bits") head_bits = std::atoi(next());
    else if (a == "--device") device = next();
    else if (a == "--group") group = std::atoi(next());
    else if (a == "--in-flight") in_flight = std::atoi(next());
    else if (a == "--parts") parts = next();
    else if (a == "--json") json_path = next();
    else {
      std::fprintf(stderr, "usage: quantize_layer_bench [--experts N] [--bits K] [--head-bits K] [--device D] "
                           "[--group G] [--parts moe,dense,head] [--overlap] [--in-flight N] [--json FILE]\n");
      return 2;
    }
  }
  try {
    const Config c = Config::glm47_flash();
    if (experts < 1 || experts > c.n_routed_experts) fail("--experts ", experts, ": 1..", c.n_routed_experts);
    if (in_flight < 1) fail("--in-flight ", in_flight, ": at least 1");
    if (overlap && in_flight > 1 && experts < c.n_routed_experts)
      fail("--in-flight ", in_flight, " with --experts ", experts, ": groups overlapping each other cannot be scaled; "
           "use all ", c.n_routed_experts, " experts or --in-flight 1");
    EncodeOptions base;
    base.device = parse_encode_device(device, "--device");
    const double ew = double(c.n_routed_experts) / experts;
    const int64_t H = c.hidden_size, qh = c.num_attention_heads * c.qk_head_dim();
    const int64_t kvb = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), ov = c.num_attention_heads * c.v_head_dim;
    std::vector<Group> groups;
    const bool moe = parts.find("moe") != std::string::npos, dense = parts.find("dense") != std::string::npos;
    if (moe) {
      // trellm quantize's groups of a MoE layer: gate and up of every expert (and the shared expert) share a shape.
      const int gate_up = 2 * experts + 2, down = experts + 1;
      for (int left = gate_up, g = 0; left > 0; left -= group, g++)
        groups.push_back({"experts gate/up #" + std::to_string(g), std::min(left, group), c.moe_intermediate_size, H, bits, ew});
      for (int left = down, g = 0; left > 0; left -= group, g++)
        groups.push_back({"experts down #" + std::to_string(g), std::min(left, group), H, c.moe_intermediate_size, bits, ew});
      groups.push_back({"q_a_proj", 1, c.q_lora_rank, H, bits});
      groups.push_back({"kv_a_proj_with_mqa", 1, c.kv_lora_rank + c.qk_rope_head_dim, H, bits});
      groups.push_back({"q_b_proj", 1, qh, c.q_lora_rank, bits});
      groups.push_back({"kv_b_proj", 1, kvb, c.kv_lora_rank, bits});
      groups.push_back({"o_proj", 1, H, ov, bits});
    }
    if (dense) {
      groups.push_back({"dense gate/up", 2, c.intermediate_size, H, bits});
      groups.push_back({"dense down", 1, H, c.intermediate_size, bits});
    }
    if (parts.find("head") != std::string::npos) groups.push_back({"lm_head", 1, c.vocab_size, H, head_bits});

    std::printf("# quantize_layer_bench: GLM-4.7-Flash shapes, K=%d (lm_head %d), device %s, %d threads, group <= %d, "
                "%d of %lld experts timed\n\n", bits, head_bits, encode_device_name(base.device),
                ThreadPool::global().size(), group, experts, (long long)c.n_routed_experts);
    std::printf("| group | Linears | out x in | K | tiles | prepare s | LDL s | LDLQ s | finish s | total s | tiles/s in LDLQ |\n");
    std::printf("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    std::map<int64_t, std::vector<float>> hessians;
    std::vector<std::string> json;
    EncodeTimes moe_t, dense_t, head_t;
    double moe_s = 0, dense_s = 0, head_s = 0;
    uint64_t seed = 1;
    for (const Group& g : groups) {
      if (!hessians.count(g.in)) hessians[g.in] = random_hessian(g.in, 100 + uint64_t(g.in));
      std::vector<std::vector<float>> w(size_t(g.count));
      Rng rng(seed);
      for (auto& m : w) {
        m.resize(size_t(g.out * g.in));
        for (auto& v : m) v = rng.normal() * 0.02f;
      }
      std::vector<const float*> ws, hs;
      std::vector<uint64_t> seeds;
      for (auto& m : w) ws.push_back(m.data()), hs.push_back(hessians[g.in].data()), seeds.push_back(seed++);
      EncodeOptions o = base;
      o.K = g.K;
      EncodeTimes t;
      o.times = &t;
      const Timer timer;
      const std::vector<EncodedLinear> enc = quantize_linears(ws, g.out, g.in, hs, seeds, o);
      const double total = timer.seconds();
      const int64_t tiles = int64_t(g.count) * (round_up_128(g.in) / 16) * (round_up_128(g.out) / 16);
      double proxy = 0;
      for (auto& e : enc) proxy += e.proxy_err / double(enc.size());
      std::printf("| %s | %d | %lld x %lld | %d | %lld | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f |\n", g.name.c_str(),
                  g.count, (long long)g.out, (long long)g.in, g.K, (long long)tiles, t.prepare, t.ldl, t.encode,
                  t.finish, total, double(tiles) / t.encode);
      std::fflush(stdout);
      char line[512];
      std::snprintf(line, sizeof line,
                    "{\"bench\": \"quantize_layer\", \"group\": \"%s\", \"linears\": %d, \"out\": %lld, \"in\": %lld, "
                    "\"K\": %d, \"tiles\": %lld, \"device\": \"%s\", \"prepare_s\": %.3f, \"ldl_s\": %.3f, "
                    "\"ldlq_s\": %.3f, \"finish_s\": %.3f, \"total_s\": %.3f, \"proxy_err\": %.5f}",
                    g.name.c_str(), g.count, (long long)g.out, (long long)g.in, g.K, (long long)tiles,
                    encode_device_name(base.device), t.prepare, t.ldl, t.encode, t.finish, total, proxy);
      json.push_back(line);
      EncodeTimes& acc = g.name == "lm_head" ? head_t : g.name.rfind("dense", 0) == 0 ? dense_t : moe_t;
      double& sum = g.name == "lm_head" ? head_s : g.name.rfind("dense", 0) == 0 ? dense_s : moe_s;
      acc.prepare += t.prepare * g.weight, acc.ldl += t.ldl * g.weight, acc.encode += t.encode * g.weight;
      acc.finish += t.finish * g.weight;
      sum += total * g.weight;
    }
    double overlapped = 0;
    if (moe && overlap) {
      // The same MoE groups, weights made first (the quantizer reads them while the GPU works), then timed as
      // quantize_checkpoint runs them: prepare group g+1 on the CPU while group g is encoded on the GPU.
      std::vector<std::vector<std::vector<float>>> ws_all;
      std::vector<const Group*> gs;
      uint64_t s2 = 1000;
      for (const Group& g : groups) {
        if (g.name == "lm_head" || g.name.rfind("dense", 0) == 0) continue;
        gs.push_back(&g);
        ws_all.emplace_back(size_t(g.count));
        Rng rng(s2++);
        for (auto& m : ws_all.back()) {
          m.resize(size_t(g.out * g.in));
          for (auto& v : m) v = rng.normal() * 0.02f;
        }
      }
      struct InFlight {
        PreparedLinearsPtr p;
        std::future<std::vector<EncodedLinear>> f;
        double weight = 1;
      };
      std::deque<InFlight> pending;
      const Timer wall;
      Timer since_done;  // since the previous group's codes were in
      double weighted = 0;
      auto retire = [&] {  // the oldest group's codes; with one in flight, its share of the time scaled by its weight
        pending.front().f.get();
        weighted += since_done.seconds() * pending.front().weight;
        since_done.reset();
        pending.pop_front();
      };
      for (size_t gi = 0; gi < gs.size(); gi++) {
        const Group& g = *gs[gi];
        std::vector<const float*> ws, hs;
        std::vector<uint64_t> seeds;
        for (auto& m : ws_all[gi]) ws.push_back(m.data()), hs.push_back(hessians[g.in].data()), seeds.push_back(s2++);
        EncodeOptions o = base;
        o.K = g.K;
        InFlight f;
        f.weight = g.weight;
        f.p = prepare_linears(ws, g.out, g.in, hs, seeds, o);
        while (pending.size() >= size_t(in_flight)) retire();
        PreparedLinears* p = f.p.get();
        f.f = std::async(std::launch::async, [p] { return encode_prepared(*p); });
        pending.push_back(std::move(f));
      }
      while (!pending.empty()) retire();
      overlapped = weighted;
      std::printf("\nOverlapped (CPU half of each group under the GPU half of the %d before): %.1f s for the timed "
                  "groups, %.1f s for a 64-expert layer%s\n", in_flight, wall.seconds(), overlapped,
                  experts < c.n_routed_experts ? " (each group's time scaled as above)" : "");
      char line[256];
      std::snprintf(line, sizeof line, "{\"bench\": \"quantize_layer_overlapped\", \"device\": \"%s\", \"experts\": %d, "
                    "\"in_flight\": %d, \"layer_s\": %.3f}", encode_device_name(base.device), experts, in_flight, overlapped);
      json.push_back(line);
    }
    if (moe) {
      if (overlapped > 0) moe_s = overlapped;
      const double layers = double(c.num_hidden_layers - 1);
      std::printf("\nOne MoE layer (64 experts%s%s): %.1f s; phases summed: prepare %.1f + LDL %.1f + LDLQ %.1f + "
                  "finish %.1f; x %.0f MoE layers = %.1f min\n",
                  experts < c.n_routed_experts ? ", scaled from the timed ones" : "", overlapped > 0 ? ", overlapped" : "",
                  moe_s,
                  moe_t.prepare, moe_t.ldl, moe_t.encode, moe_t.finish, layers, moe_s * layers / 60.0);
      if (dense) std::printf("Dense layer 0: %.1f s\n", dense_s);
      if (head_s > 0) std::printf("lm_head: %.1f s\n", head_s);
      std::printf("Encoder share of the whole model: %.1f min (%s)\n",
                  (moe_s * layers + dense_s + head_s) / 60.0,
                  dense && head_s > 0 ? "all parts timed" : "parts not timed count as 0");
    }
    std::printf("\n");
    for (auto& l : json) std::printf("%s\n", l.c_str());
    if (json_path) {
      FILE* f = std::fopen(json_path, "a");
      if (!f) fail("--json ", json_path, ": cannot open for appending");
      for (auto& l : json) std::fprintf(f, "%s\n", l.c_str());
      std::fclose(f);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quantize_layer_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
