#include "backend/step_plan.h"

#include <algorithm>
#include <functional>
#include <map>
#include <queue>

#include "core/error.h"

namespace trellm::step {

const char* task_name(Task t) {
  switch (t) {
    case Task::Embed: return "embed";
    case Task::AttnIn: return "attn_in";
    case Task::QB: return "q_b";
    case Task::KvAppend: return "kv_append";
    case Task::QAbsorb: return "q_absorb";
    case Task::MlaSplit: return "mla_split";
    case Task::MlaCombine: return "mla_combine";
    case Task::OProj: return "o_proj";
    case Task::Router: return "router";
    case Task::GateUp: return "gate_up";
    case Task::Down: return "down";
    case Task::DenseGateUp: return "dense_gate_up";
    case Task::DenseDown: return "dense_down";
    case Task::Head: return "head";
    case Task::Sample: return "sample";
  }
  return "?";
}

StepShape StepShape::glm47_flash() { return StepShape{}; }

namespace {

constexpr int kCols = 128;  // output columns per GEMV tile (as the trellis GEMV's column groups)
constexpr int kChunk = 128;  // k rows per chunk

int div_up(int a, int b) { return (a + b - 1) / b; }

// Builds tiles task by task; a task's output groups get consecutive counters.
struct Builder {
  StepPlan& p;
  const CostModel& m;

  std::vector<bool> read;  // per counter: a tile waits for it (no tile may arrive on it after that)

  int counters(Task t, int layer, int groups) {
    const int base = p.counters();
    for (int g = 0; g < groups; g++) p.counter_info.push_back({t, layer, g, 0});
    read.resize(p.counter_info.size(), false);
    return base;
  }
  // Topological order by construction: a tile may only wait for counters whose tiles are all added.
  void tile(Task t, int layer, int counter, int split, int64_t weights, int64_t bytes, std::vector<int> deps,
            bool routed = false, int64_t weight_bytes = 0) {
    CounterInfo& c = p.counter_info[size_t(counter)];
    TRELLM_ASSERT(c.task == t && c.layer == layer, "step plan: tile of ", task_name(t), " arrives on another task's counter");
    TRELLM_ASSERT(!read[size_t(counter)], "step plan: a ", task_name(t), " tile arrives on a counter already waited for");
    for (int d : deps) {
      TRELLM_ASSERT(d >= 0 && d < p.counters() && d != counter, "step plan: ", task_name(t), " waits for a bad counter");
      read[size_t(d)] = true;
    }
    c.arrivals++;
    p.tiles.push_back(Tile{t, layer, c.group, split, weights, bytes, weight_bytes, routed, std::move(deps), counter});
  }
  static std::vector<int> range(int base, int n) {
    std::vector<int> v(size_t(std::max(n, 0)));
    for (int i = 0; i < n; i++) v[size_t(i)] = base + i;
    return v;
  }
  // k-splits so that the task's tiles number about `waves` per SM, at least one chunk each.
  int splits_for(int groups, int in) const {
    return std::clamp(int(m.waves * m.sms) / std::max(groups, 1), 1, div_up(in, kChunk));
  }

