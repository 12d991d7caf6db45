#include "runtime/metrics.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/timer.h"

namespace trellm {

namespace {

// log sum_i exp(x_i) in double.
double log_sum_exp(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; i++) m = std::max(m, x[i]);
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += std::exp(double(x[i]) - double(m));
  return double(m) + std::log(s);
}

// Runs one window through `m` in chunks; calls row(i, logits) for window rows 0..n-2 (each predicts row i+1).
template <class F>
void window_logits(Model& m, RunState& rs, KvCache& kv, const int32_t* tok, int n, int chunk,
                   std::vector<float>& host, F&& row) {
  const int64_t V = m.config().vocab_size;
  for (int pos = 0; pos < n - 1; pos += chunk) {
    // Rows pos..pos+len-1 are needed as predictors; the last token of the window is never one.
    const int len = std::min(chunk, n - 1 - pos);
    m.forward(rs, kv, tok + pos, len, pos, /*all_logits=*/true);
    m.backend().to_host(host.data(), rs.logits.data, size_t(len) * size_t(V) * sizeof(float));
    for (int i = 0; i < len; i++) row(pos + i, host.data() + size_t(i) * size_t(V));
  }
}

// The window and the token ids checked (errors name --ctx or the id); the rows per forward: opt.chunk, or what
// keeps the logits of a chunk near 64 MB (512 rows at most), never more than the window.
int checked_chunk(const Model& model, const std::vector<int32_t>& ids, const PerplexityOptions& opt, int min_window) {
  const Config& c = model.config();
  const int64_t V = c.vocab_size;
  if (opt.ctx < min_window) fail("perplexity: the window (--ctx) must hold at least ", min_window, " tokens");
  if (opt.ctx > c.max_position_embeddings)
    fail("perplexity: --ctx ", opt.ctx, " exceeds the model's max_position_embeddings = ", c.max_position_embeddings);
  for (int32_t t : ids)
    if (t < 0 || t >= V) fail("perplexity: token id ", t, " is outside the vocabulary (0..", V - 1, ")");
  const int chunk = opt.chunk > 0 ? opt.chunk : int(std::max<int64_t>(1, std::min<int64_t>(512, (int64_t(64) << 20) / V)));
  return std::min(chunk, opt.ctx);
}

}  // namespace

double token_nll(const float* logits, int64_t vocab, int32_t target) {
  TRELLM_ASSERT(target >= 0 && target < vocab, "token_nll: target ", target, " outside 0..", vocab - 1);
  return log_sum_exp(logits, vocab) - double(logits[target]);
}

double kl_divergence(const float* ref_logits, const float* logits, int64_t vocab) {
  if (vocab <= 0) fail("kl_divergence: empty distribution");
  for (int64_t i = 0; i < vocab; i++)
    if (!std::isfinite(ref_logits[i]) || !std::isfinite(logits[i]))
      fail("kl_divergence: logit ", i, " is not finite (", ref_logits[i], ", ", logits[i], ")");
  const double lp = log_sum_exp(ref_logits, vocab), lq = log_sum_exp(logits, vocab);
  double kl = 0;
  for (int64_t i = 0; i < vocab; i++) {
    const double log_p = double(ref_logits[i]) - lp;
    const double p = std::exp(log_p);
    if (p > 0) kl += p * (log_p - (double(logits[i]) - lq));
  }
  return std::max(kl, 0.0);  // rounding can leave a tiny negative sum for identical distributions
}

double mean_kl_divergence(const float* ref_logits, const float* logits, int64_t rows, int64_t vocab) {
  if (rows <= 0) fail("mean_kl_divergence: no rows");
  double s = 0;
  for (int64_t r = 0; r < rows; r++) s += kl_divergence(ref_logits + r * vocab, logits + r * vocab, vocab);
  return s / double(rows);
}

