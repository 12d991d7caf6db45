// The op vocabulary every backend implements (CPU reference, CUDA). The model's forward() is written only
// in these ops, so one model definition serves every backend and every weight format.
//
// Conventions: activations are f32, row-major [rows, cols]; weights keep their checkpoint dtype. Tensor
// pointers live in the backend's memory (host for CPU, device for CUDA). Ops check shapes and dtypes once
// and fail loudly on a mismatch (a bug in the caller, not bad input).
#pragma once
#include <cstddef>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend/kernel_timeline.h"
#include "backend/kv_block.h"
#include "core/tensor.h"

namespace trellm {

namespace trellis {
struct TrellisWeight;  // src/quant: an EXL3 trellis-coded matrix
}

// y = x · Wᵀ (+ b): a dense weight [out, in] (bf16 / f16 / f32) or a trellis-coded one.
struct Linear {
  int64_t in = 0, out = 0;
  TensorView weight;                          // dense [out, in]; empty when trellis-coded
  const trellis::TrellisWeight* exl3 = nullptr;  // EXL3 codes (in the backend's memory); null when dense
  TensorView bias;                            // optional [out] f32 (also for trellis-coded weights)
  bool present() const { return !weight.empty() || exl3 != nullptr; }
};

struct Expert {
  Linear gate, up, down;  // gate/up [inter, hidden], down [hidden, inter]
};

struct MoeRouting {
  int n_experts = 0;
  int top_k = 0;
  int n_group = 1, topk_group = 1;  // group-limited selection (DeepSeek-V3); GLM-4.7-Flash uses 1/1
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

struct RopeParams {
  float theta = 10000.0f;
  int dim = 0;  // rotated dims per head (qk_rope_head_dim); pairs (x0,x1),(x2,x3)... are rotated together
};

struct MlaDims {
  int heads = 0;
  int kv_rank = 0;    // latent c_kv width (512)
  int rope_dim = 0;   // shared k_rope width (64)
  int nope_dim = 0;   // per-head non-rotary q/k dims (192)
  int v_dim = 0;      // per-head value dims (256)
  float scale = 1.0f; // softmax scale, 1/sqrt(nope + rope)
  int cache_width() const { return kv_rank + rope_dim; }
  int q_head_dim() const { return nope_dim + rope_dim; }
};

// Token sampling: greedy (temperature 0), or temperature -> top-k -> top-p -> min-p (transformers' order), then
// an exact draw from the surviving distribution by the Gumbel-max trick with counter-based noise
// u(seed, step, token id). Every backend draws the same token for the same logits, seed and step.
struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  int top_k = 0;             // 0 = off
  float top_p = 1.0f;        // 1 = off
  float min_p = 0.0f;        // 0 = off
  uint64_t seed = 0;         // 0 = from the clock (resolved by the caller before it reaches a backend)
};

// Speculative decoding (runtime/speculative.h): the draft tokens are drawn by sample_rows from the draft model's
// logits with the request's parameters and the seed xor kSpecDraftSalt; verification draws its acceptance
// uniform u(seed, step, kSpecAcceptIndex) (an index no vocabulary reaches) and its residual resample from the
// stream seed xor kSpecResidualSalt, so the three are independent of each other and of plain sampling's noise.
constexpr uint64_t kSpecDraftSalt = 0xD6E8FEB86659FD93ull;
constexpr uint64_t kSpecResidualSalt = 0xA0761D6478BD642Full;
constexpr uint64_t kSpecAcceptIndex = uint64_t(1) << 40;

// One speculative verification of m sequences with K >= 0 drafts each (Backend::spec_verify).
struct SpecVerify {
  int K = 0;
  TensorView target;     // [m * (K+1), V] f32: the main model's logits of each sequence's verified rows, in order
  TensorView draft;      // [rows, V] f32: draft j of sequence i was drawn from row j * draft_stride + src[i] (K = 0: unused)
  int draft_stride = 0;
  TensorView src;        // I32 [m] (K = 0: unused)
  TensorView tokens;     // I32 [m * (K+1)]: the verified rows' tokens; row i * (K+1) + 1 + j is draft j of sequence i
  TensorView params;     // m SamplingParams (U8 [m * sizeof(SamplingParams)])
  TensorView steps;      // I32 [m]: the noise counter of each sequence's first emitted token
  TensorView out;        // I32 [m * (K+2)]: a_i (drafts accepted), then the a_i + 1 emitted tokens, then the last
                         // emitted token repeated to K+1 tokens
  int64_t sequences() const;  // m, after checking every shape (a mismatch is a caller's bug: it aborts)
};

// The inputs of MTP draft step j after a uniform verification (Backend::spec_prepare). Step 0 runs the MTP layer
// on every verified row (m * (K+1) rows; rows past a_i write cache rows a later step overwrites before any reads
// them); step j >= 1 on one row per sequence, the chained draft.
struct SpecPrepare {
  int K = 0, j = 0;
  TensorView result;     // I32 [m * (K+2)]: spec_verify's out
  TensorView steps;      // I32 [m]: spec_verify's steps
  TensorView base;       // I32 [m]: step 0 writes pos[i * (K+1)] + a_i (the position of the last accepted row), j >= 1 read it
  TensorView drafts;     // I32 [m]: j >= 1: the draft step j - 1 sampled (step j's tokens)
  // written:
  TensorView tokens;     // I32: step 0: [m * (K+1)] row i*(K+1)+r = result[i*(K+2)+1+r];  j >= 1: [m] = drafts
  TensorView pos;        // I32: step 0: read (the verified rows' positions);  j >= 1: [m] = base + j
  TensorView seq;        // I32 [m]: j >= 1: = i
  TensorView logit_idx;  // I32 [m]: step 0: i*(K+1) + a_i (the row whose logits give draft 0)
  TensorView steps_out;  // I32 [m]: steps[i] + a_i + 1 + j (the noise counter of the token the step drafts)
  int64_t sequences() const;  // m, after checking the shapes
};

// The paged latent KV cache: kKvBlockTokens, kv_pool_row and kv_blocks_for in kv_block.h (shared with the kernels).

// Where the rows of a step sit: each row's position in its sequence and that sequence's block table. The device
// data (pos, seq, tables) is read at run time, so a captured CUDA graph serves every step; the host data (bound,
// runs) only sizes grids and picks kernels.
struct Positions {
  TensorView pos;     // I32 [n]: position of row i in its sequence
  int bound = 0;      // host: an upper bound on pos[i] + 1 over the rows (a graph captured once: the tables' capacity)
  TensorView seq;     // I32 [n]: row i reads and writes the cache through block table tables[seq[i]]
  TensorView tables;  // I32 [n_tables, max_blocks]: pool block ids (entries past a sequence's length are unused)
  // host: rows [0, n) as consecutive runs of one sequence each (a prompt chunk; a decode row is a run of 1), sizes
  // summing to n. Empty: one run of all n rows. Rows of one run have consecutive positions.
  std::span<const int> runs;
  int max_blocks() const { return int(tables.cols()); }
  // Host backends: the pool row of step row i (its table's entry for its position).
  int64_t pool_row(int64_t i) const {
    return kv_pool_row(tables.ptr<int32_t>() + int64_t(seq.ptr<int32_t>()[i]) * max_blocks(), pos.ptr<int32_t>()[i]);
  }
};

enum class MlaMode {
  Absorbed,  // scores against the latent directly: q_lat = W_UKᵀ q_nope (decode; reads the cache once)
  Expanded,  // expand K/V per key tile with kv_b_proj (long prompts: fewer FLOPs)
};

// A recorded sequence of ops replayed as one unit (a CUDA graph on the GPU; a plain call on the CPU).
class StepGraph {
 public:
  virtual ~StepGraph() = default;
  virtual void launch() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory (never called inside forward) ----
  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void from_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() {}
  // Fills t with seeded pseudo-random data: floats (F32/F16/BF16) uniform in [-scale, scale] (never NaN),
  // integer types random bits. For synthetic models, whose speed does not depend on the weight values.
  virtual void fill_random(TensorView t, uint64_t seed, float scale) = 0;
  // True when tensors live in host memory: weights are then used in place from the mmapped checkpoint.
  virtual bool host_memory() const = 0;
  // Element type of the latent KV cache (CPU: F32, the reference; CUDA: BF16, half the bytes per step).
  virtual DType kv_dtype() const = 0;

