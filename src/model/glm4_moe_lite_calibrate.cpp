// Calibration Hessians for `trellm quantize`: the unquantized model runs the calibration tokens on a backend (the
// CPU, or the GPU) whose Linear observer feeds each Linear's input rows into a HessianAccumulator, on the GPU one
// in device memory (see glm4_moe_lite_quantize.h for what is captured and why).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>

#include "backend/backend.h"
#include "core/error.h"
#include "core/timer.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite_calibrate.h"
#include "model/glm4_moe_lite_quantize.h"
#include "quant/hessian.h"
#include "quant/hessian_cuda.h"
#ifdef TRELLM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "quant/trellis_viterbi_cuda.h"
#endif

namespace trellm {

namespace fs = std::filesystem;

namespace {

// 64-bit FNV-1a over config.json and every tensor (name, dtype, shape, bytes) of the model, 8 bytes a step (one
// multiply each): the Hessians depend on all of them. Computed only when a cache is used; a pass over the weights
// is small next to the capture, which runs the whole model over every calibration token.
std::string model_fingerprint(const std::string& model_dir) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t v;
      std::memcpy(&v, p + i, 8);
      h = (h ^ v) * 1099511628211ull;
    }
    for (; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
  };
  const std::string cfg = (fs::path(model_dir) / "config.json").string();
  {
    std::FILE* f = std::fopen(cfg.c_str(), "rb");
    if (!f) fail(cfg, ": cannot open");
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) mix(buf, n);
    std::fclose(f);
  }
  const TensorStore store = TensorStore::open(model_dir);
  for (const std::string& name : store.names()) {
    const TensorInfo& t = store.get(name);
    const std::string head = str_cat(name, " ", dtype_name(t.dtype), " ", t.shape.size());
    mix(head.data(), head.size());
    mix(t.shape.data(), t.shape.size() * sizeof(int64_t));
    mix(t.data, t.nbytes);
  }
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", (unsigned long long)h);
  return out;
}

}  // namespace

void check_calibration_rows(const std::vector<std::vector<int32_t>>& rows, const Config& c) {
  for (size_t r = 0; r < rows.size(); r++) {
    if (rows[r].empty()) fail("calibration row ", r, " is empty");
    if (int64_t(rows[r].size()) > c.max_position_embeddings)
      fail("calibration row ", r, " has ", rows[r].size(), " tokens, more than the model's max_position_embeddings (",
           c.max_position_embeddings, "); use a shorter --seq-len");
    for (int32_t t : rows[r])
      if (t < 0 || t >= c.vocab_size)
        fail("calibration token id ", t, " (row ", r, ") is outside the vocabulary (", c.vocab_size, ")");
  }
}

// The accumulators of one window of consecutive layers [first, last].
struct HessianCapture::Window {
  int64_t first = -1, last = -1;
  std::map<std::string, std::unique_ptr<trellis::HessianSum>> acc;  // per input group
};

