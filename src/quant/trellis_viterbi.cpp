#include "quant/trellis_viterbi.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "core/half.h"
#include "core/thread_pool.h"
#ifdef TRELLM_HAVE_CUDA
#include "quant/trellis_viterbi_cuda.h"
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace trellm::trellis {

const float* codebook_table(Codebook cb) {
  static std::vector<float> tables[3];
  static std::once_flag once[3];
  const int i = int(cb);
  TRELLM_ASSERT(i >= 0 && i < 3);
  std::call_once(once[i], [&] {
    tables[i].resize(65536);
    for (uint32_t s = 0; s < 65536; s++) tables[i][s] = f16_to_f32(decode_state(cb, s));
  });
  return tables[i].data();
}

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Scratch {
  std::vector<float> cost, next;
  std::vector<uint8_t> bp;  // 256 x nodes: the winning k per node and step
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// One forward pass over `steps` values. cost (nodes, +8 floats of padding) holds the costs of the node
// before step 0 on entry and after the last step on exit. bp receives steps x nodes backpointers (the
// winning k per node).
//
// Per step and output node o: cost'[o] = min_k cost[pred(k, o)] + (cb[(k << (16-K)) | o] - w)^2 with
// pred(k, o) = k * 2^(16-2K) + (o >> K). Eight consecutive o need at most 8 consecutive predecessor costs
// (lane j uses element j >> K), so one unaligned load and a lane permute serve every K. Four vectors of o
// run side by side so the min/argmin dependency chains (one per k) overlap.
// Measured on this Xeon (Sapphire Rapids, one core): 25 ms/tile for a plain auto-vectorised loop over k
// outside o (memory-bound on re-reading the running minimum) vs ~3-5 ms/tile with this register-blocked form.
template <int K>
void forward(const float* cb, const float* w, int steps, Scratch& sc) {
  constexpr int kNodes = 1 << (16 - K), kBranch = 1 << K, kGroups = 1 << (16 - 2 * K);
  float* cost = sc.cost.data();
  float* next = sc.next.data();
  for (int p = 0; p < steps; p++) {
    const float wv = w[p];
    uint8_t* b = sc.bp.data() + size_t(p) * kNodes;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 wv8 = _mm256_set1_ps(wv);
    const __m256i lane_pred = _mm256_setr_epi32(0 >> K, 1 >> K, 2 >> K, 3 >> K, 4 >> K, 5 >> K, 6 >> K, 7 >> K);
    // picks byte 0 of each 32-bit lane into the low 4 bytes of each 128-bit half
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int o0 = 0; o0 < kNodes; o0 += 32) {
      __m256 best[4], bk[4];
      for (int j = 0; j < 4; j++) best[j] = _mm256_set1_ps(kInf), bk[j] = _mm256_setzero_ps();
      for (int k = 0; k < kBranch; k++) {
        const float* pk = cost + k * kGroups;
        const float* ck = cb + k * kNodes + o0;
        const __m256 kf = _mm256_set1_ps(float(k));
        for (int j = 0; j < 4; j++) {
          const int o = o0 + 8 * j;
          const __m256 pv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pk + (o >> K)), lane_pred);
          const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(ck + 8 * j), wv8);
          const __m256 c = _mm256_fmadd_ps(d, d, pv);
          const __m256 lt = _mm256_cmp_ps(c, best[j], _CMP_LT_OQ);
          best[j] = _mm256_blendv_ps(best[j], c, lt);
          bk[j] = _mm256_blendv_ps(bk[j], kf, lt);
        }
      }
      for (int j = 0; j < 4; j++) {
        _mm256_storeu_ps(next + o0 + 8 * j, best[j]);
        const __m256i packed = _mm256_shuffle_epi8(_mm256_cvtps_epi32(bk[j]), pick);
        const uint32_t lo = uint32_t(_mm_cvtsi128_si32(_mm256_castsi256_si128(packed)));
        const uint32_t hi = uint32_t(_mm_cvtsi128_si32(_mm256_extracti128_si256(packed, 1)));
        std::memcpy(b + o0 + 8 * j, &lo, 4);
        std::memcpy(b + o0 + 8 * j + 4, &hi, 4);
      }
    }
#else
    for (int o = 0; o < kNodes; o++) {
      float best = kInf;
      int bk = 0;
      for (int k = 0; k < kBranch; k++) {
        // std::fma: the same single rounding as the AVX2 path and the CUDA twin
        const float d = cb[k * kNodes + o] - wv, c = std::fma(d, d, cost[k * kGroups + (o >> K)]);
        if (c < best) best = c, bk = k;
      }
      next[o] = best;
      b[o] = uint8_t(bk);
    }
#endif
    std::swap(cost, next);
  }
  if (cost != sc.cost.data()) std::copy(cost, cost + kNodes, sc.cost.data());
}

// Trace back from node `end` after step steps-1; writes the states of steps [0, steps).
template <int K>
void traceback(const Scratch& sc, int steps, uint32_t end, uint16_t* states) {
  constexpr int kNodes = 1 << (16 - K);
  uint32_t o = end;
  for (int p = steps - 1; p >= 0; p--) {
    const uint32_t k = sc.bp[size_t(p) * kNodes + o];
    const uint32_t s = (k << (16 - K)) | o;
    states[p] = uint16_t(s);
    o = s >> K;
  }
}

