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
  // Group (token, slot) pairs by expert.
  std::vector<std::vector<int64_t>> rows(experts.size());
  for (int64_t i = 0; i < n; i++)
    for (int64_t k = 0; k < K; k++) {
      int32_t e = ids.ptr<int32_t>()[i * K + k];
      TRELLM_ASSERT(e >= 0 && size_t(e) < experts.size(), "expert id ", e);
      rows[e].push_back(i * K + k);
    }
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

}  // namespace trellm
