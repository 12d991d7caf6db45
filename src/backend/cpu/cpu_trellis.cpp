// Trellis-coded Linears on the CPU: y = x·W + b with W = diag(suh)·Hblk·Q·Hblk·diag(svh) in exllamav3's order
// (quant/trellis_ref.h, TRELLIS.md §3), Q through the fused product (trellis_gemm.h): every tile decoded on the fly,
// once per call whatever the number of rows, and nothing decoded kept. A batch of products runs as three
// parallel_for phases (input transforms, strips, output transforms), so the routed experts of a token share them.
#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/trellis_gemm.h"
#include "core/error.h"
#include "core/half.h"
#include "core/thread_pool.h"
#include "quant/hadamard.h"
#include "quant/trellis_weight.h"

namespace trellm {

using namespace cpu;

namespace {

TrellisTiles tiles_of(const trellis::TrellisWeight& w) {
  return {w.trellis, w.K, w.codebook, w.tiles_k(), w.tiles_n()};
}

// Steps 1-2 of the product for one row, bit-identical to trellis::trellis_input_transform: x' = fp16(x ⊙ suh),
// x_h = fp16(FWHT(x') / √128) per 128-run; then permuted for the strips (permute_x).
void input_row(const trellis::TrellisWeight& w, const float* x, float* xp, TrellisIsa isa) {
  const int64_t Kp = w.in_padded;
  thread_local std::vector<float> row, su;
  row.resize(size_t(Kp));
  su.resize(size_t(w.in));
  to_f32(su.data(), w.suh, DType::F16, w.in);
  for (int64_t i = 0; i < w.in; i++) row[i] = x[i] * su[i];
  std::fill(row.begin() + w.in, row.end(), 0.0f);
  round_to_f16(isa, row.data(), w.in);
  for (int64_t c = 0; c < Kp; c += trellis::kHadamardDim) {
    trellis::fwht128(row.data() + c);
    for (int i = 0; i < trellis::kHadamardDim; i++) row[c + i] *= trellis::kHadamardScale;
  }
  round_to_f16(isa, row.data(), Kp);
  permute_x(row.data(), Kp, 1, w.tiles_k(), xp);
}

float bias_at(const TensorView& b, int64_t j) { return load_f32(b.data, b.dtype, j); }

// Steps 4-5 for one row, as trellis::trellis_output_transform: y = (y_h · Hblk) ⊙ svh + bias, trimmed.
void output_row(const trellis::TrellisWeight& w, float* yh, float* y) {
  thread_local std::vector<float> sv;
  sv.resize(size_t(w.out));
  to_f32(sv.data(), w.svh, DType::F16, w.out);
  for (int64_t c = 0; c < w.out_padded; c += trellis::kHadamardDim) trellis::hadamard128(yh + c);
  for (int64_t j = 0; j < w.out; j++) y[j] = yh[j] * sv[j];
  if (w.has_bias())
    for (int64_t j = 0; j < w.out; j++) y[j] += bias_at(w.bias, j);
}

}  // namespace

void CpuBackend::trellis_products(const TrellisJob* jobs, size_t n_jobs) {
  const TrellisIsa isa = trellis_active_isa();
  // Scratch: per job its permuted activations (m x tiles_k x 32) and y_h (m x out_padded).
  struct Plan {
    size_t xp, yh;       // offsets in the two scratch slots
    int64_t group, items;  // strips per work item, work items
  };
  std::vector<Plan> plan(n_jobs);
  size_t xp_n = 0, yh_n = 0;
  std::vector<int64_t> row_start(n_jobs + 1, 0), item_start(n_jobs + 1, 0);
  for (size_t j = 0; j < n_jobs; j++) {
    const trellis::TrellisWeight& w = *jobs[j].w;
    plan[j].xp = xp_n;
    plan[j].yh = yh_n;
    xp_n += size_t(jobs[j].m * w.tiles_k() * kChunk);
    yh_n += size_t(jobs[j].m * w.out_padded);
    plan[j].group = trellis_strip_group(w.tiles_k(), jobs[j].m);
    plan[j].items = (w.tiles_n() + plan[j].group - 1) / plan[j].group;
    row_start[j + 1] = row_start[j] + jobs[j].m;
    item_start[j + 1] = item_start[j] + plan[j].items;
  }
  float* xp = scratch(8, xp_n);
  float* yh = scratch(9, yh_n);
  auto job_of = [&](const std::vector<int64_t>& start, int64_t i) {
    return size_t(std::upper_bound(start.begin(), start.end(), i) - start.begin() - 1);
  };
  parallel_for(row_start[n_jobs], 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const size_t j = job_of(row_start, i);
      const int64_t r = i - row_start[j];
      const trellis::TrellisWeight& w = *jobs[j].w;
      input_row(w, jobs[j].x + r * w.in, xp + plan[j].xp + size_t(r * w.tiles_k() * kChunk), isa);
    }
  });
  parallel_for(item_start[n_jobs], 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const size_t j = job_of(item_start, i);
      const trellis::TrellisWeight& w = *jobs[j].w;
      const int64_t tn0 = (i - item_start[j]) * plan[j].group, tn1 = std::min(w.tiles_n(), tn0 + plan[j].group);
      trellis_strips(isa, tiles_of(w), xp + plan[j].xp, jobs[j].m, yh + plan[j].yh + 16 * tn0, w.out_padded, tn0, tn1);
    }
  });
  parallel_for(row_start[n_jobs], 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const size_t j = job_of(row_start, i);
      const int64_t r = i - row_start[j];
      const trellis::TrellisWeight& w = *jobs[j].w;
      output_row(w, yh + plan[j].yh + size_t(r * w.out_padded), jobs[j].y + r * w.out);
    }
  });
}

void CpuBackend::matmul_trellis(TensorView out, TensorView x, const Linear& w) {
  const TrellisJob job{w.exl3, x.ptr<float>(), x.rows(), out.ptr<float>()};
  trellis_products(&job, 1);
}

}  // namespace trellm
