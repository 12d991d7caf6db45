// Trellis CUDA kernels against their CPU references (quant/trellis_ref.h, CpuBackend::moe_route/moe_ffn) on
// fresh seeded random inputs and random codes. Device outputs are poisoned (NaN / 0xFFFF) first, so an
// unwritten element fails. Skips cleanly without a GPU (CI has nvcc but no GPU).
//
// Tolerances and why:
//  - dequantize: within 1 bf16 ulp of trellis::dequantize_hf_bf16 (expected: bit-identical, same fp32
//    operation order; the count of inexact elements is printed and must stay below 1e-4 of all).
//  - matmul: max |y - ref| <= 1e-4 · rms(ref). x_h is bit-identical to the reference; what differs is the
//    fp32 summation order of the MMA: measured 1e-6 .. 1e-5 of rms on an H100.
//  - MoE: max |y - ref| <= 2e-3 · rms(ref) and ‖y - ref‖ <= 5e-4 · ‖ref‖. The down projection's input
//    fp16(silu(g)·u ⊙ suh) can round the other way when g, u differ from the CPU's in the last fp32 bit (MMA
//    order, expf): one such flip moves that feature by 2^-11 of itself, and with heavy-tailed activations
//    the output by up to ~7e-4 of its rms (measured on an H100, GLM dims, 127 tokens: max 7.2e-4, rel L2
//    1.1e-4; small dims: 6e-4 / 9e-5). A wrong kernel (expert, weight, split) misses both by orders of magnitude.
//  - router: ids equal wherever the CPU's k-th and (k+1)-th choices differ by > 1e-5 (the dot products sum in
//    another order), weights within 1e-5 relative.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/trellis_kernels.h"
#include "backend/cuda/trellis_test_util.h"
#include "quant/trellis_ref.h"

using namespace trellm;
using namespace trellm::testing;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

class TrellisCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
    TT_CHECK(cudaStreamCreate(&stream));
  }
  void TearDown() override {
    if (stream) cudaStreamDestroy(stream);
    for (void* p : ptrs) cudaFree(p);
  }
  template <typename T>
  T* upload(const std::vector<T>& h) {
    T* d = dev_upload(h);
    ptrs.push_back(d);
    return d;
  }
  void* alloc_zero(size_t bytes) {
    void* d = nullptr;
    TT_CHECK(cudaMalloc(&d, bytes));
    TT_CHECK(cudaMemset(d, 0, bytes));
    ptrs.push_back(d);
    return d;
  }
  std::vector<float> randn(size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = rng.normal();
    return v;
  }
  cudaStream_t stream = nullptr;
  std::vector<void*> ptrs;
  Rng rng{20261126};
};

double rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s / std::max<size_t>(1, v.size()));
}

// max |a - b| / rms(b); NaN anywhere in a -> +inf.
// ‖a - b‖ / ‖b‖.
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); i++) n += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), d += double(b[i]) * b[i];
  return std::sqrt(n / std::max(1e-30, d));
}

double max_rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); i++) {
    if (!std::isfinite(a[i])) return INFINITY;
    worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  }
  return worst / std::max(1e-30, rms(b));
}

// Distance in bf16 ulps (ordered integer representation; +0 == -0).
int bf16_ulps(uint16_t a, uint16_t b) {
  auto ord = [](uint16_t v) { return (v & 0x8000) ? -int(v & 0x7FFF) : int(v); };
  return std::abs(ord(a) - ord(b));
}

struct Shape {
  int out, in;
};
// GLM-4.7-Flash shapes (out × in, HF orientation) and odd ones (padding on both sides).
const Shape kGlm[] = {{2048, 1536}, {1536, 2048}, {768, 2048}, {2048, 5120}, {576, 2048}};
const Shape kOdd[] = {{136, 200}, {333, 517}, {1000, 130}, {129, 1100}};

// ---- dequantize ------------------------------------------------------------------------------------------------

void check_dequant(TrellisCuda* t, Rng& rng, int out, int in, int K, int cb, cudaStream_t s) {
  RandomTrellis w(rng, in, out, K, cb, false);
  std::vector<uint16_t> ref(size_t(out) * in);
  trellis::dequantize_hf_bf16(w.host, ref.data());
  uint16_t* d = nullptr;
  TT_CHECK(cudaMalloc(&d, ref.size() * 2));
  TT_CHECK(cudaMemset(d, 0xFF, ref.size() * 2));  // 0xFFFF = NaN: an unwritten element fails
  cuda::trellis_dequantize_bf16(w.dev, d, s);
  TT_CHECK(cudaStreamSynchronize(s));
  const std::vector<uint16_t> got = dev_download(d, ref.size());
  TT_CHECK(cudaFree(d));
  size_t inexact = 0;
  int worst = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    const int u = (got[i] & 0x7FFF) > 0x7F80 ? 1 << 20 : bf16_ulps(got[i], ref[i]);
    worst = std::max(worst, u);
    inexact += u != 0;
  }
  EXPECT_LE(worst, 1) << out << "x" << in << " K=" << K << " cb=" << cb;
  EXPECT_LE(double(inexact), 1e-4 * ref.size()) << out << "x" << in << " K=" << K << " cb=" << cb;
  std::printf("dequant %dx%d K=%d cb=%d: %zu of %zu elements not bit-identical, max %d ulp\n", out, in, K, cb,
              inexact, ref.size(), worst);
}

