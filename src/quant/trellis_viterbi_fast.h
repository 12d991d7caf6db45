// The thread decomposition of the fast CUDA Viterbi (trellis_viterbi.cu, K = 2..6), written once for host and
// device so the CPU can run the very same per-thread step (tests/quant/test_trellis_viterbi_fast.cpp emulates the
// kernel thread by thread and checks it against trellis_viterbi.cpp without a GPU). Design and speed bound:
// docs/kernels.md, "Trellis Viterbi encoder".
//
// One tile per 1024-thread block. Node o (the low 16-K bits of a state) is reached by the 2^K states
// s = (k << (16-K)) | o from the predecessor nodes s >> K = (k << (16-2K)) | (o >> K): every node of one
// "group" g = o >> K has the SAME 2^K predecessors, so a thread owns whole groups (or a slice of one) and loads
// each predecessor cost from shared memory once for several output nodes. Every thread owns exactly 64 states
// (2^16 states / 1024 threads), fixed for all 512 steps, and keeps their codebook values in 32 registers as
// packed fp16 pairs (exact: the codebooks are fp16 values; float(half) is one HADD2.F32).
//
//   K  groups  states/group  outputs/thread  groups/thread  pred loads/thread/step  backpointer bits/thread
//   2   4096       16             16               4                 16                     32
//   3   1024       64              8               1                  8                     24
//   4    256      256              4            1/4 (4 thr.)         16                     16
//   5     64     1024              2           1/16                  32                     10
//   6     16     4096              1           1/64                  64                      6
//
// Thread t's output nodes: node(t, gi, jj) = (gi * 1024 + t) * kOutsPerGroup + jj (gi < kGroupsPerThread,
// jj < kOutsPerGroup): consecutive lanes own consecutive groups, so predecessor loads ((k << (16-2K)) | g) are
// conflict-free (or broadcasts) and a thread's outputs are contiguous (one 16-byte store per 4 nodes).
// The per-step backpointers of a thread (the winning k of each of its nodes, K bits at slot * K) form one uint32,
// stored at bp[step * 1024 + t]: one coalesced 4 KB row per step and tile.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "core/half.h"
#include "core/hd.h"
#include "quant/trellis_decode.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

// Full unrolling matters on the device (register arrays indexed by constants); host compilers ignore it.
#if defined(__CUDA_ARCH__)
#define TRELLM_VFAST_UNROLL _Pragma("unroll")
#else
#define TRELLM_VFAST_UNROLL
#endif

namespace trellm::trellis::vfast {

constexpr int kThreads = 1024;        // threads per tile (one block)
constexpr int kStatesPerThread = 64;  // 65536 / kThreads
constexpr int kCbRegs = kStatesPerThread / 2;
static_assert(kThreads * kStatesPerThread == 65536);

TRELLM_HD constexpr bool fast_k(int K) { return K >= 2 && K <= 6; }

template <int K>
struct Layout {
  static_assert(K >= 2 && K <= 6, "K = 1 (256 KB of costs) and K = 7, 8 (fewer groups than 64-state slices) use the "
                                  "generic kernel");
  static constexpr int kNodes = 1 << (16 - K);
  static constexpr int kBranch = 1 << K;
  static constexpr int kGroupShift = 16 - 2 * K;  // predecessor of (k, group g) = (k << kGroupShift) | g
  static constexpr int kOutsPerThread = kStatesPerThread >> K;
  static constexpr int kGroupsPerThread = kOutsPerThread > kBranch ? kOutsPerThread / kBranch : 1;
  static constexpr int kOutsPerGroup = kOutsPerThread / kGroupsPerThread;  // nodes of one group per thread
  static_assert(kThreads * kOutsPerThread == kNodes, "every node has exactly one owner");
  static_assert(kOutsPerGroup <= kBranch && kBranch % kOutsPerGroup == 0, "a slot run never crosses a group");
  static_assert(kOutsPerThread * K <= 32, "a thread's backpointers fit one uint32 per step");