  // ---- measurement (benchmarks; never inside forward) ----
  // A timestamp in the backend's stream order (a CUDA event on the GPU); elapsed_ms waits for `to`.
  virtual int record_event();
  virtual double elapsed_ms(int from, int to);
  // Device memory in use and in total (bytes); the CPU reports 0/0.
  virtual std::pair<size_t, size_t> memory_used_total() { return {0, 0}; }
  // Measured device-to-device copy bandwidth in bytes/s counting bytes read + written (0 if not measurable).
  virtual double copy_bandwidth() { return 0; }
  // In-kernel clocks (CUDA built with -DTRELLM_KERNEL_CLOCKS=ON; elsewhere begin throws, naming why): from
  // begin to end every kernel block records its dependency wait, at most max_records blocks; end returns the
  // records with the kernels of the step graph launched last, whose replays they should cover.
  virtual bool kernel_clocks_available() const { return false; }
  virtual void kernel_clocks_begin(size_t max_records);
  virtual KernelClocks kernel_clocks_end();

  // Changes whenever the backend reallocates memory that captured graphs may point to (its grow-only scratch):
  // a graph captured under another epoch must be captured again before it is launched.
  virtual uint64_t memory_epoch() const { return 0; }
  // Records step() once; launch() replays it. The step must not allocate, synchronise or copy from the host,
  // and must have run once before (so scratch buffers have their final size).
  virtual std::unique_ptr<StepGraph> capture(const std::function<void()>& step);