TEST_F(TrellisCuda, DequantizeSmallAllKAllCodebooks) {
  for (int K = 2; K <= 8; K++)
    for (int cb = 0; cb < 3; cb++) check_dequant(this, rng, 136, 200, K, cb, stream);
}

TEST_F(TrellisCuda, DequantizeShapes) {
  int i = 0;
  for (const Shape& sh : kGlm) check_dequant(this, rng, sh.out, sh.in, 2 + (i % 3), (i + 1) % 3, stream), i++;
  for (const Shape& sh : kOdd) check_dequant(this, rng, sh.out, sh.in, 2 + (i % 7), (i + 1) % 3, stream), i++;
}

// ---- matmul ----------------------------------------------------------------------------------------------------

void check_matmul(TrellisCuda* t, Rng& rng, const Shape& sh, int K, int cb, const std::vector<int>& ms, cudaStream_t s,
                  bool with_bias = true) {
  RandomTrellis w(rng, sh.in, sh.out, K, cb, with_bias);
  const int max_m = *std::max_element(ms.begin(), ms.end());
  const size_t ws_bytes = cuda::trellis_workspace_bytes(max_m, w.dev.in_padded, w.dev.out_padded);
  void* ws = nullptr;
  TT_CHECK(cudaMalloc(&ws, ws_bytes));
  cuda::trellis_workspace_init(ws, ws_bytes, s);
  for (int m : ms) {
    std::vector<float> x(size_t(m) * sh.in);
    for (auto& v : x) v = rng.normal();
    std::vector<float> ref(size_t(m) * sh.out);
    trellis::trellis_matmul_ref(w.host, x.data(), m, ref.data());
    float* dx = dev_upload(x);
    float* dy = dev_upload(std::vector<float>(ref.size(), kNaN));
    cuda::trellis_matmul(w.dev, dx, dy, m, ws, s);
    TT_CHECK(cudaStreamSynchronize(s));
    const std::vector<float> got = dev_download(dy, ref.size());
    const double err = max_rel_err(got, ref);
    EXPECT_LE(err, 1e-4) << sh.out << "x" << sh.in << " K=" << K << " cb=" << cb << " m=" << m;
    // Same call again: the split-k counters were left at zero, and the result is deterministic.
    TT_CHECK(cudaMemset(dy, 0xFF, ref.size() * 4));
    cuda::trellis_matmul(w.dev, dx, dy, m, ws, s);
    TT_CHECK(cudaStreamSynchronize(s));
    const std::vector<float> again = dev_download(dy, ref.size());
    EXPECT_EQ(0, std::memcmp(again.data(), got.data(), got.size() * 4)) << "not deterministic, m=" << m;
    std::printf("matmul %dx%d K=%d cb=%d m=%d: max err %.3g of rms\n", sh.out, sh.in, K, cb, m, err);
    cudaFree(dx);
    cudaFree(dy);
  }
  cudaFree(ws);
}

TEST_F(TrellisCuda, MatmulSmallAllKAllCodebooks) {
  for (int K = 2; K <= 8; K++)
    for (int cb = 0; cb < 3; cb++) check_matmul(this, rng, {136, 200}, K, cb, {1, 3, 17}, stream);
}

TEST_F(TrellisCuda, MatmulGlmShapes) {
  int i = 0;
  for (const Shape& sh : kGlm) {
    check_matmul(this, rng, sh, 2 + (i % 3), i % 3, {1, 3, 8, 17, 33, 127}, stream, i % 2 == 0);
    i++;
  }
}

TEST_F(TrellisCuda, MatmulOddShapes) {
  int i = 0;
  for (const Shape& sh : kOdd) {
    check_matmul(this, rng, sh, 2 + (i % 7), (i + 1) % 3, {1, 3, 17, 33, 127, 300}, stream, i % 2 == 1);
    i++;
  }
}

// Capture one GEMV, one GEMM and replay the graph: equals the eager result (counters reset, no host work).
TEST_F(TrellisCuda, MatmulGraphReplay) {
  RandomTrellis w(rng, 1536, 2048, 3, 1, false);
  const int m1 = 1, m2 = 32;
  const size_t ws_bytes = cuda::trellis_workspace_bytes(m2, w.dev.in_padded, w.dev.out_padded);
  void* ws = alloc_zero(ws_bytes);
  float* x = upload(randn(size_t(m2) * 1536));
  float* y1 = upload(std::vector<float>(size_t(m1) * 2048, kNaN));
  float* y2 = upload(std::vector<float>(size_t(m2) * 2048, kNaN));
  cuda::trellis_matmul(w.dev, x, y1, m1, ws, stream);
  cuda::trellis_matmul(w.dev, x, y2, m2, ws, stream);
  TT_CHECK(cudaStreamSynchronize(stream));
  const auto e1 = dev_download(y1, size_t(m1) * 2048), e2 = dev_download(y2, size_t(m2) * 2048);
  cudaGraph_t g;
  cudaGraphExec_t ge;
  TT_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  cuda::trellis_matmul(w.dev, x, y1, m1, ws, stream);
  cuda::trellis_matmul(w.dev, x, y2, m2, ws, stream);
  TT_CHECK(cudaStreamEndCapture(stream, &g));
  TT_CHECK(cudaGraphInstantiate(&ge, g, 0));
  for (int r = 0; r < 3; r++) {
    TT_CHECK(cudaMemset(y1, 0xFF, e1.size() * 4));
    TT_CHECK(cudaMemset(y2, 0xFF, e2.size() * 4));
    TT_CHECK(cudaGraphLaunch(ge, stream));
    TT_CHECK(cudaStreamSynchronize(stream));
    EXPECT_EQ(0, std::memcmp(dev_download(y1, e1.size()).data(), e1.data(), e1.size() * 4)) << "replay " << r;
    EXPECT_EQ(0, std::memcmp(dev_download(y2, e2.size()).data(), e2.data(), e2.size() * 4)) << "replay " << r;
  }
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
}