namespace calibration {

int64_t chunk_for(const HessianCapture::Options& o) {
  if (o.chunk != 0) return o.chunk;
  return o.device == trellis::EncodeDevice::Cuda ? 2048 : 128;
}

Device open_device(trellis::EncodeDevice d) {
  Device dev;
  if (d != trellis::EncodeDevice::Cuda) {
    dev.backend = make_cpu_backend();
    return dev;
  }
#ifdef TRELLM_HAVE_CUDA
  dev.backend = make_cuda_backend(trellis::viterbi_cuda_current_device());
  dev.cuda = std::make_unique<trellis::HessianCudaContext>(static_cast<CudaBackend&>(*dev.backend).stream());
#else
  fail("calibration on the GPU: this trellm was built without CUDA");
#endif
  return dev;
}

Recorder add_groups(std::span<const std::pair<LinearSpec, const Linear*>> linears, Sums& sums,
                    trellis::HessianCudaContext* cuda) {
  Recorder r;
  for (const auto& [s, lin] : linears) {
    auto [it, fresh] = sums.try_emplace(s.input_group);
    if (!fresh) continue;
#ifdef TRELLM_HAVE_CUDA
    if (cuda) it->second = std::make_unique<trellis::HessianAccumulatorCuda>(*cuda, s.in);
#endif
    if (!cuda) it->second = std::make_unique<trellis::HessianAccumulator>(s.in);
    r[lin] = it->second.get();
  }
  return r;
}

Observing::Observing(Backend& b, const Recorder& r) : b_(b) {
  b.set_linear_observer([&r](const Linear& lin, TensorView x) {
    auto it = r.find(&lin);
    if (it != r.end()) it->second->add(x.ptr<float>(), x.rows());
  });
}
Observing::~Observing() { b_.set_linear_observer(nullptr); }

MtpStep::MtpStep(int max_rows, int blocks) : pos_(size_t(max_rows)), seq_(size_t(max_rows), 0), table_(size_t(blocks)) {
  for (size_t b = 0; b < table_.size(); b++) table_[b] = int32_t(b);
}

void MtpStep::run(Model& m, RunState& rs, KvCache& mtp_kv, const int32_t* next, int count, int p0) {
  for (int i = 0; i < count; i++) pos_[size_t(i)] = p0 + i;
  StepBatch b;
  b.tokens = {next, size_t(count)};
  b.pos = {pos_.data(), size_t(count)};
  b.seq = {seq_.data(), size_t(count)};
  b.tables = table_;
  b.table_stride = int(table_.size());
  b.logits = Logits::All;
  m.forward_mtp(rs, mtp_kv, b, TensorView(rs.x.data, DType::F32, {int64_t(count), m.config().hidden_size}));
}

}  // namespace calibration

HessianCapture::HessianCapture(const std::string& model_dir, std::vector<std::vector<int32_t>> rows, Options opt)
    : rows_(std::move(rows)), opt_(std::move(opt)) {
  opt_.chunk = calibration::chunk_for(opt_);
  calibration::Device dev = calibration::open_device(opt_.device);
  backend_ = std::move(dev.backend);
  cuda_ = std::move(dev.cuda);
  model_ = Model::load(model_dir, *backend_);
  check_calibration_rows(rows_, model_->config());
  if (opt_.chunk < 1) fail("calibration: chunk must be positive");
  linears_ = model_linears(*model_);
  if (opt_.mtp) {
    const size_t n = model_->weights().mtp.size();
    if (n == 0)
      fail(model_dir, ": calibration of the MTP layer asked for, but the model has none (num_nextn_predict_layers ",
           model_->config().num_nextn_predict_layers, ", no model.layers.", model_->config().num_hidden_layers, ".* tensors)");
    if (n > 1) fail(model_dir, ": ", n, " MTP layers; calibrating more than one is not supported");
    for (auto& l : model_mtp_linears(*model_)) linears_.push_back(std::move(l));
  }
  for (size_t i = 0; i < linears_.size(); i++) by_key_[linears_[i].first.key] = i;
  if (!opt_.cache_dir.empty()) {
    fs::create_directories(opt_.cache_dir);
    // The GPU's forward rounds activations to bf16 for its products, so its Hessians are its own (not the CPU's).
    cache_key_ = str_cat("trellm hessians v1; model ", model_fingerprint(model_dir), "; calibration ",
                         calibration_fingerprint(rows_), "; chunk ", opt_.chunk,
                         opt_.device == trellis::EncodeDevice::Cuda ? "; captured on the GPU" : "");
  }
}

