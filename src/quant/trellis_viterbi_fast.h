// The thread decomposition of the fast CUDA Viterbi (trellis_viterbi.cu, K = 2..6), written once for host and
// device so the CPU can run the very same per-thread step and traceback (tests/quant/test_trellis_viterbi_fast.cpp
// emulates the kernels thread by thread and checks them against trellis_viterbi.cpp without a GPU). Design and
// speed bound: docs/kernels.md, "Trellis Viterbi encoder".
//
// One tile per 1024-thread block. Node o (the low 16-K bits of a state) is reached by the 2^K states
// s = (k << (16-K)) | o from the predecessor nodes s >> K = (k << (16-2K)) | (o >> K): every node of one
// "group" g = o >> K has the SAME 2^K predecessors, so a thread owns whole groups (or a slice of one) and loads
// each predecessor cost from shared memory once for several output nodes. Every thread owns exactly 64 states
// (2^16 states / 1024 threads), fixed for all 512 steps, and keeps their codebook values in 32 registers as
// packed fp16 pairs (exact: the codebooks are fp16 values; float(half) is one HADD2.F32).
//
//   K  groups  states/group  outputs/thread  groups/thread  pred loads/thread/step
//   2   4096       16             16               4                 16
//   3   1024       64              8               1                  8
//   4    256      256              4            1/4 (4 thr.)         16
//   5     64     1024              2           1/16                  32
//   6     16     4096              1           1/64                  64
//
// Thread t's output nodes: node(t, gi, jj) = (gi * 1024 + t) * kOutsPerGroup + jj (gi < kGroupsPerThread,
// jj < kOutsPerGroup): consecutive lanes own consecutive groups, so predecessor loads ((k << (16-2K)) | g) are
// conflict-free (or broadcasts) and a thread's outputs are contiguous (one 16-byte store per 4 nodes).
//
// Deferred argmin: the step keeps only the running minimum of each node (FMNMX: 4 instructions per branch instead
// of 6 with the argmin's compare and two selects) and writes its output costs to a row in global memory; the
// traceback recomputes the 2^K branches of the one node on the path from the costs before the step, with the same
// arithmetic and the same tie rule, which gives the winner the argmin would have stored. Rows are written for
// every step at K >= 4; at K = 2, 3 (the largest rows: 64 and 32 KB) only after odd steps, and the traceback
// recomputes the costs after an even step from the row before it (2^K predecessors x 2^K branches).
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

  // Output node of thread t, group slot gi, node jj within it.
  TRELLM_HD static constexpr uint32_t node(int t, int gi, int jj) {
    return uint32_t((gi * kThreads + t) * kOutsPerGroup + jj);
  }
  // Inverse: the owning thread and the slot (gi * kOutsPerGroup + jj) of node o.
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

// The value of state s, as cb_value gives it from the registers (the traceback has no registers to read).
TRELLM_HD float state_value(Codebook cb, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(decode_state(cb, s)));
#else
  return f16_to_f32(decode_state(cb, s));
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

// The CPU starts each node at best = +inf and takes a branch when c < best. The value that leaves is the minimum of
// the branches that are not NaN (+inf if none), in any order: fmin with +inf for k = 0, then fmin (one FMNMX each;
// fmin returns the other operand of a NaN, as the comparison skips it). Costs are never -0 (d * d + cost >= +0,
// all costs start at +0 or +inf), so fmin's choice between zeros cannot differ either.
TRELLM_HD float first_best(float c) {
#if defined(__CUDA_ARCH__)
  return fminf(c, __int_as_float(0x7f800000));
#else
  return std::fmin(c, std::numeric_limits<float>::infinity());
#endif
}
TRELLM_HD float min_cost(float best, float c) {
#if defined(__CUDA_ARCH__)
  return fminf(best, c);
#else
  return std::fmin(best, c);
#endif
}

// Which steps keep their output costs (the costs the following step reads), and where. Pass 1 (positions
// 128..255, 0..127 from all-zero costs) traces steps 128..255 and needs the costs after steps 127..254; pass 2
// traces all 256 steps from its initial costs. Rows per tile: 256 at K >= 4 (row p), 128 at K = 2, 3 (row p / 2,
// odd p): 4 MiB at K = 3 and 4, 8 MiB at K = 2, 2 MiB at K = 5, 1 MiB at K = 6.
template <int K>
TRELLM_HD constexpr bool every_step() { return K >= 4; }
template <int K>
constexpr int kCostRows = every_step<K>() ? 256 : 128;
template <int K>
TRELLM_HD constexpr bool keeps_costs(bool second, int p) {
  return p < 255 && (second || p >= 127) && (every_step<K>() || (p & 1));
}
template <int K>
TRELLM_HD constexpr int cost_row(int p) { return every_step<K>() ? p : p >> 1; }