// The GEMV pair (MLA's q_a + kv_a in one launch), then a product that reads the pair's first output through the
// same workspace: with programmatic dependent launch on (pdl.cuh, sm_90), the second kernel's weight loads
// start before the pair ends, so a missing grid_wait would show up here as a wrong or NaN row. Pairs of
// different K (or m > 8) take the two-launch fallback, checked the same way.
TEST_F(TrellisCuda, MatmulPairThenDependent) {
  struct Case { int in, out1, out2, K1, K2, cb; };
  const Case cases[] = {{2048, 768, 576, 3, 3, 1}, {136, 200, 333, 4, 4, 0}, {517, 130, 1000, 2, 2, 2}, {300, 128, 256, 3, 5, 1}};
  for (const Case& c : cases) {
    RandomTrellis w1(rng, c.in, c.out1, c.K1, c.cb, true), w2(rng, c.in, c.out2, c.K2, c.cb, false);
    RandomTrellis w3(rng, c.out1, 257, c.K1, c.cb, true);
    for (int m : {1, 3, 8, 17}) {
      const size_t ws_bytes = std::max(cuda::trellis_workspace_bytes(m, w1.dev.in_padded, w1.dev.out_padded + w2.dev.out_padded),
                                       cuda::trellis_workspace_bytes(m, w3.dev.in_padded, w3.dev.out_padded));
      void* ws = alloc_zero(ws_bytes);
      const std::vector<float> x = randn(size_t(m) * c.in);
      std::vector<float> r1(size_t(m) * c.out1), r2(size_t(m) * c.out2), r3(size_t(m) * 257);
      trellis::trellis_matmul_ref(w1.host, x.data(), m, r1.data());
      trellis::trellis_matmul_ref(w2.host, x.data(), m, r2.data());
      trellis::trellis_matmul_ref(w3.host, r1.data(), m, r3.data());
      float* dx = upload(x);
      float* d1 = upload(std::vector<float>(r1.size(), kNaN));
      float* d2 = upload(std::vector<float>(r2.size(), kNaN));
      float* d3 = upload(std::vector<float>(r3.size(), kNaN));
      for (int rep = 0; rep < 2; rep++) {
        cuda::trellis_matmul_pair(w1.dev, w2.dev, dx, d1, d2, m, ws, stream);
        cuda::trellis_matmul(w3.dev, d1, d3, m, ws, stream);
        TT_CHECK(cudaStreamSynchronize(stream));
        const auto g1 = dev_download(d1, r1.size()), g2 = dev_download(d2, r2.size()), g3 = dev_download(d3, r3.size());
        EXPECT_LE(max_rel_err(g1, r1), 1e-4) << "pair first, in " << c.in << " m=" << m;
        EXPECT_LE(max_rel_err(g2, r2), 1e-4) << "pair second, in " << c.in << " m=" << m;
        // d3 is computed from the GPU's d1, which differs from r1 by rounding (a flipped fp16 rounding of x_h
        // here and there): 1e-3; reading d1 too early gives NaN (poison) or values off by O(1).
        EXPECT_LE(max_rel_err(g3, r3), 1e-3) << "dependent, in " << c.in << " m=" << m;
        TT_CHECK(cudaMemset(d1, 0xFF, r1.size() * 4));
        TT_CHECK(cudaMemset(d2, 0xFF, r2.size() * 4));
        TT_CHECK(cudaMemset(d3, 0xFF, r3.size() * 4));
      }
    }
  }
}