HessianCapture::~HessianCapture() {
  backend_->set_linear_observer(nullptr);
  window_.reset();  // before the GPU context its accumulators use
  cuda_.reset();
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
  const Config& c = model_->config();
  int64_t longest = 0;
  for (const auto& r : rows_) longest = std::max<int64_t>(longest, int64_t(r.size()));
  // One run state and one cache for every row (the model keeps its allocations until it is destroyed); made before
  // the window is sized, since on the GPU both take device memory.
  if (!rs_ready_) {
    rs_ = model_->make_run_state(int(std::min<int64_t>(opt_.chunk, longest)));
    kv_ = model_->make_kv_cache(int(longest));
    rs_ready_ = true;
  }
  const bool gpu = cuda_ != nullptr;
  uint64_t budget = opt_.memory_budget;
  if (budget == 0) {
    budget = 8ull << 30;
    if (gpu) {  // the device memory left, less 12 GiB: the forward's scratch (it grows in the first pass, ~1 GiB for
                // GLM-4.7-Flash at 2048 tokens a step) and the encoder working beside it (5.2 GB at full size)
      const auto [used, total] = backend_->memory_used_total();
      budget = total > used + (12ull << 30) ? (total - used - (12ull << 30)) / 10 * 9 : 0;
    }
  }
  auto w = std::make_unique<Window>();
  w->first = first_layer;
  uint64_t bytes = 0;
  std::map<int64_t, uint64_t> layer_bytes;
  std::map<std::string, int64_t> group_in;
  for (const auto& [s, lin] : linears_)
    if (s.layer >= first_layer && group_in.emplace(s.input_group, s.in).second)
      layer_bytes[s.layer] += gpu ? trellis::HessianAccumulatorCuda::device_bytes(s.in)
                                  : uint64_t(s.in) * uint64_t(s.in) * sizeof(double);
  for (const auto& [layer, b] : layer_bytes) {
    if (w->last >= 0 && bytes + b > budget) break;
    bytes += b;
    w->last = layer;
  }
  TRELLM_ASSERT(w->last >= first_layer, "no Linear at or after layer ", first_layer);
  std::vector<std::pair<LinearSpec, const Linear*>> in_window;
  for (const auto& l : linears_)
    if (l.first.layer >= w->first && l.first.layer <= w->last) in_window.push_back(l);
  const calibration::Recorder recorder = calibration::add_groups(in_window, w->acc, cuda_.get());
  if (opt_.on_note)
    opt_.on_note(str_cat("calibration pass ", passes_ + 1, ": capturing ", w->acc.size(), " Hessians of layers ",
                         w->first, "..", w->last, " (", (bytes + (1 << 20) - 1) >> 20, " MiB", gpu ? " on the GPU" : "",
                         ")"));

  // lm_head sees every row only when all rows' logits are computed. The MTP layer (number num_hidden_layers, as
  // lm_head) runs after each main step on its rows p with t[p+1] in the row: token t[p+1], hidden h_p = rs_.x.
  const bool head = w->last >= c.num_hidden_layers;
  const bool mtp = opt_.mtp && head;
  if (mtp) {
    model_->add_mtp_state(rs_);
    if (mtp_kv_.layers.empty()) mtp_kv_ = model_->make_mtp_kv_cache_blocks(kv_.blocks);
  }
  calibration::MtpStep mtp_step(rs_.max_tokens, kv_.blocks);
  const int64_t total = tokens();
  int64_t done = 0;
  Timer pass_time;
  {
    const calibration::Observing observing(*backend_, recorder);
    for (const auto& row : rows_)
      for (int64_t off = 0; off < int64_t(row.size()); off += rs_.max_tokens) {
        const int n = int(std::min<int64_t>(rs_.max_tokens, int64_t(row.size()) - off));
        model_->forward(rs_, kv_, row.data() + off, n, int(off), head);
        done += n;
        if (opt_.on_capture_progress) opt_.on_capture_progress(passes_ + 1, done, total);
        const int m = int(std::min<int64_t>(n, int64_t(row.size()) - 1 - off));
        if (mtp && m > 0) mtp_step.run(*model_, rs_, mtp_kv_, row.data() + off + 1, m, int(off));
      }
  }
  for (const auto& [group, acc] : w->acc) acc->rows();  // the last pending rows summed (on the GPU: waits for them)
  window_ = std::move(w);
  passes_++;
  if (opt_.on_note)
    opt_.on_note(str_cat("calibration pass ", passes_, ": ", total, " tokens in ", int64_t(pass_time.seconds() * 10) / 10.0,
                         " s (", int64_t(double(total) / std::max(pass_time.seconds(), 1e-9)), " tokens/s)"));
  if (!cache_key_.empty()) save_window();
}