template <int K>
double encode(const float* w, Codebook cbk, uint16_t* states, float* recon) {
  constexpr int kNodes = 1 << (16 - K);
  constexpr uint32_t kOverlapMask = kNodes - 1;
  const float* cb = codebook_table(cbk);
  Scratch& sc = scratch();
  sc.cost.resize(kNodes + 8);  // +8: the last unaligned predecessor load may read past the end
  sc.next.resize(kNodes + 8);
  sc.bp.resize(size_t(kTileElems) * kNodes);

  // Pass 1: unconstrained, over positions 128..255, 0..127.
  float rotated[kTileElems];
  for (int i = 0; i < kTileElems; i++) rotated[i] = w[(i + kTileElems / 2) % kTileElems];
  std::fill(sc.cost.begin(), sc.cost.begin() + kNodes, 0.0f);
  forward<K>(cb, rotated, kTileElems, sc);
  uint32_t end = 0;
  for (uint32_t o = 1; o < uint32_t(kNodes); o++)
    if (sc.cost[o] < sc.cost[end]) end = o;
  uint16_t tmp[kTileElems];
  traceback<K>(sc, kTileElems, end, tmp);
  const uint32_t e = uint32_t(tmp[kTileElems / 2]) >> K;  // step 128 of the rotated pass is position 0

  // Pass 2: from position 0, starting in node e and forced to end in node e (tail-biting).
  std::fill(sc.cost.begin(), sc.cost.begin() + kNodes, kInf);
  sc.cost[e] = 0.0f;
  forward<K>(cb, w, kTileElems, sc);
  traceback<K>(sc, kTileElems, e & kOverlapMask, states);

  double err = 0;
  for (int p = 0; p < kTileElems; p++) {
    const float v = cb[states[p]];
    if (recon) recon[p] = v;
    err += (double(v) - w[p]) * (double(v) - w[p]);
  }
  return err;
}

}  // namespace

double viterbi_encode_tile(const float* w, int K, Codebook cb, uint16_t* states, float* recon) {
  switch (K) {
    case 1: return encode<1>(w, cb, states, recon);
    case 2: return encode<2>(w, cb, states, recon);
    case 3: return encode<3>(w, cb, states, recon);
    case 4: return encode<4>(w, cb, states, recon);
    case 5: return encode<5>(w, cb, states, recon);
    case 6: return encode<6>(w, cb, states, recon);
    case 7: return encode<7>(w, cb, states, recon);
    case 8: return encode<8>(w, cb, states, recon);
    default: fail("viterbi_encode_tile: K = ", K, " is outside 1..8");
  }
}

double viterbi_encode_tiles(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon) {
  std::vector<double> err(size_t(n), 0.0);
  parallel_for(n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++)
      err[t] = viterbi_encode_tile(w + t * kTileElems, K, cb, states + t * kTileElems,
                                   recon ? recon + t * kTileElems : nullptr);
  });
  double total = 0;
  for (double e : err) total += e;
  return total;
}

const char* encode_device_name(EncodeDevice d) { return d == EncodeDevice::Cuda ? "cuda" : "cpu"; }

bool cuda_encoder_available() {
#ifdef TRELLM_HAVE_CUDA
  return viterbi_cuda_available();
#else
  return false;
#endif
}

EncodeDevice parse_encode_device(const std::string& name, const std::string& what) {
  if (name == "cpu") return EncodeDevice::Cpu;
  if (name == "auto") return cuda_encoder_available() ? EncodeDevice::Cuda : EncodeDevice::Cpu;
  int gpu = 0;
  if (name.rfind("cuda:", 0) == 0) {
    const std::string n = name.substr(5);
    if (n.empty() || n.size() > 4 || n.find_first_not_of("0123456789") != std::string::npos)
      fail(what, ": \"", n, "\" is not a device number (cuda:0, cuda:1, ...)");
    gpu = std::stoi(n);
  } else if (name != "cuda") {
    fail(what, ": unknown device \"", name, "\" (cpu, cuda, cuda:N or auto)");
  }
#ifndef TRELLM_HAVE_CUDA
  (void)gpu;
  fail(what, ": this trellm was built without CUDA (TRELLM_CUDA=OFF or no nvcc); use --device cpu");
#else
  if (!viterbi_cuda_available()) fail(what, ": no CUDA device found (the driver reports none); use --device cpu");
  try {
    viterbi_cuda_use_device(gpu);
  } catch (const Error& e) {
    fail(what, ": ", e.what());
  }
  return EncodeDevice::Cuda;
#endif
}

double encode_tiles(const float* w, int64_t n, int K, Codebook cb, EncodeDevice dev, uint16_t* states, float* recon) {
  if (dev == EncodeDevice::Cpu) return viterbi_encode_tiles(w, n, K, cb, states, recon);
#ifdef TRELLM_HAVE_CUDA
  return viterbi_encode_tiles_cuda(w, n, K, cb, states, recon);
#else
  fail("encode_tiles: the CUDA encoder is not in this build (TRELLM_HAVE_CUDA is off)");
#endif
}

}  // namespace trellm::trellis