// The GEMV with the RMS norm folded into its prologue (MLA's q_b(norm(q_a))) against rms_norm on the CPU, then
// the reference product. The GPU's sum of squares runs in another order, so its rsqrt may differ in the last
// bit, which flips an fp16 rounding of x_h here and there: 1e-3 of the output RMS, as for the dependent product
// above (a missing or wrong norm is off by O(1): the rows' RMS is 3 here). x must come back unchanged.
TEST_F(TrellisCuda, MatmulNormedPrologue) {
  struct Case { int in, out, K, cb; };
  for (const Case& c : {Case{768, 5120, 3, 1}, Case{136, 200, 4, 0}, Case{517, 130, 2, 2}}) {
    RandomTrellis w(rng, c.in, c.out, c.K, c.cb, c.in == 136);
    for (int m : {1, 3, 8}) {
      void* ws = alloc_zero(cuda::trellis_workspace_bytes(m, w.dev.in_padded, w.dev.out_padded));
      std::vector<float> x = randn(size_t(m) * c.in), nw = randn(c.in), xn(x.size());
      for (auto& v : x) v *= 3.0f;
      for (int r = 0; r < m; r++) {  // rms_norm as CpuBackend::rms_norm: w * (x * rsqrt(mean x² + eps))
        double ss = 0;
        for (int k = 0; k < c.in; k++) ss += double(x[size_t(r) * c.in + k]) * x[size_t(r) * c.in + k];
        const float rn = 1.0f / std::sqrt(float(ss / c.in) + 1e-6f);
        for (int k = 0; k < c.in; k++) xn[size_t(r) * c.in + k] = nw[k] * (x[size_t(r) * c.in + k] * rn);
      }
      std::vector<float> ref(size_t(m) * c.out);
      trellis::trellis_matmul_ref(w.host, xn.data(), m, ref.data());
      float* dx = upload(x);
      float* dw = upload(nw);
      float* dy = upload(std::vector<float>(ref.size(), kNaN));
      cuda::trellis_matmul_normed(w.dev, dx, dw, 1e-6f, dy, m, ws, stream);
      TT_CHECK(cudaStreamSynchronize(stream));
      const double err = max_rel_err(dev_download(dy, ref.size()), ref);
      EXPECT_LE(err, 1e-3) << c.out << "x" << c.in << " m=" << m;
      std::printf("normed %dx%d K=%d m=%d: max err %.3g of rms\n", c.out, c.in, c.K, m, err);
      EXPECT_EQ(0, std::memcmp(dev_download(dx, x.size()).data(), x.data(), x.size() * 4)) << "x modified";
    }
  }
}

// The GEMV's split-k tail in a thread-block cluster (gemv_cluster_kernel: push, pull) against the ticket-and-L2
// tail (TRELLM_GEMV_CLUSTER=0) and the CPU. Push and pull add the splits in split order, as sum_partials does,
// so they agree bit for bit, and with the ticket tail where one warp sums a row's splits (m >= 5); within 1e-5
// of rms where the ticket tail shares a row's splits among warps (another order: 2e-6 measured, the error of
// either against the CPU 5e-6). A cluster run must leave the workspace's partials untouched (poisoned first):
// that is how the test knows the cluster path ran. Shapes: 16 splits (q_a/kv_a's 2048 in), 6 (q_b's 768), 20
// (o_proj's 5120: more than a cluster holds, the ticket tail), odd ones with 2..9 splits.
struct EnvGuard {
  explicit EnvGuard(const char* n) : name(n) {}
  ~EnvGuard() { unsetenv(name); }
  void set(const char* v) const { setenv(name, v, 1); }
  const char* name;
};

TEST_F(TrellisCuda, MatmulClusterTailEqualsTicketTail) {
  const EnvGuard cluster("TRELLM_GEMV_CLUSTER"), mode("TRELLM_GEMV_CLUSTER_MODE");
  int used = 0;
  for (const Shape& sh : {Shape{1536, 2048}, Shape{5120, 768}, Shape{2048, 5120}, Shape{333, 517}, Shape{129, 1100}}) {
    RandomTrellis w(rng, sh.in, sh.out, 3, 1, sh.out == 333);
    const size_t ws_bytes = cuda::trellis_workspace_bytes(8, w.dev.in_padded, w.dev.out_padded);
    std::vector<unsigned char> image(ws_bytes, 0x7F);  // counters zero, partials poisoned (f32 3.4e38)
    std::fill(image.begin(), image.begin() + std::min<size_t>(16384, ws_bytes), 0);
    void* ws = upload(image);
    for (int m : {1, 2, 3, 8}) {
      const std::vector<float> x = randn(size_t(m) * sh.in);
      std::vector<float> ref(size_t(m) * sh.out);
      trellis::trellis_matmul_ref(w.host, x.data(), m, ref.data());
      float* dx = upload(x);
      float* dy = upload(std::vector<float>(ref.size(), kNaN));
      auto run = [&](const char* c, const char* md, bool* untouched) {
        cluster.set(c);
        mode.set(md);
        TT_CHECK(cudaMemcpy(ws, image.data(), ws_bytes, cudaMemcpyHostToDevice));
        TT_CHECK(cudaMemset(dy, 0xFF, ref.size() * 4));
        cuda::trellis_matmul(w.dev, dx, dy, m, ws, stream);
        TT_CHECK(cudaStreamSynchronize(stream));
        const std::vector<unsigned char> after = dev_download(static_cast<unsigned char*>(ws), ws_bytes);
        *untouched = after == image;
        return dev_download(dy, ref.size());
      };
      bool t0 = false, t1 = false, t2 = false;
      const std::vector<float> ticket = run("0", "2", &t0), pull = run("16", "1", &t1), push = run("16", "2", &t2);
      const std::string at = std::to_string(sh.out) + "x" + std::to_string(sh.in) + " m=" + std::to_string(m);
      EXPECT_FALSE(t0) << at << ": the ticket tail wrote no partials";
      EXPECT_LE(max_rel_err(ticket, ref), 1e-4) << at;
      EXPECT_LE(max_rel_err(pull, ref), 1e-4) << at;
      EXPECT_EQ(0, std::memcmp(pull.data(), push.data(), ref.size() * 4)) << at << ": push and pull differ";
      if (t1 != t2) ADD_FAILURE() << at << ": one of push and pull ran as clusters, the other not";
      if (t1) {
        used++;
        EXPECT_LE(max_rel_err(pull, ticket), 1e-5) << at;
        if (m >= 5) {
          EXPECT_EQ(0, std::memcmp(pull.data(), ticket.data(), ref.size() * 4)) << at << ": not the ticket's bits";
        }
      }
      std::printf("gemv tail %s: cluster %s, err %.3g / %.3g of rms\n", at.c_str(), t1 ? "yes" : "no",
                  max_rel_err(pull, ref), max_rel_err(ticket, ref));
    }
  }
  int major = 0;
  TT_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major >= 9) {
    EXPECT_EQ(used, 16) << "clusters fit on sm_90: every shape of at most 16 splits runs as clusters";
  }
}

