// MoE on the CPU: sigmoid router with selection bias (DeepSeek-V3 "noaux_tc") and the expert FFNs,
// tokens grouped by expert so each expert's weights are read once per call.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "core/error.h"
#include "core/thread_pool.h"

namespace trellm {

using namespace cpu;

void CpuBackend::moe_route(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias,
                           const MoeRouting& r) {
  const int64_t n = x.rows(), hidden = x.cols(), E = r.n_experts, K = r.top_k;
  TRELLM_ASSERT(gate.dim(0) == E && gate.dim(1) == hidden && weights.rows() == n && weights.cols() == K &&
                ids.rows() == n && ids.cols() == K && ids.dtype == DType::I32);
  TRELLM_ASSERT(bias.empty() || (bias.numel() == E && bias.dtype == DType::F32));
  TRELLM_ASSERT(E % r.n_group == 0 && r.topk_group <= r.n_group && K <= E);
  float* gf = scratch(0, size_t(E * hidden));
  to_f32(gf, gate.data, gate.dtype, E * hidden);
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> s(E), choice(E);
    std::vector<int> order(E);
    for (int64_t i = b; i < e; i++) {
      const float* xi = x.ptr<float>() + i * hidden;
      for (int64_t k = 0; k < E; k++) {
        s[k] = 1.0f / (1.0f + std::exp(-dot(gf + k * hidden, xi, hidden)));  // sigmoid, f32 like transformers
        choice[k] = s[k] + (bias.empty() ? 0.0f : bias.ptr<float>()[k]);   // bias: selection only
      }
      if (r.n_group > 1) {  // keep the topk_group groups whose two best scores sum highest
        const int64_t gs = E / r.n_group;
        std::vector<float> gscore(r.n_group);
        for (int g = 0; g < r.n_group; g++) {
          std::vector<float> v(choice.begin() + g * gs, choice.begin() + (g + 1) * gs);
          std::partial_sort(v.begin(), v.begin() + std::min<int64_t>(2, gs), v.end(), std::greater<float>());
          gscore[g] = v[0] + (gs > 1 ? v[1] : 0.0f);
        }
        std::vector<int> gorder(r.n_group);
        std::iota(gorder.begin(), gorder.end(), 0);
        std::stable_sort(gorder.begin(), gorder.end(), [&](int a, int c) { return gscore[a] > gscore[c]; });
        for (int g = r.topk_group; g < r.n_group; g++)
          for (int64_t k = gorder[g] * gs; k < (gorder[g] + 1) * gs; k++) choice[k] = -std::numeric_limits<float>::infinity();
      }
      std::iota(order.begin(), order.end(), 0);
      // Highest choice first; ties go to the lower expert index.
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int a, int c) {
        return choice[a] > choice[c] || (choice[a] == choice[c] && a < c);
      });
      float sum = 0;
      for (int64_t k = 0; k < K; k++) sum += s[order[k]];
      const float norm = r.norm_topk_prob ? 1.0f / (sum + 1e-20f) : 1.0f;
      for (int64_t k = 0; k < K; k++) {
        ids.ptr<int32_t>()[i * K + k] = order[k];
        weights.ptr<float>()[i * K + k] = s[order[k]] * norm * r.routed_scaling_factor;
      }
    }
  });
}

void CpuBackend::moe_ffn(TensorView out, TensorView x, TensorView weights, TensorView ids,
                         std::span<const Expert> experts, const Expert* shared) {
  const int64_t n = x.rows(), hidden = x.cols(), K = ids.cols();
  TRELLM_ASSERT(out.rows() == n && out.cols() == hidden && out.data != x.data && ids.rows() == n);
  std::memset(out.data, 0, out.nbytes());
  // Group (token, slot) pairs by expert: only the routed experts run, each over its rows.
  std::vector<std::vector<int64_t>> rows(experts.size());
  for (int64_t i = 0; i < n; i++)
    for (int64_t k = 0; k < K; k++) {
      int32_t e = ids.ptr<int32_t>()[i * K + k];
      TRELLM_ASSERT(e >= 0 && size_t(e) < experts.size(), "expert id ", e);
      rows[e].push_back(i * K + k);
    }
  auto trellis_expert = [](const Expert& ex) {
    return ex.gate.exl3 && ex.up.exl3 && ex.down.exl3 && ex.gate.bias.empty() && ex.up.bias.empty() && ex.down.bias.empty();
  };
  bool all_trellis = !observer_ && (!shared || trellis_expert(*shared));
  for (size_t e = 0; e < experts.size(); e++) all_trellis = all_trellis && (rows[e].empty() || trellis_expert(experts[e]));
  if (all_trellis) return moe_ffn_trellis(out, x, weights, rows, K, experts, shared);
  auto run_expert = [&](const Expert& ex, int64_t m, const float* xs, float* ys) {
    const int64_t inter = ex.gate.out;
    float* g = scratch(1, size_t(m * inter));
    float* u = scratch(2, size_t(m * inter));
    matmul(TensorView(g, DType::F32, {m, inter}), TensorView(const_cast<float*>(xs), DType::F32, {m, hidden}), ex.gate);
    matmul(TensorView(u, DType::F32, {m, inter}), TensorView(const_cast<float*>(xs), DType::F32, {m, hidden}), ex.up);
    silu_mul(TensorView(g, DType::F32, {m, inter}), TensorView(g, DType::F32, {m, inter}), TensorView(u, DType::F32, {m, inter}));
    matmul(TensorView(ys, DType::F32, {m, hidden}), TensorView(g, DType::F32, {m, inter}), ex.down);
  };
  for (size_t e = 0; e < experts.size(); e++) {
    const int64_t m = int64_t(rows[e].size());
    if (!m) continue;
    float* xs = scratch(3, size_t(m * hidden));
    float* ys = scratch(4, size_t(m * hidden));
    for (int64_t r = 0; r < m; r++)
      std::memcpy(xs + r * hidden, x.ptr<float>() + (rows[e][r] / K) * hidden, sizeof(float) * hidden);
    run_expert(experts[e], m, xs, ys);
    for (int64_t r = 0; r < m; r++)
      axpy(out.ptr<float>() + (rows[e][r] / K) * hidden, weights.ptr<float>()[rows[e][r]], ys + r * hidden, hidden);
  }
  if (shared) {
    float* ys = scratch(4, size_t(n * hidden));
    run_expert(*shared, n, x.ptr<float>(), ys);
    add(out, out, TensorView(ys, DType::F32, {n, hidden}));
  }
}

