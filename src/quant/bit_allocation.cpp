#include "quant/bit_allocation.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <tuple>

#include "core/error.h"

namespace trellm::trellis {

namespace {

// "model.layers.12.mlp" -> ("model.layers", 12); no ".<digits>." -> ("", -1): not in a stack.
std::pair<std::string, int64_t> stack_and_layer(const std::string& g) {
  for (size_t i = 0; i < g.size(); i++) {
    if (g[i] != '.') continue;
    size_t j = i + 1;
    while (j < g.size() && std::isdigit(static_cast<unsigned char>(g[j]))) j++;
    if (j > i + 1 && j < g.size() && g[j] == '.') return {g.substr(0, i), std::stoll(g.substr(i + 1, j - i - 1))};
  }
  return {"", -1};
}

}  // namespace

Allocation allocate_bits(const std::vector<AllocTarget>& targets, double bpw, bool hq) {
  if (!(bpw >= 1.0 && bpw <= 8.0)) fail("bit allocation: average bits ", bpw, " is outside 1..8");
  const int base = std::clamp(int(std::floor(bpw)), 1, 8);
  Allocation a;
  double sum_numel = 0, sum_bits = 0;
  struct Group {
    std::vector<size_t> members;
    int priority = 0;
    std::string stack;
    int64_t layer = -1;
    size_t first = 0;
  };
  std::vector<Group> groups;
  std::map<std::string, size_t> group_index;
  for (size_t i = 0; i < targets.size(); i++) {
    const AllocTarget& t = targets[i];
    if (t.numel <= 0) fail("bit allocation: ", t.key, " has numel ", t.numel);
    if (a.K.count(t.key)) fail("bit allocation: duplicate key ", t.key);
    a.K[t.key] = base;
    sum_numel += double(t.numel);
    sum_bits += double(t.numel) * base;
    auto [it, fresh] = group_index.emplace(t.group, groups.size());
    if (fresh) {
      Group g;
      std::tie(g.stack, g.layer) = stack_and_layer(t.group);
      g.first = groups.size();
      g.priority = t.priority;
      groups.push_back(g);
    }
    Group& g = groups[it->second];
    g.members.push_back(i);
    g.priority = std::max(g.priority, t.priority);
  }
  std::map<std::string, int64_t> stack_max;
  for (const Group& g : groups)
    if (g.layer >= 0) stack_max[g.stack] = std::max(stack_max[g.stack], g.layer);
  std::vector<const Group*> order;
  for (const Group& g : groups) order.push_back(&g);
  auto key = [&](const Group* g) {
    const int64_t dist = g->layer < 0 ? 0 : std::min(g->layer, stack_max[g->stack] - g->layer);
    return std::make_tuple(-g->priority, dist, g->layer, g->first);
  };
  std::sort(order.begin(), order.end(), [&](const Group* x, const Group* y) { return key(x) < key(y); });

  // Spend +1 steps in order, sweeping repeatedly, while a whole group still fits under the budget.
  const double max_bits = std::floor(bpw * sum_numel);
  for (bool updated = true; updated && sum_bits < max_bits;) {
    updated = false;
    for (const Group* g : order) {
      double cost = 0;
      for (size_t i : g->members)
        if (a.K[targets[i].key] < 8) cost += double(targets[i].numel);
      if (cost > 0 && sum_bits + cost <= max_bits) {
        for (size_t i : g->members) {
          int& k = a.K[targets[i].key];
          k = std::min(k + 1, 8);
        }
        sum_bits += cost;
        updated = true;
      }
    }
  }
  if (hq)
    for (const AllocTarget& t : targets) {
      int& k = a.K[t.key];
      k = std::max(k, std::min(base + t.hq_extra, 8));
    }
  double bits = 0;
  for (const AllocTarget& t : targets) bits += double(t.numel) * a.K[t.key];
  a.average_bits = sum_numel > 0 ? bits / sum_numel : 0;
  return a;
}

}  // namespace trellm::trellis