// ---- router ----------------------------------------------------------------------------------------------------

// fused: the router with the residual step before it (add_rms_norm_route): x = norm(h + y) is formed on the GPU
// and compared, h must become h + y exactly, and the routing is checked against the CPU's x as below.
// by_logits: the prefill router (moe_route_logits) from scores computed here in double and rounded to f32, as
// the backend's SGEMM would give them.
void check_route(TrellisCuda* t, Rng& rng, int m, int hidden, int E, int top_k, int n_group, int topk_group,
                 cudaStream_t s, bool fused = false, bool by_logits = false) {
  std::vector<float> x(size_t(m) * hidden), bias(E);
  for (auto& v : x) v = rng.normal();
  for (auto& v : bias) v = rng.uniform(-0.05f, 0.05f);
  std::vector<uint16_t> gate(size_t(E) * hidden);
  for (auto& v : gate) v = f32_to_bf16(rng.normal() * 0.03f);
  CpuBackend cpu;
  std::vector<float> h(x.size()), y(x.size()), nw(hidden), h_ref;
  if (fused) {
    for (auto& v : h) v = rng.normal() * 4.0f;
    for (auto& v : y) v = rng.normal();
    for (auto& v : nw) v = rng.uniform(0.5f, 1.5f);
    h_ref = h;
    cpu.add_rms_norm(TensorView(h_ref.data(), DType::F32, {m, hidden}), TensorView(y.data(), DType::F32, {m, hidden}),
                     TensorView(nw.data(), DType::F32, {hidden}), 1e-5f, TensorView(x.data(), DType::F32, {m, hidden}));
  }
  MoeRouting r;
  r.n_experts = E, r.top_k = top_k, r.n_group = n_group, r.topk_group = topk_group, r.norm_topk_prob = true;
  r.routed_scaling_factor = 1.8f;
  std::vector<float> wref(size_t(m) * top_k);
  std::vector<int32_t> iref(size_t(m) * top_k);
  cpu.moe_route(TensorView(wref.data(), DType::F32, {m, top_k}), TensorView(iref.data(), DType::I32, {m, top_k}),
                TensorView(x.data(), DType::F32, {m, hidden}), TensorView(gate.data(), DType::BF16, {E, hidden}),
                TensorView(bias.data(), DType::F32, {E}), r);
  float* dx = dev_upload(x);
  uint16_t* dg = dev_upload(gate);
  float* db = dev_upload(bias);
  float* dw = dev_upload(std::vector<float>(wref.size(), kNaN));
  int* di = dev_upload(std::vector<int>(iref.size(), -1));
  float* dh = dev_upload(h);
  float* dy = dev_upload(y);
  float* dn = dev_upload(nw);
  float* dl = nullptr;
  if (by_logits) {
    std::vector<float> logits(size_t(m) * E);
    for (int i = 0; i < m; i++)
      for (int e = 0; e < E; e++) {
        double d = 0;
        for (int k = 0; k < hidden; k++) d += double(bf16_to_f32(gate[size_t(e) * hidden + k])) * x[size_t(i) * hidden + k];
        logits[size_t(i) * E + e] = float(d);
      }
    dl = dev_upload(logits);
    cuda::moe_route_logits(dl, db, m, E, top_k, n_group, topk_group, true, 1.8f, dw, di, s);
  } else if (fused) {
    TT_CHECK(cudaMemset(dx, 0xFF, x.size() * 4));  // x is output only here
    cuda::add_rms_norm_route(dh, dy, dn, 1e-5f, dx, dg, db, m, hidden, E, top_k, n_group, topk_group, true, 1.8f, dw, di, s);
  } else {
    cuda::moe_route(dx, dg, db, m, hidden, E, top_k, n_group, topk_group, true, 1.8f, dw, di, s);
  }
  TT_CHECK(cudaStreamSynchronize(s));
  if (fused) {
    EXPECT_EQ(0, std::memcmp(dev_download(dh, h.size()).data(), h_ref.data(), h.size() * 4)) << "h += y";
    EXPECT_LE(max_rel_err(dev_download(dx, x.size()), x), 1e-6) << "x = norm(h)";
  }
  const auto w = dev_download(dw, wref.size());
  const auto id = dev_download(di, iref.size());
  // The CPU's choice values, to find near-ties (where summation order may legitimately flip the pick).
  int checked = 0;
  for (int i = 0; i < m; i++) {
    std::vector<float> c(E);
    for (int e = 0; e < E; e++) {
      double d = 0;
      for (int k = 0; k < hidden; k++) d += double(bf16_to_f32(gate[size_t(e) * hidden + k])) * x[size_t(i) * hidden + k];
      c[e] = float(1.0 / (1.0 + std::exp(-d)) + bias[e]);
    }
    std::vector<float> sorted = c;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    bool clear = n_group == 1;
    for (int k = 0; k < top_k && clear; k++) clear = sorted[k] - sorted[k + 1] > 1e-5f;
    if (!clear) continue;
    checked++;
    for (int k = 0; k < top_k; k++) {
      EXPECT_EQ(id[size_t(i) * top_k + k], iref[size_t(i) * top_k + k]) << "token " << i << " slot " << k;
      EXPECT_NEAR(w[size_t(i) * top_k + k], wref[size_t(i) * top_k + k], 1e-5f * std::fabs(wref[size_t(i) * top_k + k]) + 1e-7f);
    }
  }
  if (n_group > 1) {  // group-limited: compare directly (random data has no near-ties at this scale)
    for (size_t k = 0; k < iref.size(); k++) EXPECT_EQ(id[k], iref[k]) << k;
    checked = m;
  }
  EXPECT_GE(checked, m * 3 / 4);
  for (auto p : {(void*)dx, (void*)dg, (void*)db, (void*)dw, (void*)di, (void*)dh, (void*)dy, (void*)dn, (void*)dl}) cudaFree(p);
}