PerplexityResult evaluate_perplexity(Model& model, Model* ref, const std::vector<int32_t>& ids,
                                     const PerplexityOptions& opt) {
  const Config& c = model.config();
  const int64_t V = c.vocab_size;
  const int chunk = checked_chunk(model, ids, opt, 2);
  if (ref && ref->config().vocab_size != V)
    fail("perplexity: the reference model's vocabulary (", ref->config().vocab_size, ") differs from the model's (", V, ")");
  if (ref && opt.ctx > ref->config().max_position_embeddings)
    fail("perplexity: --ctx ", opt.ctx, " exceeds the reference model's max_position_embeddings");

  Timer timer;
  PerplexityResult r;
  r.has_ref = ref != nullptr;
  RunState rs = model.make_run_state(chunk);
  KvCache kv = model.make_kv_cache(opt.ctx);
  std::vector<float> host(size_t(chunk) * size_t(V));
  std::optional<RunState> rrs;
  std::optional<KvCache> rkv;
  std::vector<float> rhost;
  if (ref) {
    rrs.emplace(ref->make_run_state(chunk));
    rkv.emplace(ref->make_kv_cache(opt.ctx));
    rhost.resize(host.size());
  }
  double nll = 0, ref_nll = 0, kl = 0;
  int64_t agree = 0;
  const int64_t N = int64_t(ids.size());
  for (int64_t start = 0; start + 1 < N; start += opt.ctx) {
    const int n = int(std::min<int64_t>(opt.ctx, N - start));
    const int32_t* tok = ids.data() + start;
    r.windows++;
    if (!ref) {
      window_logits(model, rs, kv, tok, n, chunk, host, [&](int i, const float* lg) {
        nll += token_nll(lg, V, tok[i + 1]);
        r.predicted++;
      });
      continue;
    }
    // With a reference: the same chunk through both models, then compare row by row.
    for (int pos = 0; pos < n - 1; pos += chunk) {
      const int len = std::min(chunk, n - 1 - pos);
      model.forward(rs, kv, tok + pos, len, pos, true);
      model.backend().to_host(host.data(), rs.logits.data, size_t(len) * size_t(V) * sizeof(float));
      ref->forward(*rrs, *rkv, tok + pos, len, pos, true);
      ref->backend().to_host(rhost.data(), rrs->logits.data, size_t(len) * size_t(V) * sizeof(float));
      for (int i = 0; i < len; i++) {
        const float* lg = host.data() + size_t(i) * size_t(V);
        const float* rl = rhost.data() + size_t(i) * size_t(V);
        nll += token_nll(lg, V, tok[pos + i + 1]);
        ref_nll += token_nll(rl, V, tok[pos + i + 1]);
        const double k = kl_divergence(rl, lg, V);
        kl += k;
        r.max_kl = std::max(r.max_kl, k);
        agree += argmax(lg, V) == argmax(rl, V);
        r.predicted++;
      }
    }
  }
  model.backend().synchronize();
  if (r.predicted == 0) fail("perplexity: the text has fewer than 2 tokens");
  r.mean_nll = nll / double(r.predicted);
  r.perplexity = std::exp(r.mean_nll);
  if (ref) {
    r.mean_kl = kl / double(r.predicted);
    r.top1_agree = double(agree) / double(r.predicted);
    r.ref_perplexity = std::exp(ref_nll / double(r.predicted));
  }
  r.seconds = timer.seconds();
  return r;
}

MtpAgreement evaluate_mtp(Model& model, const std::vector<int32_t>& ids, const PerplexityOptions& opt, int layer) {
  const Config& c = model.config();
  const int64_t V = c.vocab_size;
  if (model.weights().mtp.empty()) fail("the model has no MTP layer (num_nextn_predict_layers tensors)");
  if (layer < 0 || size_t(layer) >= model.weights().mtp.size()) fail("MTP layer ", layer, " does not exist");
  const int chunk = checked_chunk(model, ids, opt, 3);

  Timer timer;
  MtpAgreement r;
  RunState rs = model.make_run_state(chunk);
  model.add_mtp_state(rs);
  KvCache kv = model.make_kv_cache(opt.ctx);
  KvCache mkv = model.make_mtp_kv_cache_blocks(kv.blocks);
  std::vector<float> host(size_t(chunk) * size_t(V));
  std::vector<int32_t> main_next, draft;
  std::vector<int32_t> pos(static_cast<size_t>(chunk)), seq(static_cast<size_t>(chunk), 0), table(static_cast<size_t>(kv.blocks));
  for (size_t b = 0; b < table.size(); b++) table[b] = int32_t(b);
  int64_t agree = 0, correct = 0;
  const int64_t N = int64_t(ids.size());
  for (int64_t start = 0; start + 2 < N; start += opt.ctx) {
    const int n = int(std::min<int64_t>(opt.ctx, N - start));
    if (n < 3) break;
    const int32_t* tok = ids.data() + start;
    main_next.assign(size_t(n), -1);  // the model's greedy token after row p (a guess of t[p+1])
    draft.assign(size_t(n), -1);      // the MTP's guess of t[p+2] at row p
    for (int p0 = 0; p0 < n - 1; p0 += chunk) {
      const int len = std::min(chunk, n - 1 - p0);
      model.forward(rs, kv, tok + p0, len, p0, /*all_logits=*/true);
      model.backend().to_host(host.data(), rs.logits.data, size_t(len) * size_t(V) * sizeof(float));
      for (int i = 0; i < len; i++) main_next[size_t(p0 + i)] = argmax(host.data() + size_t(i) * size_t(V), V);
      // The MTP rows p with t[p+1] in the window and t[p+2] to compare with: p <= n - 3.
      const int mlen = std::min(len, n - 2 - p0);
      if (mlen <= 0) continue;
      for (int i = 0; i < mlen; i++) pos[size_t(i)] = p0 + i;
      StepBatch b;
      b.tokens = {tok + p0 + 1, size_t(mlen)};
      b.pos = {pos.data(), size_t(mlen)};
      b.seq = {seq.data(), size_t(mlen)};
      b.tables = table;
      b.table_stride = int(table.size());
      b.logits = Logits::All;
      model.forward_mtp(rs, mkv, b, TensorView(rs.x.data, DType::F32, {mlen, c.hidden_size}), layer);
      model.backend().to_host(host.data(), rs.logits.data, size_t(mlen) * size_t(V) * sizeof(float));
      for (int i = 0; i < mlen; i++) draft[size_t(p0 + i)] = argmax(host.data() + size_t(i) * size_t(V), V);
    }
    for (int p = 0; p + 2 < n; p++) {
      agree += draft[size_t(p)] == main_next[size_t(p + 1)];
      correct += draft[size_t(p)] == tok[p + 2];
      r.positions++;
    }
  }
  model.backend().synchronize();
  if (r.positions == 0) fail("MTP agreement: the text has fewer than 3 tokens");
  r.agreement = double(agree) / double(r.positions);
  r.accuracy = double(correct) / double(r.positions);
  r.seconds = timer.seconds();
  return r;
}

}  // namespace trellm
