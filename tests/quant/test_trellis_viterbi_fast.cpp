// The fast CUDA Viterbi's thread decomposition (trellis_viterbi_fast.h), run on the CPU thread by thread exactly as
// the kernels run it (forward steps of all 1024 threads, argmin, both tracebacks through the packed backpointer
// rows), must give the CPU encoder's states bit for bit. Runs without a GPU, so the index math of the CUDA path
// is checked in every CI run; the `cuda` test (test_trellis_viterbi_cuda.cpp) checks the kernels themselves.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
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
  std::vector<uint32_t> bp(size_t(kTileElems) * vfast::kThreads, 0xDEADBEEFu);
  auto forward = [&](const float* seq, bool second) {
    float* cost = a.data();
    float* next = b.data();
    for (int p = 0; p < kTileElems; p++) {
      for (int t = 0; t < vfast::kThreads; t++) {
        uint32_t r[vfast::kCbRegs];
        std::copy(regs[size_t(t)].begin(), regs[size_t(t)].end(), r);
        const uint32_t bits = vfast::step<K>(t, r, seq[p], cost, next);
        if (second || p >= kTileElems / 2) bp[size_t(p) * vfast::kThreads + size_t(t)] = bits;
      }
      std::swap(cost, next);
    }
    EXPECT_EQ(cost, a.data());
  };
  float rot[kTileElems];
  for (int i = 0; i < kTileElems; i++) rot[i] = w[(i + kTileElems / 2) % kTileElems];
  std::fill(a.begin(), a.end(), 0.0f);
  std::fill(bp.begin(), bp.end(), 0xDEADBEEFu);  // pass 1 must not read rows it did not write
  forward(rot, false);
  uint32_t o = 0;
  for (uint32_t i = 1; i < uint32_t(L::kNodes); i++)
    if (a[i] < a[o]) o = i;
  for (int p = kTileElems - 1; p >= kTileElems / 2; p--) o = ((vfast::backpointer<K>(bp.data(), p, o) << (16 - K)) | o) >> K;
  const uint32_t e = o;
  std::fill(a.begin(), a.end(), std::numeric_limits<float>::infinity());
  a[e] = 0.0f;
  forward(w, true);
  o = e;
  for (int p = kTileElems - 1; p >= 0; p--) {
    const uint32_t s = (vfast::backpointer<K>(bp.data(), p, o) << (16 - K)) | o;
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
}

}  // namespace

TEST(ViterbiFastLayout, EmulatedKernelAgreesWithCpu) {
  check_tiles<2>(11);
  check_tiles<3>(12);
  check_tiles<4>(13);
  check_tiles<5>(14);
  check_tiles<6>(15);
}