TEST_F(TrellisCuda, RouteGlm) {
  for (int m : {1, 3, 17, 33, 127}) check_route(this, rng, m, 2048, 64, 4, 1, 1, stream);
}
TEST_F(TrellisCuda, RouteFusedWithResidualNorm) {
  for (int m : {1, 3, 17}) check_route(this, rng, m, 2048, 64, 4, 1, 1, stream, true);
  check_route(this, rng, 5, 300, 40, 3, 1, 1, stream, true);
}
TEST_F(TrellisCuda, RouteFromLogits) {
  for (int m : {17, 300}) check_route(this, rng, m, 2048, 64, 4, 1, 1, stream, false, true);
  check_route(this, rng, 33, 2048, 64, 6, 8, 4, stream, false, true);
  check_route(this, rng, 20, 300, 40, 3, 1, 1, stream, false, true);
}
TEST_F(TrellisCuda, RouteGroupedOdd) {
  check_route(this, rng, 17, 2048, 64, 6, 8, 4, stream);
  check_route(this, rng, 5, 300, 40, 3, 1, 1, stream);  // hidden not a multiple of 8: scalar path
}

// ---- MoE experts -----------------------------------------------------------------------------------------------

void check_moe(TrellisCuda* t, Rng& rng, int m, int hidden, int inter, int E, int top_k, bool with_shared, bool mixed_k,
               cudaStream_t s, int reps = 1, int the_k = 3, int the_cb = 1) {
  std::vector<std::unique_ptr<RandomTrellis>> ws_;
  std::vector<Expert> experts(E);
  std::vector<cuda::DeviceTrellis> dexp(3 * E);
  int max_k = 2;  // passed to moe_experts: the decode kernels' ring is sized for it (K = 3: 24 KB, not 64)
  // Not mixed: one (K, codebook) for every matrix, given to moe_experts as the backend does (the prefill then runs
  // the grouped GEMM specialised for it).
  const int uni_k = the_k, uni_cb = the_cb;
  auto make = [&](int in, int out, int idx) {
    const int K = mixed_k ? 2 + int(rng.next_u32() % 7) : uni_k;
    max_k = std::max(max_k, K);
    const int cb = mixed_k ? int(rng.next_u32() % 3) : uni_cb;
    ws_.push_back(std::make_unique<RandomTrellis>(rng, in, out, K, cb, false));
    Linear l;
    l.in = in, l.out = out, l.exl3 = &ws_.back()->host;
    return std::make_pair(l, ws_.back()->dev);
  };
  for (int e = 0; e < E; e++) {
    auto g = make(hidden, inter, 0), u = make(hidden, inter, 1), d = make(inter, hidden, 2);
    experts[e] = Expert{g.first, u.first, d.first};
    dexp[3 * e] = g.second, dexp[3 * e + 1] = u.second, dexp[3 * e + 2] = d.second;
  }
  Expert shared_ex;
  std::vector<cuda::DeviceTrellis> dsh(3);
  if (with_shared) {
    auto g = make(hidden, inter, 0), u = make(hidden, inter, 1), d = make(inter, hidden, 2);
    shared_ex = Expert{g.first, u.first, d.first};
    dsh = {g.second, u.second, d.second};
  }
  // Distinct random experts per token, random positive weights.
  std::vector<int32_t> ids(size_t(m) * top_k);
  std::vector<float> wts(ids.size());
  for (int i = 0; i < m; i++) {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    for (int k = 0; k < top_k; k++) {
      std::swap(perm[k], perm[k + rng.next_u32() % (E - k)]);
      ids[size_t(i) * top_k + k] = perm[k];
      wts[size_t(i) * top_k + k] = rng.uniform(0.1f, 1.0f);
    }
  }
  std::vector<float> x(size_t(m) * hidden);
  for (auto& v : x) v = rng.normal();
  std::vector<float> ref(size_t(m) * hidden);
  CpuBackend cpu;
  cpu.moe_ffn(TensorView(ref.data(), DType::F32, {m, hidden}), TensorView(x.data(), DType::F32, {m, hidden}),
              TensorView(wts.data(), DType::F32, {m, top_k}), TensorView(ids.data(), DType::I32, {m, top_k}),
              std::span<const Expert>(experts), with_shared ? &shared_ex : nullptr);
  auto* dexp_d = dev_upload(dexp);
  auto* dsh_d = with_shared ? dev_upload(dsh) : nullptr;
  float* dx = dev_upload(x);
  int* di = dev_upload(ids);
  float* dw = dev_upload(wts);
  float* dout = dev_upload(std::vector<float>(ref.size(), kNaN));
  const size_t wsb = cuda::moe_workspace_bytes(m, top_k, hidden, inter, E);
  void* ws = nullptr;
  TT_CHECK(cudaMalloc(&ws, wsb));
  cuda::trellis_workspace_init(ws, wsb, s);
  std::vector<float> first;
  for (int r = 0; r < reps; r++) {
    TT_CHECK(cudaMemset(dout, 0xFF, ref.size() * 4));
    cuda::moe_experts(dexp_d, dsh_d, E, dx, di, dw, dout, m, top_k, hidden, inter, ws, s, max_k, mixed_k ? 0 : uni_k,
                      mixed_k ? -1 : uni_cb);
    TT_CHECK(cudaStreamSynchronize(s));
    const auto got = dev_download(dout, ref.size());
    const double err = max_rel_err(got, ref), l2 = rel_l2(got, ref);
    // Max error 4e-3 of the rms: the fp16 activations (x and the SwiGLU output h, 2^-11 relative each) move a rare
    // element by up to 3e-3 at K = 4 and 8 (measured; the L2 error stays ~6e-5). A wrong row or tile is O(1).
    EXPECT_LE(l2, 5e-4) << "moe m=" << m << " hidden " << hidden;
    EXPECT_LE(err, 4e-3) << "moe m=" << m << " hidden " << hidden << " inter " << inter << " E " << E << " rep " << r;
    if (!mixed_k && m > 8 && m < cuda::kMoeSpecialMaxRows && r == 0) {
      // The grouped GEMM specialised for (K, codebook) computes exactly what the generic one does, bit for bit.
      float* dgen = dev_upload(std::vector<float>(ref.size(), kNaN));
      cuda::moe_experts(dexp_d, dsh_d, E, dx, di, dw, dgen, m, top_k, hidden, inter, ws, s, max_k, 0, -1);
      TT_CHECK(cudaStreamSynchronize(s));
      EXPECT_EQ(0, std::memcmp(dev_download(dgen, ref.size()).data(), got.data(), got.size() * 4))
          << "specialised grouped GEMM differs from the generic one, m=" << m;
      cudaFree(dgen);
    }
    if (m <= cuda::kMoeDecodeMaxTokens && r == 0) {
      // Gate/up's split-k tail in clusters (the default) against its ticket tail (TRELLM_MOE_CLUSTER=0): the same
      // sums in the same order, so the same output bit for bit. The workspace past its 64 KB counter area
      // (trellis_moe.cu) is poisoned first; gate/up's first partial, the first word there, stays poisoned in a
      // cluster run (sm_90) and is written by the ticket tail: that is how the test knows which path ran.
      constexpr size_t kCounterArea = 65536;
      const std::vector<unsigned char> poison(wsb - kCounterArea, 0x7F);
      int major = 0;
      TT_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
      auto run = [&](const char* cluster, uint32_t* p_gu0) {
        if (cluster) setenv("TRELLM_MOE_CLUSTER", cluster, 1);
        TT_CHECK(cudaMemcpy(static_cast<char*>(ws) + kCounterArea, poison.data(), poison.size(), cudaMemcpyHostToDevice));
        float* d = dev_upload(std::vector<float>(ref.size(), kNaN));
        cuda::moe_experts(dexp_d, dsh_d, E, dx, di, dw, d, m, top_k, hidden, inter, ws, s, max_k, mixed_k ? 0 : uni_k,
                          mixed_k ? -1 : uni_cb);
        unsetenv("TRELLM_MOE_CLUSTER");
        TT_CHECK(cudaStreamSynchronize(s));
        TT_CHECK(cudaMemcpy(p_gu0, static_cast<char*>(ws) + kCounterArea, 4, cudaMemcpyDeviceToHost));
        const std::vector<float> y = dev_download(d, ref.size());
        cudaFree(d);
        return y;
      };
      uint32_t w_cl = 0, w_t = 0;
      const std::vector<float> cl = run(nullptr, &w_cl), ticket = run("0", &w_t);
      EXPECT_EQ(0, std::memcmp(cl.data(), ticket.data(), got.size() * 4)) << "gate/up in clusters vs the ticket tail, m=" << m;
      EXPECT_EQ(0, std::memcmp(cl.data(), got.data(), got.size() * 4)) << "gate/up in clusters, run again, m=" << m;
      EXPECT_NE(w_t, 0x7F7F7F7Fu) << "the ticket tail wrote gate/up's first partial, m=" << m;
      if (major >= 9) {
        EXPECT_EQ(w_cl, 0x7F7F7F7Fu) << "gate/up did not run in clusters, m=" << m;
      }
      // The residual step fused into the down kernel (MoeResidual), x_out aliasing the experts' input x: the
      // experts' output bit for bit as without it, h and x_out bit for bit as cuda::add_rms_norm after it (the one
      // row definition, add_rms_norm_row), and near the CPU's add_rms_norm of the CPU experts' output.
      std::vector<float> h(ref.size()), nw(static_cast<size_t>(hidden));
      for (auto& v : h) v = rng.normal();
      for (auto& v : nw) v = rng.uniform(0.5f, 1.5f);
      const float eps = 1e-5f;
      float *dh = dev_upload(h), *dnw = dev_upload(nw), *dx2 = dev_upload(x);
      float* dfused = dev_upload(std::vector<float>(ref.size(), kNaN));
      const cuda::MoeResidual res{dh, dnw, eps, dx2};
      cuda::moe_experts(dexp_d, dsh_d, E, dx2, di, dw, dfused, m, top_k, hidden, inter, ws, s, max_k, mixed_k ? 0 : uni_k,
                        mixed_k ? -1 : uni_cb, &res);
      float *dh_want = dev_upload(h), *dx_want = dev_upload(std::vector<float>(ref.size(), kNaN));
      cuda::add_rms_norm(dh_want, dout, dnw, dx_want, m, hidden, eps, s);
      TT_CHECK(cudaStreamSynchronize(s));
      EXPECT_EQ(0, std::memcmp(dev_download(dfused, ref.size()).data(), got.data(), got.size() * 4)) << "fused: experts' output, m=" << m;
      const auto h_got = dev_download(dh, h.size()), x_got = dev_download(dx2, h.size());
      EXPECT_EQ(0, std::memcmp(h_got.data(), dev_download(dh_want, h.size()).data(), h.size() * 4)) << "fused: h, m=" << m;
      EXPECT_EQ(0, std::memcmp(x_got.data(), dev_download(dx_want, h.size()).data(), h.size() * 4)) << "fused: x_out, m=" << m;
      std::vector<float> h_cpu = h, x_cpu(h.size(), kNaN);
      cpu.add_rms_norm(TensorView(h_cpu.data(), DType::F32, {m, hidden}), TensorView(ref.data(), DType::F32, {m, hidden}),
                       TensorView(nw.data(), DType::F32, {hidden}), eps, TensorView(x_cpu.data(), DType::F32, {m, hidden}));
      EXPECT_LE(rel_l2(h_got, h_cpu), 5e-4) << "fused: h against the CPU, m=" << m;
      EXPECT_LE(rel_l2(x_got, x_cpu), 5e-4) << "fused: x_out against the CPU, m=" << m;
      for (auto p : {dh, dnw, dx2, dfused, dh_want, dx_want}) cudaFree(p);
    }
    if (r == 0) {
      first = got;
      std::printf("moe m=%d hidden=%d inter=%d E=%d top_k=%d shared=%d %s: max err %.3g of rms, rel L2 %.3g\n", m, hidden,
                  inter, E, top_k, int(with_shared), mixed_k ? "mixed K" : ("K=" + std::to_string(uni_k) + " cb=" + std::to_string(uni_cb)).c_str(),
                  err, l2);
    } else {
      EXPECT_EQ(0, std::memcmp(got.data(), first.data(), got.size() * 4)) << "not deterministic, rep " << r;
    }
  }
  for (auto p : {(void*)dexp_d, (void*)dsh_d, (void*)dx, (void*)di, (void*)dw, (void*)dout, ws}) cudaFree(p);
}