  // ---- ops ----
  // out[i, :] = table[tokens[i], :] as f32.  tokens: I32 [n];  table: [vocab, hidden]
  virtual void embed(TensorView out, TensorView tokens, TensorView table) = 0;
  // out = x / rms(x) * w, per row.  x, out: [n, d] f32 (may alias);  w: [d]
  virtual void rms_norm(TensorView out, TensorView x, TensorView w, float eps) = 0;
  // The residual step fused with the next norm: h += y, then out = h / rms(h) * w.  h, y, out: [n, d]
  virtual void add_rms_norm(TensorView h, TensorView y, TensorView w, float eps, TensorView out) = 0;
  // out = a + b elementwise (may alias)
  virtual void add(TensorView out, TensorView a, TensorView b) = 0;
  // out = x · Wᵀ + b.  x: [n, in];  out: [n, out]
  virtual void matmul(TensorView out, TensorView x, const Linear& w) = 0;
  // out = rms_norm(x, norm_w) · Wᵀ + b (MLA's q_a_layernorm before q_b), one kernel where the backend can fold
  // the norm into the product's input transform. Afterwards x holds rms_norm(x) or is unchanged (backend's
  // choice): callers must not read it. The default normalises in place, then multiplies.
  virtual void rms_norm_matmul(TensorView out, TensorView x, TensorView norm_w, float eps, const Linear& w) {
    rms_norm(x, x, norm_w, eps);
    matmul(out, x, w);
  }
  // Two products of one input: out1 = x · W1ᵀ + b1, out2 = x · W2ᵀ + b2 (MLA's q_a and kv_a). A backend may
  // run them as one kernel; the default is two matmuls.
  virtual void matmul_pair(TensorView out1, TensorView out2, TensorView x, const Linear& w1, const Linear& w2) {
    matmul(out1, x, w1);
    matmul(out2, x, w2);
  }
  // out = silu(gate) * up.  all [n, d]
  virtual void silu_mul(TensorView out, TensorView gate, TensorView up) = 0;
  // Interleaved RoPE in place on x: [n, heads, head_dim], rotating dims [offset, offset + rope.dim) of
  // every head; row i is at position pos[i].
  virtual void rope(TensorView x, int offset, const Positions& pos, const RopeParams& rope) = 0;
  // Writes n tokens into one layer's latent cache pool [blocks * kKvBlockTokens, kv_rank + rope_dim] (kv_dtype()),
  // row i at position pos[i] of its sequence (kv_pool_row of tables[seq[i]]):
  // c_kv = rms_norm(kv[:, :kv_rank], norm_w), k_rope = rope(kv[:, kv_rank:]).  kv: [n, kv_rank + rope_dim] f32
  virtual void mla_cache_append(TensorView cache, TensorView kv, TensorView norm_w, float eps, const Positions& pos,
                                const RopeParams& rope) = 0;
  // The two steps between MLA's projections and its attention, as one op (a backend may run them as one kernel):
  // rope(q, offset, pos, rope), then mla_cache_append(cache, kv, norm_w, eps, pos, rope).
  virtual void mla_rope_append(TensorView q, int offset, TensorView cache, TensorView kv, TensorView norm_w, float eps,
                               const Positions& pos, const RopeParams& rope) {
    this->rope(q, offset, pos, rope);
    mla_cache_append(cache, kv, norm_w, eps, pos, rope);
  }
  // Causal MLA attention: query row i attends to positions [0, pos[i]] of its sequence (block table tables[seq[i]]).
  // q: [n, heads, nope+rope] (rope applied);  out: [n, heads * v_dim];  kv_b: [heads*(nope+v), kv_rank]
  virtual void attention_mla(TensorView out, TensorView q, TensorView cache, const Linear& kv_b, const Positions& pos,
                             const MlaDims& dims, MlaMode mode) = 0;
  // MLA from the projections to the attention output, as one op: mla_rope_append(q, offset, cache, kv, norm_w, eps,
  // pos, rope), then attention_mla(out, q, cache, kv_b, pos, dims, mode). The GPU folds the first step into the
  // attention's first kernel for decode; q's contents afterwards are unspecified (rotated or not).
  virtual void attention_mla_append(TensorView out, TensorView q, int offset, TensorView cache, TensorView kv,
                                    TensorView norm_w, float eps, const Linear& kv_b, const Positions& pos,
                                    const MlaDims& dims, const RopeParams& rope, MlaMode mode) {
    mla_rope_append(q, offset, cache, kv, norm_w, eps, pos, rope);
    attention_mla(out, q, cache, kv_b, pos, dims, mode);
  }
  // Router: weights/ids [n, top_k] (f32 / I32) from x [n, hidden] and gate [n_experts, hidden];
  // bias [n_experts] f32 (may be empty) is added for selection only.
  virtual void moe_route(TensorView weights, TensorView ids, TensorView x, TensorView gate, TensorView bias,
                         const MoeRouting& r) = 0;
  // The residual step before a MoE block fused with its router (one kernel on the GPU): add_rms_norm(h, y, norm_w,
  // eps, x), then moe_route(weights, ids, x, gate, bias, r).
  virtual void add_rms_norm_route(TensorView h, TensorView y, TensorView norm_w, float eps, TensorView x,
                                  TensorView weights, TensorView ids, TensorView gate, TensorView bias, const MoeRouting& r) {
    add_rms_norm(h, y, norm_w, eps, x);
    moe_route(weights, ids, x, gate, bias, r);
  }
  // out = Σ_k weights[:, k] · expert_{ids[:, k]}(x) + shared(x), expert(x) = down(silu(gate x) * up x).
  // shared may be null.  x, out: [n, hidden] (must not alias).
  virtual void moe_ffn(TensorView out, TensorView x, TensorView weights, TensorView ids,
                       std::span<const Expert> experts, const Expert* shared) = 0;
  // The experts fused with the residual step after them (on the GPU, decode: the down kernel's last blocks):
  // moe_ffn(out, x, weights, ids, experts, shared), then add_rms_norm(h, out, norm_w, eps, x_next). x_next may be x.
  virtual void moe_ffn_add_rms_norm(TensorView out, TensorView x, TensorView weights, TensorView ids,
                                    std::span<const Expert> experts, const Expert* shared, TensorView h,
                                    TensorView norm_w, float eps, TensorView x_next) {
    moe_ffn(out, x, weights, ids, experts, shared);
    add_rms_norm(h, out, norm_w, eps, x_next);
  }
  // Decoding without the host: token[0] = the token sampled from logits[0, :] (greedy: argmax, ties to the lowest
  // id) with step = history[0] as the noise counter, pos[0] += 1, and the token appended to history (I32
  // [1 + cap]: history[0] counts the tokens written, which follow it). params: one SamplingParams in the
  // backend's memory (U8 [sizeof(SamplingParams)]), so a captured step serves any settings.
  virtual void sample_step(TensorView logits, TensorView params, TensorView token, TensorView pos,
                           TensorView history) = 0;
  // Batched sampling (the batched engine): tokens[i] = the token sampled from logits[i, :] with params[i] and noise
  // counter steps[i] (a request's count of tokens generated so far), the function sample_step computes for one row.
  // logits: [n, vocab] f32;  params: n SamplingParams in the backend's memory (U8 [n * sizeof(SamplingParams)]);
  // steps, tokens: I32 [n].
  virtual void sample_rows(TensorView logits, TensorView params, TensorView steps, TensorView tokens) = 0;
  // Speculative verification (Leviathan et al. 2023, Chen et al. 2023) of each sequence's drafts, in order: greedy
  // (temperature 0) accepts draft j while it is the argmax of target row j; otherwise with p = target row j's and
  // q = draft row j's distribution after the filters (the distribution sample_rows draws from), draft d is
  // accepted when u * q(d) < p(d) (probability min(1, p(d) / q(d))); the first rejection emits a draw from
  // max(0, p - q) normalised (p itself where that is zero everywhere), and a sequence whose K drafts all pass
  // emits a draw from target row K as sample_rows would (step + K). The tokens emitted follow the main model's
  // distribution exactly, whatever the drafts; greedy emits exactly the tokens plain greedy decoding would.
  virtual void spec_verify(const SpecVerify& v) = 0;
  // SpecPrepare's writes (a handful of integers per sequence, so a captured step drafts without the host).
  virtual void spec_prepare(const SpecPrepare& p) = 0;
  // out[i, :] = x[idx[i], :] (the rows whose logits a step wants).  x: [n, d];  out: [m, d];  idx: I32 [m]
  virtual void gather_rows(TensorView out, TensorView x, TensorView idx) = 0;

