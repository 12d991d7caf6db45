// trellm quantize: an unquantized GLM-4.7-Flash checkpoint (HF directory) -> an EXL3 directory, with optional
// calibration (LDLQ with Hessians). The pipeline lives in src/model/glm4_moe_lite_quantize.h; this file reads
// the calibration file and draws the progress bar.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "core/trace.h"
#include "model/glm4_moe_lite_quantize.h"

namespace trellm::cli {

namespace {

namespace fs = std::filesystem;

struct QuantizeArgs {
  std::string model, out, codebook = "mcg", calibration, device = "auto", calibration_device = "same", hessian_cache,
              calibration_inputs = "auto", trace;
  double bits = 0;
  int head_bits = 6, mtp_bits = 16, threads = 0;
  int64_t calibration_rows = 250, seq_len = 2048, stop_after = 0;
  uint64_t seed = 0;
  bool force = false, no_scale_search = false;
  CLI::Option *rows_opt = nullptr, *seq_opt = nullptr;
};

// Token rows from a text file (tokenized with the model's tokenizer.json) or a .ids file (whitespace-separated
// ids): consecutive rows of seq_len tokens, at most `rows` of them; a shorter remainder becomes a last row.
std::vector<std::vector<int32_t>> load_calibration(const std::string& path, const std::string& model_dir,
                                                   int64_t rows, int64_t seq_len) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("--calibration ", path, ": cannot open");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<int32_t> ids;
  if (fs::path(path).extension() == ".ids") {
    std::istringstream in(text);
    std::string tok;
    while (in >> tok) {
      char* end = nullptr;
      const long v = std::strtol(tok.c_str(), &end, 10);
      if (*end || v < 0 || v > INT32_MAX) fail("--calibration ", path, ": \"", tok, "\" is not a token id");
      ids.push_back(int32_t(v));
    }
  } else {
    if (!fs::exists(fs::path(model_dir) / "tokenizer.json"))
      fail("--calibration ", path, ": ", model_dir,
           " has no tokenizer.json to tokenize text with; give token ids in a .ids file instead");
    ids = load_tokenizer(model_dir).encode(text);
  }
  if (ids.empty()) fail("--calibration ", path, ": no tokens");
  std::vector<std::vector<int32_t>> out;
  for (size_t off = 0; off < ids.size() && int64_t(out.size()) < rows; off += size_t(seq_len))
    out.emplace_back(ids.begin() + off, ids.begin() + std::min(ids.size(), off + size_t(seq_len)));
  return out;
}

std::string seconds(double s) {
  char b[32];
  if (s < 60) std::snprintf(b, sizeof b, "%.1fs", s);
  else if (s < 3600) std::snprintf(b, sizeof b, "%dm%02ds", int(s) / 60, int(s) % 60);
  else std::snprintf(b, sizeof b, "%dh%02dm", int(s) / 3600, int(s) % 3600 / 60);
  return b;
}

// Progress on stderr: a bar redrawn in place on a terminal, else a line at every 10 %. Two phases draw it: each
// calibration capture pass (a forward over every calibration token; ETA from this pass's rate), then the
// encoding of the Linears (ETA from this run's own rate, weighted by weights: Linears reused from an interrupted
// run are instant). Layer by layer (--calibration-inputs quantized) the passes after the first come between the
// layers' encodings: they show on the encoding's bar, whose rate (and ETA) then includes them.
class ProgressBar {
 public:
  ProgressBar() : tty_(isatty(2)) {}
  void update(const trellis::QuantizeProgress& p) {
    if (phase_ != 0) start_phase(0);
    encoding_ = true;
    if (p.reused) reused_weights_ += p.weights_done - last_weights_;
    last_weights_ = p.weights_done;
    const double frac = p.weights_total ? double(p.weights_done) / double(p.weights_total) : 1.0;
    const double t = timer_.seconds();
    const double mine = double(p.weights_done - reused_weights_);
    const double left = double(p.weights_total - p.weights_done);
    enc_frac_ = frac;
    enc_text_ = str_cat(p.done, "/", p.total, " Linears, ", seconds(t), " elapsed, ETA ",
                        mine > 0 ? seconds(t / mine * left) : std::string("?"));
    draw(frac, enc_text_ + "  " + (p.key ? *p.key : std::string()), p.done == p.total);
  }
  void capture(int pass, int64_t done, int64_t total) {
    if (encoding_) {  // a layer-by-layer pass between encodings: on the encoding's bar (a terminal only)
      if (tty_) draw(enc_frac_, str_cat(enc_text_, "  calibrating the next layer ", int(100.0 * double(done) / double(total)),
                                        "%"), false);
      return;
    }
    if (phase_ != pass) start_phase(pass);
    const double frac = total ? double(done) / double(total) : 1.0;
    const double t = phase_timer_.seconds();
    draw(frac, str_cat(done, "/", total, " calibration tokens (pass ", pass, "), ", seconds(t), " elapsed, ETA ",
                       done > 0 ? seconds(t / double(done) * double(total - done)) : std::string("?")),
         done == total);
  }
  void end_line() {
    if (tty_ && last_len_) std::fprintf(stderr, "\n");
    last_len_ = 0;
  }
  double seconds_elapsed() const { return timer_.seconds(); }

