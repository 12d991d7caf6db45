// CPU trellis kernel timing (issue 19): every variant this machine supports, one thread and all threads, on the
// GLM-4.7-Flash shapes; ns per weight, weights/s, and the fraction of the core's vector-integer issue rate the
// decode uses. A benchmark, never a test. Build and run (Release build dir with the CPU backend):
//
//   g++ -O2 -std=c++20 -Isrc dev/kernels/trellis_cpu_bench.cpp build-simd/libtrellm_lib.a -lpthread -o /tmp/tcb
//   /tmp/tcb [--json FILE]
//
// Clock: a chain of dependent 64-bit adds runs at 1 per cycle, so its rate (per thread CPU second) is the core clock.
// One-thread figures are per thread CPU second (the machine is shared); all-thread figures are wall time.
// Peak: the vector ALU ports one core issues per cycle (Sapphire Rapids / Golden Cove: 2 for 512-bit ops (p0, p5),
// 3 for 256-bit (p0, p1, p5)), times the variant's vector instructions per weight (counted in the kernel source,
// trellis_gemm_*.{cpp,inc}; listed below).
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "backend/cpu/trellis_gemm.h"
#include "core/rng.h"
#include "core/thread_pool.h"

using namespace trellm;
using namespace trellm::cpu;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
// CPU time of the calling thread: the machine is shared, and a descheduled thread would count as slow code.
double thread_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double clock_hz() {
  uint64_t x = 1;
  const double t0 = thread_now();
  const int64_t n = 400'000'000;
  for (int64_t i = 0; i < n; i++) __asm__ volatile("add $1, %0" : "+r"(x));
  return double(n) / (thread_now() - t0);
}

// Vector instructions per 32 weights of the m=1 MCG path (decode + f32 conversion + 2 FMAs), from the source.
double ops_per_32(TrellisIsa isa) {
  switch (isa) {
    case TrellisIsa::Avx512Fp16: return 17;  // load, 2 vpermt2w, vpshldvw, 3 mul + add, 2 ternlog, vaddph, 2 cvt + extract, 2 fma (+ idx loads)
    case TrellisIsa::Avx512: return 25;      // + sllv/srlv/or instead of vpshldvw, 4 cvt + 2 extract, 2 add, 2 x 3 Veltkamp
    case TrellisIsa::Avx2: return 4 * 21;    // per 8: load, 2 vpermd, 2 shifts, or, and, mul (2), and, xor, 5 (halves), add, 3 + 1 round, fma
    default: return 0;
  }
}
int ports(TrellisIsa isa) { return isa == TrellisIsa::Avx2 ? 3 : 2; }

struct Shape {
  const char* name;
  int64_t in, out, m;
};

}  // namespace

int main(int argc, char** argv) {
  std::string json;
  for (int i = 1; i + 1 < argc; i++)
    if (std::string(argv[i]) == "--json") json = argv[i + 1];
  const double hz = clock_hz();
  std::printf("core clock (dependent adds) %.2f GHz, %d threads\n", hz / 1e9, ThreadPool::global().size());
  const Shape shapes[] = {{"expert gate 2048x1536", 2048, 1536, 1},
                          {"expert down 1536x2048", 1536, 2048, 1},
                          {"o_proj 5120x2048", 5120, 2048, 1},
                          {"expert gate m=32", 2048, 1536, 32},
                          {"q_b 768x5120 m=512", 768, 5120, 512}};
  std::ofstream js;
  if (!json.empty()) js.open(json, std::ios::app);
  for (bool cold : {false, true})
  for (const Shape& s : shapes) {
    if (cold && s.m > 32) continue;
    const int64_t tk = s.in / 16, tn = s.out / 16;
    const int K = 3;
    // `copies` distinct matrices, ~1 GB in all for the small shapes: every call reads its codes from DRAM, as a
    // model's forward does (cold). copies = 1 is the hot case (codes in L2 / L3).
    const size_t mat = size_t(tk * tn) * 16 * K;
    const int copies = cold ? std::max<int>(1, int((size_t(1) << 30) / (mat * 2))) : 1;
    std::vector<uint16_t> codes(mat * copies);
    Rng r(1);
    for (auto& c : codes) c = uint16_t(r.next_u32());
    int which = 0;
    TrellisTiles t{codes.data(), K, trellis::Codebook::Mcg, tk, tn};
    std::vector<float> x(size_t(s.m * s.in)), xp(size_t(s.m * tk * 32)), y(size_t(s.m * s.out));
    for (auto& v : x) v = r.uniform(-1, 1);
    permute_x(x.data(), s.in, s.m, tk, xp.data());
    for (TrellisIsa isa : trellis_supported_isas()) {
      if (isa == TrellisIsa::Scalar && s.m > 1) continue;
      for (int threads : {1, ThreadPool::global().size()}) {
        const int64_t group = trellis_strip_group(tk, s.m);
        auto run = [&] {
          t.trellis = codes.data() + mat * size_t(which);
          which = (which + 1) % copies;
          if (threads == 1) return trellis_strips(isa, t, xp.data(), s.m, y.data(), s.out, 0, tn);
          parallel_for((tn + group - 1) / group, 1, [&](int64_t g0, int64_t g1) {
            trellis_strips(isa, t, xp.data(), s.m, y.data() + 16 * g0 * group, s.out, g0 * group, std::min(tn, g1 * group));
          });
        };
        run();
        // One thread: its CPU time; all threads: wall time (includes any time the other core was taken).
        auto clock = threads == 1 ? thread_now : now;
        int reps = 0;
        const double t0 = clock();
        double el = 0;
        do {
          run();
          reps++;
          el = clock() - t0;
        } while (el < 0.3);
        const double per_call = el / reps, weights = double(s.in) * double(s.out);
        const double ns_w = per_call * 1e9 / weights;  // per weight decoded (once per call)
        const double gflop = 2.0 * weights * double(s.m) / per_call / 1e9;
        const double peak_frac = ops_per_32(isa) > 0 && s.m == 1
                                     ? (weights / per_call) * ops_per_32(isa) / 32.0 / (threads * hz * ports(isa))
                                     : 0;
        std::printf("  %-4s %-24s %-11s %d thr  %8.3f ms  %6.3f ns/weight  %7.2f Gweights/s  %7.1f GFLOP/s", cold ? "cold" : "hot", s.name,
                    trellis_isa_name(isa), threads, per_call * 1e3, ns_w, weights / per_call / 1e9, gflop);
        if (peak_frac > 0) std::printf("  %5.1f %% of vector issue", 100 * peak_frac);
        std::printf("\n");
        if (js.is_open()) {
          char line[512];
          std::snprintf(line, sizeof line,
                        "{\"bench\": \"trellis_cpu_kernel\", \"shape\": \"%s K=3 mcg %s\", \"isa\": \"%s\", \"threads\": %d, "
                        "\"ms\": %.4f, \"ns_per_weight\": %.4f, \"gflop_s\": %.2f, \"vector_issue_frac\": %.3f, \"clock_ghz\": %.2f}\n",
                        s.name, cold ? "cold" : "hot", trellis_isa_name(isa), threads, per_call * 1e3, ns_w, gflop, peak_frac, hz / 1e9);
          js << line;
        }
      }
    }
  }
  return 0;
}
