// LayerCapture (glm4_moe_lite_quantize.h): calibration one decoder layer at a time over a resident residual stream,
// each layer's inputs from the quantized layers before it (exllamav3's order; docs/quantize_gpu.md).
//
// Per calibration row (one sequence) and chunk of rows, layer l runs through Model::forward_layer with rs.h pointed
// at the chunk's rows of the stream. The observed pass (Hessians, unquantized weights) runs on a copy when the
// inputs are the quantized layers', so that the stream moves on only with the quantized layer's output.
#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>

#include "backend/backend.h"
#include "core/error.h"
#include "core/timer.h"
#include "core/trace.h"
#include "format/safetensors.h"
#include "model/glm4_moe_lite_calibrate.h"
#include "model/glm4_moe_lite_quantize.h"

namespace trellm {

namespace fs = std::filesystem;

struct LayerCapture::Impl {
  HessianCapture::Options opt;
  bool quantized = true;
  std::vector<std::vector<int32_t>> rows;
  std::set<std::string> planned;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<trellis::HessianCudaContext> cuda;
  std::unique_ptr<Model> model;
  TensorStore source;
  std::vector<LinearSpec> specs;         // every Linear of the decoder and lm_head (linear_specs)
  std::map<std::string, size_t> by_key;  // key -> specs index
  RunState rs;
  KvCache kv;
  KvCache mtp_kv;  // the MTP layer's latent cache (opt.mtp)
  std::vector<std::pair<LinearSpec, const Linear*>> mtp_linears;  // the MTP layer's, as loaded (opt.mtp)
  TensorView stream;  // [tokens, hidden] f32: the residual stream entering layer `at`
  TensorView iota;    // I32 [max_tokens] 0, 1, 2, ...: gather_rows as a row copy
  int64_t at = 0;     // layers the stream has been through
  int64_t observed = -1;  // the layer whose Hessians `acc` holds (num_hidden_layers: lm_head's)
  calibration::Sums acc;  // per input group of `observed`
  std::string work_dir;   // the quantizer's finished Linears (on_batch)
  int64_t tokens = 0;
  double t_load = 0, t_observe = 0, t_propagate = 0, t_hessians = 0;  // seconds (time_by_phase)
  int passes = 0;  // layers observed (and lm_head)

  const LinearSpec& spec(const std::string& key) const {
    auto it = by_key.find(key);
    if (it == by_key.end()) fail("calibration: \"", key, "\" is not a Linear of this model");
    return specs[it->second];
  }
  // The accumulator of s's input group, after observing s's layer if it is not the one held.
  const trellis::HessianSum& sum_of(const LinearSpec& s) {
    if (observed != s.layer) observe(s.layer, ++passes);
    return *acc.at(s.input_group);
  }

  Config config() const { return model->config(); }

  // Every chunk of every row through `fn(row offset in the stream, rows n, position, calibration row)`.
  template <typename Fn>
  void chunks(Fn&& fn) {
    int64_t off = 0;
    for (const auto& r : rows) {
      for (int64_t p = 0; p < int64_t(r.size()); p += rs.max_tokens)
        fn(off + p, int(std::min<int64_t>(rs.max_tokens, int64_t(r.size()) - p)), int(p), r);
      off += int64_t(r.size());
    }
  }
  TensorView stream_rows(int64_t off, int n) const {
    return TensorView(static_cast<float*>(stream.data) + off * stream.cols(), DType::F32, {int64_t(n), stream.cols()});
  }

  // Layer l over every token: in place (the stream moves on) or on a copy of each chunk.
  void pass(int64_t l, bool in_place, int pass_no) {
    const TensorView own_h = rs.h;
    int64_t done = 0;
    try {
      chunks([&](int64_t off, int n, int pos, const std::vector<int32_t>&) {
        const TensorView sr = stream_rows(off, n);
        if (in_place) rs.h = TensorView(sr.data, DType::F32, {rs.max_tokens, sr.cols()});
        else backend->gather_rows(TensorView(own_h.data, DType::F32, {int64_t(n), sr.cols()}), sr,
                                  TensorView(iota.data, DType::I32, {int64_t(n)}));
        model->forward_layer(l, rs, kv, n, pos);
        rs.h = own_h;
        done += n;
        if (opt.on_capture_progress && pass_no > 0) opt.on_capture_progress(pass_no, done, tokens);
      });
    } catch (...) {
      rs.h = own_h;
      throw;
    }
  }