 private:
  // phase: 0 = encoding, p >= 1 = capture pass p. A new phase starts its own line, deciles and (capture) clock.
  void start_phase(int phase) {
    end_line();
    phase_ = phase;
    last_decile_ = -1;
    phase_timer_ = Timer();
  }
  void draw(double frac, const std::string& text, bool last) {
    const int width = 30, fill = int(frac * width);
    const std::string line = str_cat("[", std::string(size_t(fill), '#'), std::string(size_t(width - fill), '.'), "] ",
                                     int(frac * 100), "% ", text);
    if (tty_) {
      std::fprintf(stderr, "\r%-*s", last_len_, line.c_str());
      last_len_ = int(line.size());
      if (last) end_line();
    } else if (int(frac * 10) > last_decile_ || last) {
      last_decile_ = int(frac * 10);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

  bool tty_;
  bool encoding_ = false;  // the encoding has begun
  double enc_frac_ = 0;
  std::string enc_text_;
  Timer timer_, phase_timer_;
  int phase_ = 0;
  int64_t reused_weights_ = 0, last_weights_ = 0;
  int last_len_ = 0, last_decile_ = -1;
};

int run_quantize(const QuantizeArgs& a) {
  if (a.threads > 0) ThreadPool::set_global_threads(a.threads);
  if (a.calibration.empty() && (a.rows_opt->count() || a.seq_opt->count()))
    fail("--calibration-rows / --seq-len need --calibration FILE");
  if (a.calibration.empty() && !a.hessian_cache.empty()) fail("--hessian-cache needs --calibration FILE");
  if (a.calibration.empty() && a.calibration_inputs != "auto") fail("--calibration-inputs needs --calibration FILE");
  if (a.calibration.empty() && a.calibration_device != "same") fail("--calibration-device needs --calibration FILE");
  if (a.calibration_rows < 1) fail("--calibration-rows must be at least 1");
  if (a.seq_len < 1) fail("--seq-len must be at least 1");
  QuantizeModelOptions o;
  o.out_dir = a.out;
  o.bits = a.bits;
  o.head_bits = a.head_bits;
  o.mtp_bits = a.mtp_bits;
  o.codebook = trellis::parse_codebook(a.codebook, "--codebook");
  o.force = a.force;
  o.seed = a.seed;
  o.scale_search = !a.no_scale_search;
  o.device = trellis::parse_encode_device(a.device, "--device " + a.device);
  o.stop_after = a.stop_after;
  if (!a.calibration.empty()) {
    if (!fs::is_directory(a.model)) fail(a.model, ": not a model directory");
    o.calibration = load_calibration(a.calibration, a.model, a.calibration_rows, a.seq_len);
    o.calibration_cols = a.seq_len;
    o.capture.cache_dir = a.hessian_cache;
    using Inputs = HessianCapture::Options::Inputs;
    o.capture.inputs = a.calibration_inputs == "quantized" ? Inputs::Quantized
                       : a.calibration_inputs == "original" ? Inputs::Original : Inputs::Auto;
    // The capture runs where the encoder does unless told otherwise, on the encoder's GPU (parse_encode_device
    // selects it for both): one GPU per conversion.
    if (a.calibration_device == "same") {
      o.capture.device = o.device;
    } else {
      auto gpu = [](const std::string& d) { return d == "cuda" ? std::string("cuda:0") : d; };
      if (o.device == trellis::EncodeDevice::Cuda && a.calibration_device.rfind("cuda", 0) == 0 &&
          a.device.rfind("cuda", 0) == 0 && gpu(a.calibration_device) != gpu(a.device))
        fail("--calibration-device ", a.calibration_device, " and --device ", a.device,
             ": one conversion uses one GPU (give the same, or --calibration-device same)");
      o.capture.device = trellis::parse_encode_device(a.calibration_device, "--calibration-device " + a.calibration_device);
      if (o.device == trellis::EncodeDevice::Cuda) o.device = trellis::parse_encode_device(a.device, "--device " + a.device);
    }
  }
  ProgressBar bar;
  o.on_note = [&](const std::string& s) {
    bar.end_line();
    std::fprintf(stderr, "trellm quantize: %s\n", s.c_str());
  };
  o.on_progress = [&](const trellis::QuantizeProgress& p) { bar.update(p); };
  o.capture.on_capture_progress = [&](int pass, int64_t done, int64_t total) { bar.capture(pass, done, total); };
  if (!a.trace.empty()) trace::start(), trace::name_thread("main");
  QuantizeModelResult r;
  try {
    r = quantize_model(a.model, o);
  } catch (...) {
    if (!a.trace.empty()) trace::write(a.trace);  // the timeline up to the failure
    throw;
  }
  if (!a.trace.empty()) trace::write(a.trace);
  bar.end_line();
  if (r.stopped) {
    std::fprintf(stderr,
                 "trellm quantize: stopped after %lld Linears (--stop-after); %s.partial holds the work so far, "
                 "rerun the same command to resume\n", (long long)a.stop_after, a.out.c_str());
    return 3;
  }
  uint64_t bytes = 0;
  for (const auto& f : fs::directory_iterator(a.out))
    if (f.is_regular_file()) bytes += f.file_size();
  std::fprintf(stderr,
               "trellm quantize: wrote %s in %s%s: %zu Linears (%lld LDLQ, %lld plain Viterbi%s%s), decoder Linears "
               "%.3f bpw, with lm_head %.3f bpw%s, %.2f MB\n",
               a.out.c_str(), seconds(bar.seconds_elapsed()).c_str(),
               r.calibration_seconds > 0 ? str_cat(" (calibration ", seconds(r.calibration_seconds), ")").c_str() : "",
               r.plan.entries.size(), (long long)r.ldlq,
               (long long)r.plain,
               r.few_rows ? str_cat(", ", r.few_rows, " of them for too few calibration rows").c_str() : "",
               r.reused ? str_cat(", ", r.reused, " reused from an interrupted run").c_str() : "",
               r.plan.decoder_bits, r.plan.all_bits,
               r.mtp ? str_cat(", MTP layer ", r.mtp, " Linears at ", r.plan.mtp_bits, " bpw").c_str() : "",
               double(bytes) / 1e6);
  return 0;
}

}  // namespace

void add_quantize(CLI::App& app) {
  static QuantizeArgs a;
  auto* cmd = app.add_subcommand("quantize", "Quantize a BF16/F16/F32 checkpoint to EXL3 (trellis-coded Linears)");
  cmd->add_option("-m,--model", a.model, "Input model directory (Hugging Face checkpoint)")->required();
  cmd->add_option("-o,--out", a.out, "Output directory (built in OUT.partial, renamed when complete)")->required();
  cmd->add_option("-b,--bits", a.bits, "Average bits per weight of the decoder Linears, 1..8 (fractional: "
                                       "per-tensor integer K allocated to meet it)")->required();
  cmd->add_option("--head-bits", a.head_bits, "lm_head bits, 1..8 (16: keep it unquantized)")->capture_default_str();
  cmd->add_option("--mtp-bits", a.mtp_bits,
                  "K of the MTP layer's Linears (model.layers.<num_hidden_layers>.*: eh_proj and its decoder layer), "
                  "1..8, with shared_head.head at --head-bits; calibrated through the MTP forward like the decoder. "
                  "16: keep the MTP layer unquantized")
      ->capture_default_str();
  cmd->add_option("--codebook", a.codebook, "Trellis codebook: mcg, mul1 or 3inst")->capture_default_str();
  cmd->add_option("--calibration", a.calibration,
                  "Calibration data for LDLQ: a text file (tokenized with the model's tokenizer.json) or a .ids "
                  "file of whitespace-separated token ids. Without it: plain per-tile Viterbi");
  a.rows_opt = cmd->add_option("--calibration-rows", a.calibration_rows, "At most this many calibration rows")
                   ->capture_default_str();
  a.seq_opt = cmd->add_option("--seq-len", a.seq_len, "Tokens per calibration row")->capture_default_str();
  cmd->add_option("--hessian-cache", a.hessian_cache,
                  "Keep the calibration Hessians in this folder and reuse them in later runs with the same model and "
                  "calibration rows (e.g. at other --bits): the capture, a forward pass over every calibration "
                  "token, is then skipped; the output is the same");
  cmd->add_option("--device", a.device,
                  "Where the conversion runs: cpu, cuda (cuda:N for GPU N), or auto (the GPU when there is one). The "
                  "Viterbi encoder writes the same codes on both (~300x faster on a GPU); the calibration forward and "
                  "its Hessians run there too (see --calibration-device)")->capture_default_str();
  cmd->add_option("--calibration-inputs", a.calibration_inputs,
                  "Where each layer's calibration inputs come from: quantized (layer by layer, from the already "
                  "quantized layers before it, as exllamav3 does; only one layer's weights are loaded at a time), "
                  "original (every Hessian from the unquantized model, in windows of layers), or auto (quantized, "
                  "unless --hessian-cache keeps the unquantized model's Hessians)")
      ->check(CLI::IsMember({"auto", "quantized", "original"}))
      ->capture_default_str();
  cmd->add_option("--calibration-device", a.calibration_device,
                  "Where the calibration forward runs and its Hessians are summed: same (as --device), cpu, cuda, "
                  "cuda:N. The GPU rounds activations to bf16 for its products, so its Hessians (and codes) differ "
                  "slightly from the CPU's; it holds one layer at a time (the whole unquantized model with "
                  "--calibration-inputs original)")
      ->capture_default_str();
  cmd->add_option("--threads", a.threads, "CPU threads (default: all cores)");
  cmd->add_option("--seed", a.seed, "Seed of the random sign flips (Linear i uses seed + i)")->capture_default_str();
  cmd->add_flag("--force", a.force, "Replace OUT if it already holds a model");
  cmd->add_flag("--no-scale-search", a.no_scale_search,
                "Skip the global scale search; use the scale that is best for Gaussian weights at each K (faster "
                "on small models, slightly worse)");
  cmd->add_option("--trace", a.trace,
                  "Write a timeline of the conversion to this file: each thread's spans (calibration passes, "
                  "Hessians out, rotations and scale searches ahead, block LDL, LDLQ, file writes) as Chrome "
                  "trace JSON, to open in ui.perfetto.dev or chrome://tracing");
  // Test hook: stop after encoding N Linears, as if interrupted (the resume tests use it).
  cmd->add_option("--stop-after", a.stop_after, "")->group("");
  cmd->callback([] { std::exit(run_quantize(a)); });
}

}  // namespace trellm::cli