  // A GEMV of `out` columns in groups of 128 (gates: 2 products sharing the groups), `in` deep, split over k.
  // Each tile's dependencies come from deps_of(k chunk range [c0, c1)). Returns the first counter.
  int gemv(Task t, int layer, int out, int in, int products, const std::function<std::vector<int>(int, int)>& deps_of) {
    const int groups = div_up(out, kCols), chunks = div_up(in, kChunk), splits = splits_for(groups * products, in);
    const int base = counters(t, layer, groups);
    for (int z = 0; z < splits; z++) {
      const int c0 = z * chunks / splits, c1 = (z + 1) * chunks / splits;
      const int64_t w = int64_t(kCols) * std::min(in - c0 * kChunk, (c1 - c0) * kChunk);
      for (int pr = 0; pr < products; pr++)
        for (int g = 0; g < groups; g++) tile(t, layer, base + g, z, w, 0, deps_of(c0, c1));
    }
    return base;
  }
};

}  // namespace

StepPlan build_tiles(const StepShape& s, const CostModel& m) {
  if (s.rows < 1 || s.rows > 8) fail("step plan: rows ", s.rows, ": the persistent decode kernel takes 1..8");
  if (s.layers < 1 || s.dense_layers < 0 || s.dense_layers > s.layers)
    fail("step plan: ", s.dense_layers, " dense layers of ", s.layers);
  if (s.context < 1 || m.sms < 1) fail("step plan: context ", s.context, ", SMs ", m.sms, ": need at least 1 each");
  StepPlan p;
  p.shape = s;
  Builder b{p, m, {}};
  auto all = [](int base, int n) { return [=](int, int) { return Builder::range(base, n); }; };

  const int embed = b.counters(Task::Embed, -1, 1);
  b.tile(Task::Embed, -1, embed, 0, 0, int64_t(s.rows) * s.hidden * 2, {});
  std::vector<int> residual = {embed};  // the counters of the layer input (all groups of the last residual)
  const int qk = s.nope + s.rope, jobs = s.rows * (s.top_k + s.shared_experts);
  for (int l = 0; l < s.layers; l++) {
    // Attention: the norm needs the whole residual row, so every attn_in tile waits for all of it.
    const int qa_groups = div_up(s.q_lora, kCols);
    const int qa = b.gemv(Task::AttnIn, l, qa_groups * kCols + s.kv_lora + s.rope, s.hidden, 1,
                          [&](int, int) { return residual; });
    const int kv_groups = div_up(qa_groups * kCols + s.kv_lora + s.rope, kCols) - qa_groups;
    const int qb = b.gemv(Task::QB, l, s.heads * qk, s.q_lora, 1, all(qa, qa_groups));
    const int kv = b.counters(Task::KvAppend, l, 1);
    b.tile(Task::KvAppend, l, kv, 0, 0, int64_t(s.rows) * (s.kv_lora + s.rope) * 2, Builder::range(qa + qa_groups, kv_groups));
    const int qabs = b.counters(Task::QAbsorb, l, s.heads);
    for (int h = 0; h < s.heads; h++) {  // the q_b groups holding head h's columns
      const int g0 = h * qk / kCols, g1 = div_up((h + 1) * qk, kCols);
      b.tile(Task::QAbsorb, l, qabs + h, 0, int64_t(s.nope) * s.kv_lora, 0, Builder::range(qb + g0, g1 - g0));
    }
    // MLA: a tile per (row, context split) with all heads on the tensor cores' M (the latents are read once for the
    // 20 heads); the splits of a row fill about two waves of SMs together.
    const int ctx_splits = std::clamp(div_up(s.context, 64), 1, std::max(1, 2 * m.sms / s.rows));
    const int mla = b.counters(Task::MlaSplit, l, s.rows);
    for (int r = 0; r < s.rows; r++)
      for (int z = 0; z < ctx_splits; z++) {
        const int k0 = int(int64_t(z) * s.context / ctx_splits), k1 = int(int64_t(z + 1) * s.context / ctx_splits);
        std::vector<int> deps = Builder::range(qabs, s.heads);
        deps.push_back(kv);
        b.tile(Task::MlaSplit, l, mla + r, z, 0, int64_t(k1 - k0) * (s.kv_lora + s.rope) * 2, std::move(deps));
      }
    const int comb = b.counters(Task::MlaCombine, l, s.heads);
    for (int h = 0; h < s.heads; h++) b.tile(Task::MlaCombine, l, comb + h, 0, int64_t(s.kv_lora) * s.v_head, 0, Builder::range(mla, s.rows));
    // o_proj: a k-split reads only the heads its k range covers.
    const int o = b.gemv(Task::OProj, l, s.hidden, s.heads * s.v_head, 1, [&](int c0, int c1) {
      const int h0 = c0 * kChunk / s.v_head, h1 = std::min(s.heads, div_up(c1 * kChunk, s.v_head));
      return Builder::range(comb + h0, h1 - h0);
    });
    const int hidden_groups = div_up(s.hidden, kCols);
    const int router = b.counters(Task::Router, l, 1);
    const bool dense = l < s.dense_layers;
    // The gate (64 experts x hidden, bf16: 256 KB) in 8 slices of 32 KB, each read ahead into shared memory; one
    // tile reading all of it at one SM's share of the bandwidth would take ~7 µs on the critical path.
    const int gate_slices = dense ? 1 : 8;
    for (int k = 0; k < gate_slices; k++)
      b.tile(Task::Router, l, router, k, 0, 0, Builder::range(o, hidden_groups), false,
             dense ? 0 : int64_t(s.hidden) * 64 * 2 / gate_slices);
    if (dense) {
      const int gu = b.gemv(Task::DenseGateUp, l, s.dense_inter, s.hidden, 2, all(router, 1));
      const int dn = b.gemv(Task::DenseDown, l, s.hidden, s.dense_inter, 1,
                            [&](int c0, int c1) { return Builder::range(gu + c0, c1 - c0); });  // chunk c = gate/up group c
      residual = Builder::range(dn, hidden_groups);
      continue;
    }
    // MoE: jobs (row, slot); the routed slots' experts are read from the router's output at run time. A down
    // k-split reads the gate/up groups of its own job that its k range covers.
    const int inter_groups = div_up(s.moe_inter, kCols), ichunks = div_up(s.moe_inter, kChunk);
    const int s_gu = b.splits_for(2 * jobs * inter_groups, s.hidden), s_d = b.splits_for(jobs * hidden_groups, s.moe_inter);
    const int gu = b.counters(Task::GateUp, l, jobs * inter_groups);
    const int hchunks = div_up(s.hidden, kChunk);
    for (int z = 0; z < s_gu; z++) {
      const int c0 = z * hchunks / s_gu, c1 = (z + 1) * hchunks / s_gu;
      const int64_t w = int64_t(kCols) * std::min(s.hidden - c0 * kChunk, (c1 - c0) * kChunk);
      for (int which = 0; which < 2; which++)
        for (int g = 0; g < inter_groups; g++)
          for (int j = 0; j < jobs; j++)
            b.tile(Task::GateUp, l, gu + j * inter_groups + g, z, w, 0, {router}, j % (s.top_k + s.shared_experts) < s.top_k);
    }
    const int dn = b.counters(Task::Down, l, s.rows * hidden_groups);  // per (row, group): all of the row's jobs
    for (int z = 0; z < s_d; z++) {
      const int c0 = z * ichunks / s_d, c1 = (z + 1) * ichunks / s_d;
      for (int g = 0; g < hidden_groups; g++)
        for (int j = 0; j < jobs; j++) {
          const int row = j / (s.top_k + s.shared_experts);
          std::vector<int> deps = {router};  // first: which expert (the gate/up counters imply it; kept for `routed`)
          for (int c = c0; c < c1; c++) deps.push_back(gu + j * inter_groups + c);
          b.tile(Task::Down, l, dn + row * hidden_groups + g, z, int64_t(kCols) * std::min(s.moe_inter - c0 * kChunk, (c1 - c0) * kChunk),
                 0, std::move(deps), j % (s.top_k + s.shared_experts) < s.top_k);
        }
    }
    residual = Builder::range(dn, s.rows * hidden_groups);
  }
  const int head = b.gemv(Task::Head, s.layers, s.vocab, s.hidden, 1, [&](int, int) { return residual; });
  const int sample = b.counters(Task::Sample, s.layers, 1);
  b.tile(Task::Sample, s.layers, sample, 0, 0, int64_t(s.rows) * s.vocab * 4, Builder::range(head, div_up(s.vocab, kCols)));
  return p;
}

TileTime tile_time(const StepPlan& p, const CostModel& m, int i) {
  const Tile& t = p.tiles[size_t(i)];
  const double decode = double(t.weights) * m.ps_per_weight * 1e-6 + double(t.weight_bytes) / m.bytes_per_ns * 1e-3;
  const double rest = m.tile_us + (t.deps.empty() ? 0.0 : m.dependent_us) + double(t.bytes) / m.bytes_per_ns * 1e-3;
  return m.decode_ahead ? TileTime{decode, rest} : TileTime{0.0, decode + rest};
}

namespace {
// One tile on its SM: the ahead part from `sm_free` (a routed tile's not before `known`), the rest from the later
// of that and `ready`. Returns the end.
double place(const Tile& t, const TileTime& tt, double sm_free, double known, double ready) {
  const double ahead_end = std::max(sm_free, t.routed ? known : 0.0) + tt.ahead;
  return std::max(ahead_end, ready) + tt.after;
}
}  // namespace

StepPlan build_step_plan(const StepShape& s, const CostModel& m) {
  StepPlan p = build_tiles(s, m);
  const size_t n = p.tiles.size();
  p.per_sm.assign(size_t(m.sms), {});
  std::vector<double> done(size_t(p.counters()), 0.0), cp_done(size_t(p.counters()), 0.0), cp_end(n, 0.0);
  // The critical path backwards: the tile that completed each counter last, the tile each tile's end waited for.
  std::vector<int> cp_done_by(size_t(p.counters()), -1), cp_pred(n, -1);
  // SMs by the time they become free (earliest first; ties: the lower SM)
  using Slot = std::pair<double, int>;
  std::priority_queue<Slot, std::vector<Slot>, std::greater<>> free_at;
  for (int sm = 0; sm < m.sms; sm++) free_at.push({0.0, sm});
  // kernel_boundaries: the end of the task instance before this tile's (all its tiles), and of the current one
  double prev_kernel_end = 0.0, kernel_end = 0.0, cp_prev_kernel_end = 0.0, cp_kernel_end = 0.0;
  int cp_prev_kernel_by = -1, cp_kernel_by = -1;
  for (size_t i = 0; i < n; i++) {
    const Tile& t = p.tiles[i];
    if (i > 0 && (t.task != p.tiles[i - 1].task || t.layer != p.tiles[i - 1].layer)) {
      prev_kernel_end = kernel_end, cp_prev_kernel_end = cp_kernel_end, cp_prev_kernel_by = cp_kernel_by;
    }
    double ready = 0.0, cp_ready = 0.0;
    int ready_by = -1;
    for (int d : t.deps) {
      ready = std::max(ready, done[size_t(d)]);
      if (cp_done[size_t(d)] > cp_ready || ready_by < 0) cp_ready = std::max(cp_ready, cp_done[size_t(d)]), ready_by = cp_done_by[size_t(d)];
    }
    if (m.kernel_boundaries && i > 0) {
      ready = std::max(ready, prev_kernel_end + m.boundary_us);
      if (cp_prev_kernel_end + m.boundary_us > cp_ready) cp_ready = cp_prev_kernel_end + m.boundary_us, ready_by = cp_prev_kernel_by;
    }
    const TileTime tt = tile_time(p, m, int(i));
    const double known = t.routed ? done[size_t(t.deps[0])] : 0.0, cp_known = t.routed ? cp_done[size_t(t.deps[0])] : 0.0;
    // The earliest-free SM ends it first (the end grows with the SM's free time).
    const auto [free, sm] = free_at.top();
    free_at.pop();
    const double end = place(t, tt, free, known, ready);
    free_at.push({end, sm});
    p.per_sm[size_t(sm)].push_back(int(i));
    done[size_t(t.counter)] = std::max(done[size_t(t.counter)], end);
    cp_end[i] = place(t, tt, 0.0, cp_known, cp_ready);
    // what its end waited for: its counters (or the kernel before), or its own decode ahead (after the router's)
    const bool ahead_bound = (t.routed ? cp_known : 0.0) + tt.ahead > cp_ready;
    cp_pred[i] = ahead_bound ? (t.routed ? cp_done_by[size_t(t.deps[0])] : -1) : ready_by;
    if (cp_end[i] > cp_done[size_t(t.counter)] || cp_done_by[size_t(t.counter)] < 0)
      cp_done[size_t(t.counter)] = cp_end[i], cp_done_by[size_t(t.counter)] = int(i);
    p.step_us = std::max(p.step_us, end);
    p.critical_path_us = std::max(p.critical_path_us, cp_end[i]);
    kernel_end = std::max(kernel_end, end);
    if (cp_end[i] > cp_kernel_end || cp_kernel_by < 0) cp_kernel_end = cp_end[i], cp_kernel_by = int(i);
  }
  // Walk the critical path back from its last tile; each tile is charged the time from its predecessor's end.
  p.critical_path_by_task.assign(size_t(Task::Sample) + 1, 0.0);
  int at = int(std::max_element(cp_end.begin(), cp_end.end()) - cp_end.begin());
  while (at >= 0) {
    const int pred = cp_pred[size_t(at)];
    p.critical_path_by_task[size_t(p.tiles[size_t(at)].task)] += cp_end[size_t(at)] - (pred >= 0 ? cp_end[size_t(pred)] : 0.0);
    at = pred;
  }
  return p;
}

std::string check_buffer_reuse(const StepPlan& p) {
  const size_t n = p.tiles.size();
  std::vector<std::vector<int>> producers(size_t(p.counters())), readers(size_t(p.counters()));
  for (size_t i = 0; i < n; i++) {
    producers[size_t(p.tiles[i].counter)].push_back(int(i));
    for (int d : p.tiles[i].deps) readers[size_t(d)].push_back(int(i));
  }
  // (task, layer) -> its tiles; and the readers of its outputs
  std::map<std::pair<Task, int>, std::vector<int>> writers, reads;
  for (size_t i = 0; i < n; i++) writers[{p.tiles[i].task, p.tiles[i].layer}].push_back(int(i));
  for (int c = 0; c < p.counters(); c++) {
    auto& r = reads[{p.counter_info[size_t(c)].task, p.counter_info[size_t(c)].layer}];
    r.insert(r.end(), readers[size_t(c)].begin(), readers[size_t(c)].end());
  }
  // The tiles a writer is ordered after: backwards through the counters it waits for, down to tile `floor`. Writers
  // of one task share their dependency lists, so the search is done once per distinct list.
  std::map<std::vector<int>, std::vector<char>> memo;
  auto ancestors = [&](const std::vector<int>& deps, int floor) -> const std::vector<char>& {
    auto it = memo.find(deps);
    if (it != memo.end()) return it->second;
    std::vector<char> seen(n, 0), counter_seen(size_t(p.counters()), 0);
    std::vector<int> stack(deps.begin(), deps.end());
    while (!stack.empty()) {
      const int c = stack.back();
      stack.pop_back();
      if (counter_seen[size_t(c)]) continue;
      counter_seen[size_t(c)] = 1;
      for (int t : producers[size_t(c)]) {
        if (seen[size_t(t)] || t < floor) continue;
        seen[size_t(t)] = 1;
        stack.insert(stack.end(), p.tiles[size_t(t)].deps.begin(), p.tiles[size_t(t)].deps.end());
      }
    }
    return memo.emplace(deps, std::move(seen)).first->second;
  };
  for (const auto& [key, ws] : writers) {
    const auto prev = reads.find({key.first, key.second - 1});
    if (prev == reads.end() || prev->second.empty()) continue;
    const int floor = *std::min_element(prev->second.begin(), prev->second.end());
    memo.clear();
    for (int w : ws) {
      const std::vector<char>& before = ancestors(p.tiles[size_t(w)].deps, floor);
      for (int r : prev->second)
        if (!before[size_t(r)])
          return str_cat("tile ", w, " (", task_name(key.first), " layer ", key.second, ") may overwrite ", task_name(key.first),
                         "'s output of layer ", key.second - 1, " before tile ", r, " (", task_name(p.tiles[size_t(r)].task),
                         " layer ", p.tiles[size_t(r)].layer, ") has read it");
    }
  }
  return "";
}

double schedule_floor(const StepPlan& p, const CostModel& m) {
  CostModel z = m;
  z.ps_per_weight = 0, z.bytes_per_ns = 1e300;
  std::vector<TileTime> t(p.tiles.size());
  for (size_t i = 0; i < t.size(); i++) t[i] = tile_time(p, z, int(i));
  return simulate(p, t);
}

StepLists flatten(const StepPlan& p) {
  StepLists f;
  f.sm_begin.push_back(0);
  for (const auto& list : p.per_sm) {
    f.sm_tiles.insert(f.sm_tiles.end(), list.begin(), list.end());
    f.sm_begin.push_back(int32_t(f.sm_tiles.size()));
  }
  f.dep_begin.push_back(0);
  for (const Tile& t : p.tiles) {
    f.deps.insert(f.deps.end(), t.deps.begin(), t.deps.end());
    f.dep_begin.push_back(int32_t(f.deps.size()));
    f.tile_counter.push_back(t.counter);
    f.tile_desc.insert(f.tile_desc.end(), {int32_t(t.task), t.layer, t.group, t.split});
  }
  for (const CounterInfo& c : p.counter_info) f.arrivals.push_back(c.arrivals);
  return f;
}

double simulate(const StepPlan& p, const std::vector<TileTime>& tt, std::string* why) {
  TRELLM_ASSERT(tt.size() == p.tiles.size(), "simulate: one time per tile");
  const size_t sms = p.per_sm.size();
  std::vector<int> arrived(size_t(p.counters()), 0);
  std::vector<double> complete_at(size_t(p.counters()), 0.0), sm_time(sms, 0.0);
  std::vector<size_t> next(sms, 0);
  size_t finished = 0;
  double makespan = 0.0;
  for (bool moved = true; moved;) {
    moved = false;
    for (size_t sm = 0; sm < sms; sm++) {
      const std::vector<int>& list = p.per_sm[sm];
      while (next[sm] < list.size()) {
        const Tile& t = p.tiles[size_t(list[next[sm]])];
        double ready_at = 0.0;
        bool ready = true;
        for (int d : t.deps) {
          if (arrived[size_t(d)] < p.counter_info[size_t(d)].arrivals) ready = false;
          ready_at = std::max(ready_at, complete_at[size_t(d)]);
        }
        if (!ready) break;
        sm_time[sm] = place(t, tt[size_t(list[next[sm]])], sm_time[sm], t.routed ? complete_at[size_t(t.deps[0])] : 0.0, ready_at);
        const size_t c = size_t(t.counter);
        complete_at[c] = std::max(complete_at[c], sm_time[sm]);
        arrived[c]++;
        makespan = std::max(makespan, sm_time[sm]);
        next[sm]++, finished++, moved = true;
      }
    }
  }
  if (finished == p.tiles.size()) return makespan;
  if (why) {
    // The smallest unfinished tile u has finished producers (they are smaller), so it is not at the head of its
    // SM's list: the tile there waits for work that cannot run, u among it. Name both.
    size_t sm_u = sms;
    int u = -1;
    for (size_t sm = 0; sm < sms; sm++)
      for (size_t k = next[sm]; k < p.per_sm[sm].size(); k++)
        if (u < 0 || p.per_sm[sm][k] < u) u = p.per_sm[sm][k], sm_u = sm;
    const int h = p.per_sm[sm_u][next[sm_u]];
    const Tile& t = p.tiles[size_t(h)];
    const Tile& tu = p.tiles[size_t(u)];
    for (int d : t.deps)
      if (arrived[size_t(d)] < p.counter_info[size_t(d)].arrivals) {
        const CounterInfo& c = p.counter_info[size_t(d)];
        *why = str_cat("SM ", sm_u, " waits at tile ", h, " (", task_name(t.task), " layer ", t.layer, " group ", t.group,
                       ") for ", task_name(c.task), " layer ", c.layer, " group ", c.group, " (", arrived[size_t(d)], " of ",
                       c.arrivals, " arrived), ahead of tile ", u, " (", task_name(tu.task), " layer ", tu.layer,
                       ") in its list: the list is out of order");
        break;
      }
  }
  return -1.0;
}

}  // namespace trellm::step