  // lm_head's rows, and the MTP layer run as drafting's first step runs it: row p fed t[p+1] and h_p (HessianCapture's
  // order: per calibration row, chunk by chunk; the last position of a row has no t[p+1]).
  void observe_head(int pass_no) {
    const Config c = config();
    const int64_t hid = c.hidden_size;
    trellis::HessianSum* head = nullptr;  // none when lm_head is the tied embedding (not a Linear of the plan)
    if (by_key.count("lm_head")) {
      const std::pair<LinearSpec, const Linear*> group[] = {{spec("lm_head"), &model->weights().lm_head}};
      head = calibration::add_groups(group, acc, cuda.get()).begin()->second;
    }
    const calibration::Recorder recorder = calibration::add_groups(mtp_linears, acc, cuda.get());
    calibration::MtpStep mtp_step(rs.max_tokens, kv.blocks);
    int64_t done = 0;
    {
      const calibration::Observing observing(*backend, recorder);
      chunks([&](int64_t off, int n, int p0, const std::vector<int32_t>& row) {
        const TensorView x(rs.x.data, DType::F32, {int64_t(n), hid});
        backend->rms_norm(x, stream_rows(off, n), model->weights().norm, float(c.rms_norm_eps));
        if (head) head->add(x.ptr<float>(), n);
        const int m = int(std::min<int64_t>(n, int64_t(row.size()) - 1 - p0));
        if (!mtp_linears.empty() && m > 0) mtp_step.run(*model, rs, mtp_kv, row.data() + p0 + 1, m, p0);
        done += n;
        if (opt.on_capture_progress) opt.on_capture_progress(pass_no, done, tokens);
      });
    }
    for (const auto& [group, a] : acc) a->rows();  // the last rows summed
  }

  // The stream through layers at..layer-1: their quantized Linears from work_dir over the checkpoint (or, for
  // original inputs, the checkpoint itself).
  void advance(int64_t layer) {
    if (layer < at) fail("calibration: layer ", layer, " asked for after layer ", at, " (forward order)");
    while (at < layer) {
      const int64_t l = at;
      std::vector<std::string> files, hidden;
      if (quantized)
        for (const LinearSpec& s : specs)
          if (s.layer == l && planned.count(s.key)) {
            if (work_dir.empty()) fail("calibration from the quantized layers: the quantized layer ", l, " is not there yet");
            files.push_back((fs::path(work_dir) / (s.key + ".safetensors")).string());
            hidden.push_back(s.key + ".weight");
            hidden.push_back(s.key + ".bias");
          }
      // The overlay lives while the layer does: the CPU uses the weights in place from the files' mappings.
      Timer t;
      std::optional<TensorStore> q;
      {
        const trace::Span span(str_cat("load quantized layer ", l));
        if (!files.empty()) q = TensorStore::overlay(source, files, hidden);
        model->load_layer(l, q ? *q : source);
      }
      t_load += t.seconds();
      t.reset();
      {
        const trace::Span span(str_cat("quantized pass through layer ", l));
        pass(l, /*in_place=*/true, 0);
        backend->synchronize();
      }
      t_propagate += t.seconds();
      model->release_layer(l);
      at++;
    }
  }

