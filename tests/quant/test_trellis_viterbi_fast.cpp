// The fast CUDA Viterbi's thread decomposition (trellis_viterbi_fast.h), run on the CPU thread by thread exactly as
// the kernels run it (forward steps of all 1024 threads without an argmin, the end node, both tracebacks
// recomputing the winners from the cost rows), must give the CPU encoder's states bit for bit. Runs without a GPU, so the index math of the CUDA path
// is checked in every CI run; the `cuda` test (test_trellis_viterbi_cuda.cpp) checks the kernels themselves.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

#include "core/rng.h"
#include "quant/trellis_pack.h"
#include "quant/trellis_viterbi.h"
#include "quant/trellis_viterbi_fast.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {

// The kernels' pass structure (trellis_viterbi.cu: fast_forward_kernel, fast_traceback_kernel), sequentially.
// Rows the forward pass does not write stay NaN: a traceback reading one would not reproduce the CPU's states.
template <int K>
void emulate_tile(const float* w, Codebook cb, uint16_t* states) {
  using L = vfast::Layout<K>;
  std::vector<std::array<uint32_t, vfast::kCbRegs>> regs(vfast::kThreads);
  for (int t = 0; t < vfast::kThreads; t++) {
    uint32_t r[vfast::kCbRegs];
    vfast::codebook_regs<K>(t, cb, r);
    std::copy(r, r + vfast::kCbRegs, regs[size_t(t)].begin());
  }
  std::vector<float> a(L::kNodes), b(L::kNodes);
  std::vector<float> rows(size_t(vfast::kCostRows<K>) * L::kNodes);
  std::vector<float> before(size_t(kTileElems) * L::kNodes);  // every step's input costs, for check_costs
  auto forward = [&](const float* seq, bool second) {
    std::fill(rows.begin(), rows.end(), std::numeric_limits<float>::quiet_NaN());
    float* cost = a.data();
    float* next = b.data();
    int kept = 0;
    for (int p = 0; p < kTileElems; p++) {
      const bool keep = vfast::keeps_costs<K>(second, p);
      ASSERT_LT(vfast::cost_row<K>(p), vfast::kCostRows<K>);  // the kernel's row address is valid at every step
      float* row = rows.data() + size_t(vfast::cost_row<K>(p)) * L::kNodes;
      kept += keep;
      std::copy(cost, cost + L::kNodes, before.begin() + ptrdiff_t(p) * L::kNodes);
      for (int t = 0; t < vfast::kThreads; t++) {
        uint32_t r[vfast::kCbRegs];
        std::copy(regs[size_t(t)].begin(), regs[size_t(t)].end(), r);
        vfast::step<K>(t, r, seq[p], cost, next, row, keep);
      }
      std::swap(cost, next);
    }
    EXPECT_EQ(cost, a.data());
    EXPECT_LE(kept, vfast::kCostRows<K>);
  };
  // The traceback's view of the costs before step p (a stored row, a recomputed one, or the initial costs) must be
  // the forward pass's own, bit for bit, at every node of the steps it traces: the first ones, both sides of the
  // stored/recomputed alternation and the last.
  auto check_costs = [&](const vfast::TracePass& tp) {
    for (int p : {0, 1, 2, 3, 127, 128, 129, 130, 200, 201, 254, 255}) {
      if (!tp.second && p < kTileElems / 2) continue;  // pass 1 traces steps 128..255 only
      int bad = 0;
      for (uint32_t q = 0; q < uint32_t(L::kNodes); q += 7) {
        const float want = before[size_t(p) * L::kNodes + q], got = vfast::cost_before<K>(tp, p, q);
        bad += std::memcmp(&want, &got, sizeof(float)) != 0;
      }
      EXPECT_EQ(bad, 0) << "K=" << K << " pass " << (tp.second ? 2 : 1) << " step " << p;
    }
  };
  float rot[kTileElems];
  for (int i = 0; i < kTileElems; i++) rot[i] = w[(i + kTileElems / 2) % kTileElems];
  std::fill(a.begin(), a.end(), 0.0f);
  forward(rot, false);
  uint32_t o = 0;
  for (uint32_t i = 1; i < uint32_t(L::kNodes); i++)
    if (a[i] < a[o]) o = i;
  const vfast::TracePass tp1{cb, rot, rows.data(), false, 0};
  check_costs(tp1);
  for (int p = kTileElems - 1; p >= kTileElems / 2; p--) o = ((vfast::traced_winner<K>(tp1, p, o) << (16 - K)) | o) >> K;
  const uint32_t e = o;
  std::fill(a.begin(), a.end(), std::numeric_limits<float>::infinity());
  a[e] = 0.0f;
  forward(w, true);
  const vfast::TracePass tp2{cb, w, rows.data(), true, e};
  check_costs(tp2);
  o = e;
  for (int p = kTileElems - 1; p >= 0; p--) {
    const uint32_t s = (vfast::traced_winner<K>(tp2, p, o) << (16 - K)) | o;
    states[p] = uint16_t(s);
    o = s >> K;
  }
}

