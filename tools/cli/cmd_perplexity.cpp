// trellm perplexity: how well a model predicts a text (non-overlapping windows of --ctx tokens), and with --ref
// how far its next-token distributions are from a reference model's (mean KL divergence, top-1 agreement).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "common.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/glm4_moe_lite.h"
#include "runtime/metrics.h"

namespace trellm::cli {

namespace {

struct PplArgs {
  std::string model, ref, text, ids, device = "auto";
  int ctx = 1024, chunk = 0;
  int64_t max_tokens = 0;
  bool json = false, mtp = false;
};

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(what, " ", path, ": cannot open the file");
  return std::string(std::istreambuf_iterator<char>(f), {});
}

int run_perplexity(const PplArgs& a) {
  if (a.text.empty() == a.ids.empty()) fail("give exactly one of --text FILE and --ids FILE");
  const std::string dir = resolve_model(a.model);
  auto backend = make_backend(a.device);
  auto model = Model::load(dir, *backend);
  if (a.mtp && model->weights().mtp.empty())
    fail("--mtp: ", dir, " has no MTP layer (config.json num_nextn_predict_layers ", model->config().num_nextn_predict_layers,
         ", no model.layers.", model->config().num_hidden_layers, ".* tensors loaded)");
  std::unique_ptr<Model> ref;
  if (!a.ref.empty()) {
    ref = Model::load(a.ref, *backend);
    if (ref->config().vocab_size != model->config().vocab_size)
      fail("--ref ", a.ref, ": its vocabulary (", ref->config().vocab_size, " tokens) differs from the model's (",
           model->config().vocab_size, "); KL needs the same vocabulary");
  }

  std::vector<int32_t> ids;
  size_t bytes = 0;
  if (!a.text.empty()) {
    const std::string text = read_file(a.text, "--text");
    bytes = text.size();
    ids = load_tokenizer(dir).encode(text);
    if (ref) {  // both models must read the same tokens
      const std::string rtok = a.ref + "/tokenizer.json";
      if (std::ifstream(rtok) && load_tokenizer(a.ref).encode(text) != ids)
        fail("--ref ", a.ref, ": its tokenizer splits the text differently from the model's; KL needs the same tokens");
    }
  } else {
    ids = parse_ids(read_file(a.ids, "--ids"));
  }
  if (a.max_tokens > 0 && int64_t(ids.size()) > a.max_tokens) ids.resize(size_t(a.max_tokens));
  PerplexityOptions opt;
  opt.ctx = int(std::min<int64_t>(a.ctx, model->config().max_position_embeddings));
  opt.chunk = a.chunk;
  PerplexityResult r = evaluate_perplexity(*model, ref.get(), ids, opt);
  MtpAgreement mr;
  if (a.mtp) mr = evaluate_mtp(*model, ids, opt);

  if (a.json) {
    nlohmann::ordered_json j = {{"model", dir}, {"text", a.text.empty() ? a.ids : a.text}, {"bytes", bytes},
                                {"tokens", ids.size()}, {"ctx", opt.ctx}, {"windows", r.windows},
                                {"predicted", r.predicted}, {"mean_nll", r.mean_nll}, {"perplexity", r.perplexity},
                                {"seconds", r.seconds}, {"device", backend->name()}};
    if (ref) {
      j["ref"] = a.ref;
      j["ref_perplexity"] = r.ref_perplexity;
      j["mean_kl"] = r.mean_kl;
      j["max_kl"] = r.max_kl;
      j["top1_agree"] = r.top1_agree;
    }
    if (a.mtp) {
      j["mtp_positions"] = mr.positions;
      j["mtp_agreement"] = mr.agreement;
      j["mtp_accuracy"] = mr.accuracy;
      j["mtp_seconds"] = mr.seconds;
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model        %s\n", dir.c_str());
  if (!a.text.empty())
    std::printf("text         %s (%zu bytes, %zu tokens, %.2f bytes/token)\n", a.text.c_str(), bytes, ids.size(),
                ids.empty() ? 0.0 : double(bytes) / double(ids.size()));
  else
    std::printf("ids          %s (%zu tokens)\n", a.ids.c_str(), ids.size());
  std::printf("windows      %lld of up to %d tokens, %lld tokens predicted\n", (long long)r.windows, opt.ctx,
              (long long)r.predicted);
  std::printf("perplexity   %.4f (mean NLL %.5f nats/token)\n", r.perplexity, r.mean_nll);
  if (ref) {
    std::printf("reference    %s: perplexity %.4f\n", a.ref.c_str(), r.ref_perplexity);
    std::printf("KL(ref||m)   mean %.6f nats/token, max %.4f; top-1 agreement %.2f %%\n", r.mean_kl, r.max_kl,
                100.0 * r.top1_agree);
  }
  if (a.mtp)
    std::printf("MTP draft    top-1 agreement with the model's greedy next token %.2f %%, accuracy on the text %.2f %% "
                "(%lld positions, %.2f s)\n", 100.0 * mr.agreement, 100.0 * mr.accuracy, (long long)mr.positions, mr.seconds);
  std::printf("time         %.2f s (%.0f tokens/s) [%s, %d threads]\n", r.seconds,
              r.seconds > 0 ? double(r.predicted) / r.seconds : 0.0, backend->name().c_str(), ThreadPool::global().size());
  return 0;
}

}  // namespace

void add_perplexity(CLI::App& app) {
  static PplArgs a;
  auto* cmd = app.add_subcommand("perplexity", "Perplexity of a model on a text, and KL divergence against a reference model");
  cmd->add_option("-m,--model", a.model, "Model directory (default: the built-in model)");
  cmd->add_option("--text", a.text, "Text file, tokenized with the model's tokenizer.json");
  cmd->add_option("--ids", a.ids, "File of token ids (space or comma separated) instead of --text");
  cmd->add_option("--ctx", a.ctx, "Window length in tokens; windows do not overlap, each starts with an empty cache")
      ->capture_default_str()->check(CLI::Range(2, 1 << 24));
  cmd->add_option("--ref", a.ref, "Reference model directory (e.g. the bf16 original): adds mean KL(ref || model)");
  cmd->add_option("--max-tokens", a.max_tokens, "Score only the first N tokens of the text (0 = all)");
  cmd->add_option("--chunk", a.chunk, "Rows per forward pass (0 = automatic)");
  cmd->add_option("--device", a.device, "cpu, cuda, cuda:N, or auto (the GPU when there is one)")->capture_default_str();
  cmd->add_flag("--mtp", a.mtp, "Also score the MTP layer as a drafter: its token at p vs the model's greedy token "
                                 "at p+1, on the same windows");
  cmd->add_flag("--json", a.json, "Print one JSON object instead of the table");
  cmd->callback([] { std::exit(run_perplexity(a)); });
}

}  // namespace trellm::cli