  // The Hessians of `layer`'s Linears (the stream enters it), or with layer = num_hidden_layers lm_head's (the rows
  // of model.norm(h)) and, with opt.mtp, the MTP layer's: HessianCapture's MTP pass on the final hidden states.
  void observe(int64_t layer, int pass_no) {
    const Config c = config();
    acc.clear();
    observed = -1;
    advance(layer);
    Timer t;
    if (layer == c.num_hidden_layers) {
      observe_head(pass_no);
      t_observe += t.seconds();
      observed = layer;
      return;
    }
    {
      const trace::Span span(str_cat("load layer ", layer));
      model->load_layer(layer, source);
    }
    t_load += t.seconds();
    t.reset();
    const trace::Span span(str_cat("observed pass through layer ", layer));
    const calibration::Recorder recorder = calibration::add_groups(layer_linears(*model, layer), acc, cuda.get());
    {
      const calibration::Observing observing(*backend, recorder);
      pass(layer, /*in_place=*/!quantized, pass_no);  // original inputs: the stream's own pass through the layer
    }
    for (const auto& [group, a] : acc) a->rows();  // the last rows summed
    t_observe += t.seconds();
    model->release_layer(layer);
    if (!quantized) at = layer + 1;
    observed = layer;
  }
};

LayerCapture::LayerCapture(const std::string& model_dir, std::vector<std::vector<int32_t>> rows,
                           std::set<std::string> planned, HessianCapture::Options opt)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (!opt.cache_dir.empty()) fail("calibration layer by layer: a Hessian cache needs the unquantized model's Hessians");
  opt.chunk = calibration::chunk_for(opt);
  if (opt.chunk < 1) fail("calibration: chunk must be positive");
  m.quantized = opt.inputs != HessianCapture::Options::Inputs::Original;
  m.opt = std::move(opt);
  m.rows = std::move(rows);
  m.planned = std::move(planned);
  calibration::Device dev = calibration::open_device(m.opt.device);
  m.backend = std::move(dev.backend);
  m.cuda = std::move(dev.cuda);
  LoadOptions lo;
  lo.layers = false;
  lo.mtp = m.opt.mtp;
  m.model = Model::load(model_dir, *m.backend, lo);
  m.source = TensorStore::open(model_dir);
  const Config& c = m.model->config();
  check_calibration_rows(m.rows, c);
  int64_t longest = 0;
  for (const auto& row : m.rows) {
    longest = std::max<int64_t>(longest, int64_t(row.size()));
    tokens_ += int64_t(row.size());
  }
  m.tokens = tokens_;
  m.specs = linear_specs(c);
  // lm_head's rows are its input's; the logits are never computed, except the MTP head's (every row of a chunk).
  m.rs = m.model->make_run_state(int(std::min<int64_t>(m.opt.chunk, longest)), m.opt.mtp ? -1 : 1);
  m.kv = m.model->make_kv_cache(int(longest));
  if (m.opt.mtp) {
    const size_t n = m.model->weights().mtp.size();
    if (n == 0)
      fail(model_dir, ": calibration of the MTP layer asked for, but the model has none (num_nextn_predict_layers ",
           c.num_nextn_predict_layers, ", no model.layers.", c.num_hidden_layers, ".* tensors)");
    if (n > 1) fail(model_dir, ": ", n, " MTP layers; calibrating more than one is not supported");
    m.mtp_linears = model_mtp_linears(*m.model);
    for (const auto& [s, lin] : m.mtp_linears) m.specs.push_back(s);
    m.model->add_mtp_state(m.rs);
    m.mtp_kv = m.model->make_mtp_kv_cache_blocks(m.kv.blocks);
  }
  for (size_t i = 0; i < m.specs.size(); i++) m.by_key[m.specs[i].key] = i;
  Backend& B = *m.backend;
  // The stream, and the embeddings in it.
  m.stream = TensorView(nullptr, DType::F32, {tokens_, c.hidden_size});
  try {
    m.stream.data = B.alloc(m.stream.nbytes());
  } catch (const Error& e) {
    fail("calibration: the residual stream of ", tokens_, " tokens (", m.stream.nbytes() >> 20, " MiB) does not fit on ",
         B.name(), ": ", e.what(), "; use fewer --calibration-rows or a shorter --seq-len");
  }
  std::vector<int32_t> iota(size_t(m.rs.max_tokens));
  for (size_t i = 0; i < iota.size(); i++) iota[i] = int32_t(i);
  m.iota = TensorView(nullptr, DType::I32, {int64_t(iota.size())});
  m.iota.data = B.alloc(m.iota.nbytes());
  B.from_host(m.iota.data, iota.data(), m.iota.nbytes());
  m.chunks([&](int64_t off, int n, int pos, const std::vector<int32_t>& row) {
    const TensorView tok(m.rs.tokens.data, DType::I32, {int64_t(n)});
    B.from_host(tok.data, row.data() + pos, size_t(n) * sizeof(int32_t));
    B.embed(m.stream_rows(off, n), tok, m.model->weights().embed_tokens);
  });
  if (m.opt.on_note)
    m.opt.on_note(str_cat("calibration: the residual stream of ", tokens_, " tokens kept on ", B.name(), " (",
                          (m.stream.nbytes() + (1 << 20) - 1) >> 20, " MiB), the layers loaded one at a time"));
}

LayerCapture::~LayerCapture() {
  if (!impl_) return;
  Impl& m = *impl_;
  m.backend->set_linear_observer(nullptr);
  m.acc.clear();  // before the GPU context its accumulators use
  m.cuda.reset();
  if (m.stream.data) m.backend->release(m.stream.data);
  if (m.iota.data) m.backend->release(m.iota.data);
  m.model.reset();
}

void LayerCapture::on_batch(const std::string& batch, const std::string& work_dir) { impl_->work_dir = work_dir; }

std::vector<float> LayerCapture::hessian(const std::string& key) {
  Impl& m = *impl_;
  const LinearSpec& s = m.spec(key);
  const trellis::HessianSum& a = m.sum_of(s);
  if (double(a.rows()) < m.opt.min_rows_factor * double(s.in)) return {};
  const Timer t;
  const trace::Span span("Hessian out");
  std::vector<float> h = a.hessian();
  m.t_hessians += t.seconds();
  return h;
}

std::string LayerCapture::time_by_phase() const {
  const Impl& m = *impl_;
  auto s = [](double v) { return str_cat(int64_t(v * 10) / 10.0, " s"); };
  return str_cat("loading layers ", s(m.t_load), ", observed passes ", s(m.t_observe), ", quantized passes ",
                 s(m.t_propagate), ", Hessians out ", s(m.t_hessians), " (", m.passes, " passes)");
}

int64_t LayerCapture::rows_seen(const std::string& key) {
  Impl& m = *impl_;
  return m.sum_of(m.spec(key)).rows();
}

int LayerCapture::passes() const { return impl_->passes; }

}  // namespace trellm