  // Output node of thread t, group slot gi, node jj within it.
  TRELLM_HD static constexpr uint32_t node(int t, int gi, int jj) {
    return uint32_t((gi * kThreads + t) * kOutsPerGroup + jj);
  }
  // Inverse: the owning thread and the backpointer slot (gi * kOutsPerGroup + jj) of node o.
  TRELLM_HD static constexpr int thread_of(uint32_t o) { return int((o / kOutsPerGroup) % kThreads); }
  TRELLM_HD static constexpr int slot_of(uint32_t o) {
    return int((o / kOutsPerGroup / kThreads) * kOutsPerGroup + o % kOutsPerGroup);
  }
  // State i (0..63) of thread t: slot i / kBranch, branch k = i % kBranch.
  TRELLM_HD static constexpr uint32_t state(int t, int i) {
    const int slot = i / kBranch, k = i % kBranch;
    return (uint32_t(k) << (16 - K)) | node(t, slot / kOutsPerGroup, slot % kOutsPerGroup);
  }
};

static_assert(Layout<3>::thread_of(Layout<3>::node(517, 0, 5)) == 517 && Layout<3>::slot_of(Layout<3>::node(517, 0, 5)) == 5);
static_assert(Layout<2>::thread_of(Layout<2>::node(3, 2, 1)) == 3 && Layout<2>::slot_of(Layout<2>::node(3, 2, 1)) == 9);
static_assert(Layout<6>::node(1023, 0, 0) == 1023 && Layout<4>::node(5, 0, 3) == 23);

// The thread's 64 codebook values as fp16 pairs (state 2r in the low half of register r), from THE decode
// definition (trellis_decode.h).
template <int K>
TRELLM_HD void codebook_regs(int t, Codebook cb, uint32_t (&regs)[kCbRegs]) {
TRELLM_VFAST_UNROLL
  for (int r = 0; r < kCbRegs; r++)
    regs[r] = uint32_t(decode_state(cb, Layout<K>::state(t, 2 * r))) |
              (uint32_t(decode_state(cb, Layout<K>::state(t, 2 * r + 1))) << 16);
}

TRELLM_HD float cb_value(uint32_t reg, int hi) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(uint16_t(hi ? reg >> 16 : reg & 0xFFFFu)));  // HADD2.F32 .H0_H0 / .H1_H1
#else
  return f16_to_f32(uint16_t(hi ? reg >> 16 : reg & 0xFFFFu));
#endif
}

// The branch cost, the same fp32 operations as trellis_viterbi.cpp: d = cb - w (one rounding), fma(d, d, pred).
TRELLM_HD float branch_cost(float cbv, float w, float pred) {
#if defined(__CUDA_ARCH__)
  const float d = __fsub_rn(cbv, w);
  return __fmaf_rn(d, d, pred);
#else
  const float d = cbv - w;
  return std::fma(d, d, pred);
#endif
}

// The CPU starts each node at best = +inf and takes a branch when c < best: for k = 0 that is min(c, inf), which
// FMNMX computes in one instruction (also for a NaN c, which the comparison would skip).
TRELLM_HD float first_best(float c) {
#if defined(__CUDA_ARCH__)
  return fminf(c, __int_as_float(0x7f800000));
#else
  return std::fmin(c, std::numeric_limits<float>::infinity());
#endif
}

// One Viterbi step of thread t: reads the predecessor costs from `cost` (all nodes, linear), writes the thread's
// output nodes into `next` and returns its packed backpointers. Per branch: HADD2.F32 (codebook value), FADD,
// FFMA, and for k > 0 FSETP + FSEL + SEL (first strict minimum over ascending k, as the CPU).
template <int K>
TRELLM_HD uint32_t step(int t, const uint32_t (&cbh)[kCbRegs], float w, const float* __restrict__ cost,
                        float* __restrict__ next) {
  using L = Layout<K>;
  uint32_t bits = 0;
TRELLM_VFAST_UNROLL
  for (int gi = 0; gi < L::kGroupsPerThread; gi++) {
    const uint32_t g = L::node(t, gi, 0) >> K;
    float best[L::kOutsPerGroup];
    uint32_t bk[L::kOutsPerGroup];
TRELLM_VFAST_UNROLL
    for (int k = 0; k < L::kBranch; k++) {
      const float pred = cost[(uint32_t(k) << L::kGroupShift) + g];  // + (g < 2^kGroupShift): immediate offsets
TRELLM_VFAST_UNROLL
      for (int jj = 0; jj < L::kOutsPerGroup; jj++) {
        const int i = (gi * L::kOutsPerGroup + jj) * L::kBranch + k;  // compile-time register index
        const float c = branch_cost(cb_value(cbh[i >> 1], i & 1), w, pred);
        if (k == 0) {
          best[jj] = first_best(c);
          bk[jj] = 0;
        } else if (c < best[jj]) {
          best[jj] = c;
          bk[jj] = uint32_t(k);
        }
      }
    }
    float* out = next + L::node(t, gi, 0);
#if defined(__CUDA_ARCH__)
    if constexpr (L::kOutsPerGroup % 4 == 0) {
TRELLM_VFAST_UNROLL
      for (int jj = 0; jj < L::kOutsPerGroup; jj += 4)
        *reinterpret_cast<float4*>(out + jj) = make_float4(best[jj], best[jj + 1], best[jj + 2], best[jj + 3]);
    } else if constexpr (L::kOutsPerGroup == 2) {
      *reinterpret_cast<float2*>(out) = make_float2(best[0], best[1]);
    } else {
      out[0] = best[0];
    }
#else
    for (int jj = 0; jj < L::kOutsPerGroup; jj++) out[jj] = best[jj];
#endif
TRELLM_VFAST_UNROLL
    for (int jj = 0; jj < L::kOutsPerGroup; jj++) bits |= bk[jj] << (K * (gi * L::kOutsPerGroup + jj));
  }
  return bits;
}

// The winning k of node o at `step`, from a tile's backpointer rows (bp[step * kThreads + thread]).
template <int K>
TRELLM_HD uint32_t backpointer(const uint32_t* bp, int step, uint32_t o) {
  using L = Layout<K>;
  return (bp[size_t(step) * kThreads + L::thread_of(o)] >> (K * L::slot_of(o))) & uint32_t(L::kBranch - 1);
}

}  // namespace trellm::trellis::vfast
