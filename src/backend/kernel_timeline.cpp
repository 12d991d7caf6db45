#include "backend/kernel_timeline.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <map>

#include "core/error.h"

namespace trellm {

namespace {

struct Launch {
  uint64_t arrive = UINT64_MAX, release = UINT64_MAX, last_go = 0;
  uint64_t mark[kClockMarks] = {};  // the latest of each mark (0: none)
  double hop_sum[kClockMarks] = {};   // summed over the blocks that passed the mark: from their previous point
  int hop_n[kClockMarks] = {};
  int blocks = 0;
};

}  // namespace

std::vector<StepTimeline> build_timeline(std::span<const ClockRecord> records, std::span<const GraphKernel> kernels) {
  if (kernels.empty()) fail("kernel clocks: the graph has no kernels");
  // A launch's wait returns only after its predecessor completed, so in one stream every block of launch k
  // returns before any block of launch k + 1: ordered by return, each launch is one run of records. Runs, not
  // ids, separate launches: a replayed graph reuses its nodes' %gridid at every replay.
  std::vector<ClockRecord> r(records.begin(), records.end());
  for (const ClockRecord& x : r)
    if (x.t_go < x.t_wait) fail("kernel clocks: a block of launch ", x.launch, " returned from its wait before it reached it");
  std::sort(r.begin(), r.end(), [](const ClockRecord& x, const ClockRecord& y) {
    return x.t_go != y.t_go ? x.t_go < y.t_go : x.launch < y.launch;
  });
  std::vector<Launch> order;
  for (size_t i = 0; i < r.size(); i++) {
    if (i == 0 || r[i].launch != r[i - 1].launch) order.emplace_back();
    Launch& l = order.back();
    l.arrive = std::min(l.arrive, r[i].t_wait);
    l.release = std::min(l.release, r[i].t_go);
    l.last_go = std::max(l.last_go, r[i].t_go);
    uint64_t prev = r[i].t_go;  // the block's previous point
    for (int m = 0; m < kClockMarks; m++) {
      const uint64_t t = r[i].t_mark[m];
      if (t == 0) continue;
      if (t < prev)
        fail("kernel clocks: a block of launch ", r[i].launch, " passed its ", kMarkNames[m], " mark before ",
             prev == r[i].t_go ? "its wait returned" : "its previous mark");
      l.mark[m] = std::max(l.mark[m], t);
      l.hop_sum[m] += double(t - prev);
      l.hop_n[m]++;
      prev = t;
    }
    l.blocks++;
  }
  const size_t K = kernels.size();
  if (order.size() % K != 0)
    fail("kernel clocks: ", order.size(), " launches recorded, not whole steps of the graph's ", K,
         " kernels (a kernel that never reaches grid_wait, records dropped, or another graph replayed)");
  const size_t steps = order.size() / K;
  if (steps < 2) fail("kernel clocks: ", steps, " step recorded; two or more are needed (the next step closes the last kernel)");
  for (size_t i = 0; i < order.size(); i++)
    if (order[i].blocks > kernels[i % K].blocks)
      fail("kernel clocks: launch ", i % K, " of step ", i / K, " recorded ", order[i].blocks, " blocks, but ", kernels[i % K].name,
           " has a grid of ", kernels[i % K].blocks, ": the records do not line up with the graph");
  std::vector<StepTimeline> out(steps - 1);
  for (size_t s = 0; s + 1 < steps; s++) {
    const uint64_t t0 = order[s * K].release;
    StepTimeline& st = out[s];
    st.step_us = double(order[(s + 1) * K].release - t0) * 1e-3;
    for (size_t k = 0; k < K; k++) {
      const Launch& l = order[s * K + k];
      KernelSpan sp;
      sp.blocks = l.blocks;
      sp.release_us = double(l.release - t0) * 1e-3;
      sp.lead_us = double(l.release - l.arrive) * 1e-3;
      sp.path_us = double(order[s * K + k + 1].release - l.release) * 1e-3;
      sp.last_go_us = double(l.last_go - l.release) * 1e-3;
      for (int m = 0; m < kClockMarks; m++) {
        sp.mark_us[m] = l.mark[m] ? double(l.mark[m] - l.release) * 1e-3 : -1.0;
        sp.block_us[m] = l.hop_n[m] ? l.hop_sum[m] / l.hop_n[m] * 1e-3 : -1.0;
      }
      st.kernels.push_back(sp);
    }
  }
  return out;
}

StepSplit split_step(const std::vector<StepTimeline>& steps) {
  StepSplit t;
  if (steps.empty()) return t;
  for (const StepTimeline& st : steps) {
    t.step_us += st.step_us;
    for (const KernelSpan& k : st.kernels) {
      if (*std::max_element(std::begin(k.mark_us), std::end(k.mark_us)) < 0) {
        t.unmarked_us += k.path_us;
        continue;
      }
      // Points in chain order, each clamped to [previous point, path]: a part is never negative, and the parts
      // of a kernel add up to its share.
      double at = std::clamp(k.last_go_us, 0.0, k.path_us);
      t.start_us += at;
      auto part = [&](double mark, double& into) {
        if (mark < 0) return;
        const double p = std::clamp(mark, at, k.path_us);
        into += p - at;
        at = p;
      };
      part(k.mark_us[0], t.staging_us);                        // inputs
      part(k.mark_us[1], t.compute_us);                        // math
      part(std::max(k.mark_us[2], k.mark_us[3]), t.tail_us);  // arrived, stored
      t.drain_us += k.path_us - at;
    }
  }
  const double n = double(steps.size());
  for (double* v : {&t.start_us, &t.staging_us, &t.compute_us, &t.tail_us, &t.drain_us, &t.unmarked_us, &t.step_us}) *v /= n;
  return t;
}

std::vector<KernelSummary> summarize(const std::vector<StepTimeline>& steps, std::span<const GraphKernel> kernels) {
  std::vector<KernelSummary> out;
  if (steps.empty()) return out;
  std::map<std::string, size_t> index;
  std::vector<std::array<int, kClockMarks>> marked;  // launches that marked each mark, per summary
  for (const GraphKernel& k : kernels)
    if (index.emplace(k.name, out.size()).second) {
      out.push_back(KernelSummary{k.name, 0, 0.0, 0.0, 0.0, 0.0, {}, {}});
      marked.push_back({});
    }
  for (const GraphKernel& k : kernels) out[index[k.name]].launches++;
  for (const StepTimeline& st : steps) {
    TRELLM_ASSERT(st.kernels.size() == kernels.size(), "summarize: a step of ", st.kernels.size(), " kernels, the graph has ",
                  kernels.size());
    for (size_t k = 0; k < st.kernels.size(); k++) {
      const KernelSpan& sp = st.kernels[k];
      const size_t i = index[kernels[k].name];
      KernelSummary& s = out[i];
      s.path_us += sp.path_us;
      s.lead_us += sp.lead_us;
      s.hidden += sp.lead_us >= 0.5 ? 1.0 : 0.0;
      s.last_go_us += sp.last_go_us;
      for (int m = 0; m < kClockMarks; m++)
        if (sp.mark_us[m] >= 0) s.mark_us[m] += sp.mark_us[m], s.block_us[m] += sp.block_us[m], marked[i][m]++;
    }
  }
  const double n = double(steps.size());
  for (size_t i = 0; i < out.size(); i++) {
    KernelSummary& s = out[i];
    const double launches = n * s.launches;
    s.path_us /= n;
    s.lead_us /= launches;
    s.hidden /= launches;
    s.last_go_us /= launches;
    for (int m = 0; m < kClockMarks; m++) {
      s.mark_us[m] = marked[i][m] ? s.mark_us[m] / marked[i][m] : -1.0;
      s.block_us[m] = marked[i][m] ? s.block_us[m] / marked[i][m] : -1.0;
    }
  }
  return out;
}

std::string short_kernel_name(const std::string& d) {
  std::string s = d;
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  // Parameters: the first '(' outside template brackets that is not "(anonymous namespace)".
  int depth = 0;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == '<') depth++;
    else if (s[i] == '>') depth--;
    else if (s[i] == '(' && depth == 0 && s.compare(i, 21, "(anonymous namespace)") != 0) {
      s.resize(i);
      break;
    }
  }
  // Namespaces and classes: drop every "name::" and "(anonymous namespace)::".
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    if (s.compare(i, 23, "(anonymous namespace)::") == 0) {
      i += 23;
      continue;
    }
    size_t j = i;
    while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) j++;
    if (j > i && s.compare(j, 2, "::") == 0) {
      i = j + 2;
      continue;
    }
    if (j > i) {
      out.append(s, i, j - i);
      i = j;
    } else {
      out.push_back(s[i++]);
    }
  }
  return out;
}

}  // namespace trellm