// Trellis experts: the routed experts in batches of up to kBatchRows rows (all of a decode step's in one), each
// batch as two shared product phases (every expert's gate and up, then every down), the shared expert in the first
// batch. A token's result is the same sum in the same order as one expert at a time: its routed experts by
// increasing id, then the shared expert.
void CpuBackend::moe_ffn_trellis(TensorView out, TensorView x, TensorView weights,
                                 const std::vector<std::vector<int64_t>>& rows, int64_t K, std::span<const Expert> experts,
                                 const Expert* shared) {
  const int64_t n = x.rows(), hidden = x.cols();
  constexpr int64_t kBatchRows = 1024;
  struct Run {
    const Expert* ex;
    const std::vector<int64_t>* rows;  // nullptr: the shared expert (every token)
    int64_t m, inter;
    size_t x_at, h_at, y_at;  // offsets in the scratch slots (x rows, gate/up, out rows)
  };
  std::vector<Run> batch;
  std::vector<TrellisJob> jobs;
  float* ys_shared = nullptr;
  auto flush = [&] {
    if (batch.empty()) return;
    size_t xn = 0, hn = 0, yn = 0;
    for (Run& r : batch) {
      r.x_at = xn;
      r.h_at = hn;
      r.y_at = yn;
      xn += size_t(r.m * hidden);
      hn += size_t(2 * r.m * r.inter);
      yn += size_t(r.m * hidden);
    }
    float* xs = scratch(3, xn);
    float* hs = scratch(1, hn);
    float* ys = scratch(4, yn);
    for (const Run& r : batch)
      if (r.rows)
        for (int64_t i = 0; i < r.m; i++)
          std::memcpy(xs + r.x_at + i * hidden, x.ptr<float>() + ((*r.rows)[i] / K) * hidden, sizeof(float) * hidden);
    jobs.clear();
    for (const Run& r : batch) {
      const float* xr = r.rows ? xs + r.x_at : x.ptr<float>();
      jobs.push_back({r.ex->gate.exl3, xr, r.m, hs + r.h_at});
      jobs.push_back({r.ex->up.exl3, xr, r.m, hs + r.h_at + r.m * r.inter});
    }
    trellis_products(jobs.data(), jobs.size());
    jobs.clear();
    for (const Run& r : batch) {
      const TensorView g(hs + r.h_at, DType::F32, {r.m, r.inter}), u(hs + r.h_at + r.m * r.inter, DType::F32, {r.m, r.inter});
      silu_mul(g, g, u);
      jobs.push_back({r.ex->down.exl3, hs + r.h_at, r.m, ys + r.y_at});
    }
    trellis_products(jobs.data(), jobs.size());
    for (const Run& r : batch) {
      if (!r.rows) {  // kept for the end: the shared expert comes last in every token's sum
        ys_shared = scratch(10, size_t(n * hidden));
        std::memcpy(ys_shared, ys + r.y_at, sizeof(float) * size_t(n * hidden));
        continue;
      }
      for (int64_t i = 0; i < r.m; i++)
        axpy(out.ptr<float>() + ((*r.rows)[i] / K) * hidden, weights.ptr<float>()[(*r.rows)[i]], ys + r.y_at + i * hidden,
             hidden);
    }
    batch.clear();
  };
  int64_t batch_rows = 0;
  if (shared) {
    batch.push_back({shared, nullptr, n, shared->gate.out, 0, 0, 0});
    batch_rows += n;
  }
  for (size_t e = 0; e < experts.size(); e++) {
    const int64_t m = int64_t(rows[e].size());
    if (!m) continue;
    if (batch_rows > 0 && batch_rows + m > kBatchRows) {
      flush();
      batch_rows = 0;
    }
    batch.push_back({&experts[e], &rows[e], m, experts[e].gate.out, 0, 0, 0});
    batch_rows += m;
  }
  flush();
  if (shared) add(out, out, TensorView(ys_shared, DType::F32, {n, hidden}));
}

}  // namespace trellm