template <int K>
void check_layout() {
  using L = vfast::Layout<K>;
  // every node has one owner and one slot; the owner's states are exactly the 2^K states entering the node
  std::vector<int> seen(L::kNodes, 0);
  std::set<uint32_t> states;
  for (int t = 0; t < vfast::kThreads; t++) {
    for (int gi = 0; gi < L::kGroupsPerThread; gi++)
      for (int jj = 0; jj < L::kOutsPerGroup; jj++) {
        const uint32_t o = L::node(t, gi, jj);
        ASSERT_LT(o, uint32_t(L::kNodes));
        seen[o]++;
        EXPECT_EQ(L::thread_of(o), t);
        EXPECT_EQ(L::slot_of(o), gi * L::kOutsPerGroup + jj);
        EXPECT_EQ(o >> K, L::node(t, gi, 0) >> K) << "a slot run stays in one predecessor group";
      }
    for (int i = 0; i < vfast::kStatesPerThread; i++) {
      const uint32_t s = L::state(t, i);
      EXPECT_EQ(L::thread_of(s & (L::kNodes - 1)), t);
      states.insert(s);
    }
  }
  for (int c : seen) ASSERT_EQ(c, 1);
  EXPECT_EQ(states.size(), 65536u);
}

template <int K>
void check_tiles(uint64_t seed) {
  check_layout<K>();
  Rng rng(seed);
  for (Codebook cb : {Codebook::Inst3, Codebook::Mcg, Codebook::Mul1}) {
    std::vector<float> w(kTileElems);
    for (auto& v : w) v = rng.normal() * 1.2f;
    std::vector<uint16_t> s_cpu(kTileElems, 0xAAAA), s_emu(kTileElems, 0x5555);
    viterbi_encode_tile(w.data(), K, cb, s_cpu.data());
    emulate_tile<K>(w.data(), cb, s_emu.data());
    EXPECT_EQ(s_emu, s_cpu) << "K=" << K << " " << codebook_name(cb);
    EXPECT_TRUE(is_tail_biting(s_emu.data(), K));
  }
  // Non-finite targets (a NaN, an inf, a value whose square overflows): the deferred minimum and the recomputed
  // winners must follow the CPU's comparisons there too (NaN branches never win, ties go to the lowest k).
  std::vector<float> w(kTileElems);
  for (auto& v : w) v = rng.normal();
  w[37] = std::numeric_limits<float>::quiet_NaN();
  w[90] = 3e19f;
  w[150] = std::numeric_limits<float>::infinity();
  std::vector<uint16_t> s_cpu(kTileElems, 0xAAAA), s_emu(kTileElems, 0x5555);
  viterbi_encode_tile(w.data(), K, Codebook::Mcg, s_cpu.data());
  emulate_tile<K>(w.data(), Codebook::Mcg, s_emu.data());
  EXPECT_EQ(s_emu, s_cpu) << "K=" << K << " non-finite targets";
}

}  // namespace

TEST(ViterbiFastLayout, EmulatedKernelAgreesWithCpu) {
  check_tiles<2>(11);
  check_tiles<3>(12);
  check_tiles<4>(13);
  check_tiles<5>(14);
  check_tiles<6>(15);
}