  // Drops what the backend keeps derived from weights (device tables of expert pointers, dequantized copies), keyed
  // by their addresses: called before weights are freed, since new ones may come at the same addresses.
  virtual void forget_weights() {}

  // ---- calibration (trellm quantize; never in the serving path) ----
  // When set, called with every Linear and the rows x [n, in] (f32, contiguous, in the backend's memory: device
  // memory on the GPU, valid until the call returns, in stream order) it is applied to: by matmul, by moe_ffn's
  // experts (only the rows routed to each expert) and, for kv_b_proj, by attention_mla with the latent rows c_kv
  // of the step's tokens (every attention form reports each token once). Fused ops fall back to their parts while
  // it is set, so each Linear is reported once per step. Empty by default: the hot path pays one branch per op.
  using LinearObserver = std::function<void(const Linear& w, TensorView x)>;
  void set_linear_observer(LinearObserver observer) { observer_ = std::move(observer); }

 protected:
  LinearObserver observer_;

 private:
  std::vector<std::chrono::steady_clock::time_point> host_events_;
};

std::unique_ptr<Backend> make_cpu_backend();
// True when this build has CUDA and a usable GPU is present.
bool cuda_available();
// Tunables of the CUDA backend, set from the command line (never from the environment). Its name() shows the ones
// not at their default, so start-up banners and benchmark records say what ran.
struct CudaOptions {
  // MLA prefill (17+ query rows) has two forms that compute the same function: absorbed (attention in the latent)
  // and expanded (keys and values expanded per head first). Auto takes whichever needs fewer tensor-core MACs for
  // the call (mla::make_plan); Absorbed / Expanded force one wherever it applies (A/B measurements).
  enum class MlaPrefill { Auto, Absorbed, Expanded };
  MlaPrefill mla_prefill = MlaPrefill::Auto;

  std::string describe() const;  // the options not at their default, e.g. "mla prefill absorbed"; "" if none
};
const char* mla_prefill_name(CudaOptions::MlaPrefill m);  // "auto", "absorbed", "expanded"
// "auto" | "absorbed" | "expanded"; anything else is an Error naming `where` (e.g. the CLI flag).
CudaOptions::MlaPrefill parse_mla_prefill(const std::string& s, const std::string& where);

// The CUDA backend on GPU `device`; an Error when the build has no CUDA or no such GPU exists.
std::unique_ptr<Backend> make_cuda_backend(int device = 0, const CudaOptions& options = {});

}  // namespace trellm