// One Viterbi step of thread t: reads the predecessor costs from `cost` (all nodes, linear), writes the thread's
// output nodes into `next`, and into `row` (the step's row in global memory) when `keep`. `row` is always a valid
// address: with a null row tested instead, nvcc 13.0 stored through the null pointer at K = 3 (compute-sanitizer,
// H200). Per branch:
// HADD2.F32 (codebook value), FADD, FFMA, and for k > 0 FMNMX.
template <int K>
TRELLM_HD void step(int t, const uint32_t (&cbh)[kCbRegs], float w, const float* __restrict__ cost,
                    float* __restrict__ next, float* __restrict__ row, bool keep) {
  using L = Layout<K>;
TRELLM_VFAST_UNROLL
  for (int gi = 0; gi < L::kGroupsPerThread; gi++) {
    const uint32_t g = L::node(t, gi, 0) >> K;
    float best[L::kOutsPerGroup];
TRELLM_VFAST_UNROLL
    for (int k = 0; k < L::kBranch; k++) {
      const float pred = cost[(uint32_t(k) << L::kGroupShift) + g];  // + (g < 2^kGroupShift): immediate offsets
TRELLM_VFAST_UNROLL
      for (int jj = 0; jj < L::kOutsPerGroup; jj++) {
        const int i = (gi * L::kOutsPerGroup + jj) * L::kBranch + k;  // compile-time register index
        const float c = branch_cost(cb_value(cbh[i >> 1], i & 1), w, pred);
        best[jj] = k == 0 ? first_best(c) : min_cost(best[jj], c);
      }
    }
    const uint32_t o = L::node(t, gi, 0);
#if defined(__CUDA_ARCH__)
    if constexpr (L::kOutsPerGroup % 4 == 0) {
TRELLM_VFAST_UNROLL
      for (int jj = 0; jj < L::kOutsPerGroup; jj += 4) {
        const float4 v = make_float4(best[jj], best[jj + 1], best[jj + 2], best[jj + 3]);
        *reinterpret_cast<float4*>(next + o + jj) = v;
        if (keep) __stcs(reinterpret_cast<float4*>(row + o + jj), v);  // streamed: read once, by the traceback
      }
    } else if constexpr (L::kOutsPerGroup == 2) {
      const float2 v = make_float2(best[0], best[1]);
      *reinterpret_cast<float2*>(next + o) = v;
      if (keep) __stcs(reinterpret_cast<float2*>(row + o), v);
    } else {
      next[o] = best[0];
      if (keep) __stcs(row + o, best[0]);
    }
#else
    for (int jj = 0; jj < L::kOutsPerGroup; jj++) {
      next[o + jj] = best[jj];
      if (keep) row[o + jj] = best[jj];
    }
#endif
  }
}

// The traceback's view of one pass of one tile: its targets in step order, its cost rows, and its initial costs
// (pass 1: all +0; pass 2: +0 at node e, +inf elsewhere).
struct TracePass {
  Codebook cb;
  const float* seq;   // 256 targets in the pass's step order
  const float* rows;  // kCostRows<K> rows of kNodes costs
  bool second;
  uint32_t e;
};

// The cost of node q before step p (= after step p - 1), as the forward pass had it.
template <int K>
TRELLM_HD float cost_before(const TracePass& tp, int p, uint32_t q) {
  using L = Layout<K>;
  const auto initial = [&](uint32_t n) { return !tp.second || n == tp.e ? 0.0f : __builtin_huge_valf(); };
  if (p == 0) return initial(q);
  if (keeps_costs<K>(tp.second, p - 1)) return tp.rows[size_t(cost_row<K>(p - 1)) * L::kNodes + q];
  // K = 2, 3 and p - 1 even: step p - 1 again for node q alone, from the row before it (or the initial costs)
  float best = 0.0f;
TRELLM_VFAST_UNROLL
  for (int j = 0; j < L::kBranch; j++) {
    const uint32_t pred = (uint32_t(j) << L::kGroupShift) | (q >> K);
    const float pc = p == 1 ? initial(pred) : tp.rows[size_t(cost_row<K>(p - 2)) * L::kNodes + pred];
    const float c = branch_cost(state_value(tp.cb, (uint32_t(j) << (16 - K)) | q), tp.seq[p - 1], pc);
    best = j == 0 ? first_best(c) : min_cost(best, c);
  }
  return best;
}

// The cost of branch k into node o at step p: its winner is the CPU's first strict minimum over ascending k.
template <int K>
TRELLM_HD float traced_branch(const TracePass& tp, int p, uint32_t o, int k) {
  const uint32_t q = (uint32_t(k) << Layout<K>::kGroupShift) | (o >> K);
  return branch_cost(state_value(tp.cb, (uint32_t(k) << (16 - K)) | o), tp.seq[p], cost_before<K>(tp, p, q));
}

// The winning k of node o at step p, serially (the CPU emulation; the kernel splits k across a warp).
template <int K>
TRELLM_HD uint32_t traced_winner(const TracePass& tp, int p, uint32_t o) {
  float best = first_best(traced_branch<K>(tp, p, o, 0));
  uint32_t bk = 0;
  for (int k = 1; k < Layout<K>::kBranch; k++) {
    const float c = traced_branch<K>(tp, p, o, k);
    if (c < best) best = c, bk = uint32_t(k);
  }
  return bk;
}

}  // namespace trellm::trellis::vfast