TEST_F(TrellisCuda, MoeSmallMixedK) {
  for (int m : {1, 3, 8, 17, 33}) check_moe(this, rng, m, 320, 200, 8, 3, true, true, stream, 2);
  check_moe(this, rng, 5, 256, 128, 6, 2, false, true, stream);
  check_moe(this, rng, 20, 256, 128, 6, 2, false, true, stream);
  check_moe(this, rng, 500, 256, 128, 8, 3, true, true, stream);  // ~190 rows per expert: two grouped tiles each
}

// Every (K, codebook) instance of the specialised grouped GEMM, with 128-row tiles (m ~ 295: ~110 rows per expert)
// and with 16-row tiles (m = 20..41: <= 16 rows per expert on average).
TEST_F(TrellisCuda, MoeUniformCodesPrefill) {
  for (int K = 2; K <= 8; K++)
    for (int cb = 0; cb < 3; cb++) {
      check_moe(this, rng, 290 + K, 256, 128, 8, 3, cb == 1, false, stream, 1, K, cb);
      check_moe(this, rng, 20 + 3 * K + cb, 256, 128, 8, 3, cb != 1, false, stream, 1, K, cb);
    }
}

// Uniform codes with experts past one 128-row tile (m = 800: ~300 rows per expert) and with one partial tile
// (m = 150: ~56 rows per expert).
TEST_F(TrellisCuda, MoeMultiTileExperts) {
  check_moe(this, rng, 800, 256, 128, 8, 3, true, false, stream);
  check_moe(this, rng, 150, 256, 128, 8, 3, true, false, stream);
}

TEST_F(TrellisCuda, MoeGlmDims) {
  for (int m : {1, 8, 9, 31, 33, 127, 200}) check_moe(this, rng, m, 2048, 1536, 8, 4, true, false, stream);
}

}  // namespace
