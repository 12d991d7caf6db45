// Calibration Hessians for `trellm quantize`: the unquantized model runs the calibration tokens on a CPU
// backend whose Linear observer feeds each Linear's input rows into a HessianAccumulator (see
// glm4_moe_lite_quantize.h for what is captured and why).
#include <algorithm>
#include <map>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#include "model/glm4_moe_lite_quantize.h"
#include "quant/hessian.h"

namespace trellm {

// The accumulators of one window of consecutive layers [first, last].
struct HessianCapture::Window {
  int64_t first = -1, last = -1;
  std::map<std::string, trellis::HessianAccumulator> acc;  // per input group
};

HessianCapture::HessianCapture(const std::string& model_dir, std::vector<std::vector<int32_t>> rows, Options opt)
    : backend_(std::make_unique<CpuBackend>()), rows_(std::move(rows)), opt_(std::move(opt)) {
  model_ = Model::load(model_dir, *backend_);
  const int64_t vocab = model_->config().vocab_size;
  for (size_t r = 0; r < rows_.size(); r++) {
    if (rows_[r].empty()) fail("calibration row ", r, " is empty");
    if (int64_t(rows_[r].size()) > model_->config().max_position_embeddings)
      fail("calibration row ", r, " has ", rows_[r].size(), " tokens, more than the model's max_position_embeddings (",
           model_->config().max_position_embeddings, "); use a shorter --seq-len");
    for (int32_t t : rows_[r])
      if (t < 0 || t >= vocab) fail("calibration token id ", t, " (row ", r, ") is outside the vocabulary (", vocab, ")");
  }
  if (opt_.chunk < 1) fail("calibration: chunk must be positive");
  linears_ = model_linears(*model_);
  for (size_t i = 0; i < linears_.size(); i++) by_key_[linears_[i].first.key] = i;
}

HessianCapture::~HessianCapture() {
  backend_->set_linear_observer(nullptr);
  window_.reset();
  model_.reset();
}

int64_t HessianCapture::tokens() const {
  int64_t n = 0;
  for (const auto& r : rows_) n += int64_t(r.size());
  return n;
}

void HessianCapture::capture(int64_t first_layer) {
  // The window: layers from first_layer on while their accumulators (in² doubles per input group) fit.
  window_.reset();
  auto w = std::make_unique<Window>();
  w->first = first_layer;
  uint64_t bytes = 0;
  std::map<int64_t, uint64_t> layer_bytes;
  std::map<std::string, int64_t> group_in;
  for (const auto& [s, lin] : linears_)
    if (s.layer >= first_layer && group_in.emplace(s.input_group, s.in).second)
      layer_bytes[s.layer] += uint64_t(s.in) * uint64_t(s.in) * sizeof(double);
  for (const auto& [layer, b] : layer_bytes) {
    if (w->last >= 0 && bytes + b > opt_.memory_budget) break;
    bytes += b;
    w->last = layer;
  }
  TRELLM_ASSERT(w->last >= first_layer, "no Linear at or after layer ", first_layer);
  // The Linear that records each group's rows (the first one applied to them); the others share its Hessian.
  std::map<const Linear*, trellis::HessianAccumulator*> recorder;
  for (const auto& [s, lin] : linears_) {
    if (s.layer < w->first || s.layer > w->last) continue;
    auto [it, fresh] = w->acc.try_emplace(s.input_group, s.in);
    if (fresh) recorder[lin] = &it->second;
  }
  if (opt_.on_note)
    opt_.on_note(str_cat("calibration pass ", passes_ + 1, ": capturing ", w->acc.size(), " Hessians of layers ",
                         w->first, "..", w->last, " (", (bytes + (1 << 20) - 1) >> 20, " MiB)"));

  backend_->set_linear_observer([&recorder](const Linear& lin, TensorView x) {
    auto it = recorder.find(&lin);
    if (it != recorder.end()) it->second->add(x.ptr<float>(), x.rows());
  });
  const Config& c = model_->config();
  int64_t longest = 0;
  for (const auto& r : rows_) longest = std::max<int64_t>(longest, int64_t(r.size()));
  // One run state and one cache for every row (the model keeps its allocations until it is destroyed).
  if (!rs_ready_) {
    rs_ = model_->make_run_state(int(std::min<int64_t>(opt_.chunk, longest)));
    kv_ = model_->make_kv_cache(int(longest));
    rs_ready_ = true;
  }
  // lm_head sees every row only when all rows' logits are computed.
  const bool head = w->last >= c.num_hidden_layers;
  try {
    for (const auto& row : rows_)
      for (int64_t off = 0; off < int64_t(row.size()); off += rs_.max_tokens) {
        const int n = int(std::min<int64_t>(rs_.max_tokens, int64_t(row.size()) - off));
        model_->forward(rs_, kv_, row.data() + off, n, int(off), head);
      }
  } catch (...) {
    backend_->set_linear_observer(nullptr);
    throw;
  }
  backend_->set_linear_observer(nullptr);
  window_ = std::move(w);
  passes_++;
}

std::vector<float> HessianCapture::hessian(const std::string& key) {
  auto it = by_key_.find(key);
  if (it == by_key_.end()) fail("calibration: \"", key, "\" is not a Linear of this model");
  const LinearSpec& s = linears_[it->second].first;
  if (!window_ || s.layer < window_->first || s.layer > window_->last) capture(s.layer);
  const trellis::HessianAccumulator& acc = window_->acc.at(s.input_group);
  if (double(acc.rows()) < opt_.min_rows_factor * double(s.in)) return {};
  return acc.hessian();
}

int64_t HessianCapture::rows_seen(const std::string& key) {
  auto it = by_key_.find(key);
  if (it == by_key_.end()) fail("calibration: \"", key, "\" is not a Linear of this model");
  const LinearSpec& s = linears_[it->second].first;
  if (!window_ || s.layer < window_->first || s.layer > window_->last) capture(s.layer);
  return window_->acc.at(s.input_group).rows();
}

}  // namespace trellm