// Cache files: <cache_dir>/<input group>.safetensors holding "hessian" (in, in) F32, XᵀX / rows as hessian()
// returns it, with metadata {"trellm_hessians": cache_key_, "rows": rows}. Written through a temporary name, so a
// file under its final name is complete; any mismatch or unreadable file is a miss (the window is captured again).
void HessianCapture::save_window() const {
  for (const auto& [group, sum] : window_->acc) {
    const trellis::HessianSum& acc = *sum;
    const std::vector<float> h = acc.hessian();
    const fs::path file = fs::path(opt_.cache_dir) / (group + ".safetensors");
    const fs::path tmp = fs::path(opt_.cache_dir) / (group + ".safetensors.tmp");
    write_safetensors(tmp.string(), {{"hessian", DType::F32, {acc.in(), acc.in()}, h.data(), h.size() * sizeof(float)}},
                      {{"trellm_hessians", cache_key_}, {"rows", std::to_string(acc.rows())}});
    fs::rename(tmp, file);
  }
}

bool HessianCapture::load_cached(const LinearSpec& s, std::vector<float>& h, int64_t& rows) {
  if (cache_key_.empty()) return false;
  const fs::path file = fs::path(opt_.cache_dir) / (s.input_group + ".safetensors");
  if (!fs::exists(file)) return false;
  try {
    const auto f = SafetensorsFile::open(file.string());
    const auto& meta = f->metadata();
    const auto key = meta.find("trellm_hessians"), r = meta.find("rows");
    const TensorInfo* t = f->find("hessian");
    if (key == meta.end() || key->second != cache_key_ || r == meta.end() || !t || t->dtype != DType::F32 ||
        t->shape != std::vector<int64_t>{s.in, s.in})
      return false;
    rows = std::stoll(r->second);
    h.assign(static_cast<const float*>(t->data), static_cast<const float*>(t->data) + s.in * s.in);
  } catch (const std::exception&) {
    return false;
  }
  if (cache_hits_++ == 0 && opt_.on_note)
    opt_.on_note(str_cat("calibration: Hessians from the cache ", opt_.cache_dir, " (same model, rows and chunk)"));
  return true;
}

const LinearSpec& HessianCapture::spec(const std::string& key) const {
  auto it = by_key_.find(key);
  if (it == by_key_.end()) fail("calibration: \"", key, "\" is not a Linear of this model");
  return linears_[it->second].first;
}

bool HessianCapture::in_window(const LinearSpec& s) const {
  return window_ && s.layer >= window_->first && s.layer <= window_->last;
}

std::vector<float> HessianCapture::hessian(const std::string& key) {
  const LinearSpec& s = spec(key);
  std::vector<float> h;
  int64_t rows = 0;
  if (!in_window(s) && load_cached(s, h, rows)) {
    if (double(rows) < opt_.min_rows_factor * double(s.in)) return {};
    return h;
  }
  if (!in_window(s)) capture(s.layer);
  const trellis::HessianSum& acc = *window_->acc.at(s.input_group);
  if (double(acc.rows()) < opt_.min_rows_factor * double(s.in)) return {};
  return acc.hessian();
}

int64_t HessianCapture::rows_seen(const std::string& key) {
  const LinearSpec& s = spec(key);
  std::vector<float> h;
  int64_t rows = 0;
  if (!in_window(s) && load_cached(s, h, rows)) return rows;
  if (!in_window(s)) capture(s.layer);
  return window_->acc.at(s.input_group)->rows();
}

}  // namespace trellm
