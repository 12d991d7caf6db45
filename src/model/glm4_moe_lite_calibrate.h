// What the two calibration captures share (HessianCapture in glm4_moe_lite_calibrate.cpp, LayerCapture in
// glm4_moe_lite_calibrate_layers.cpp): the device, the accumulators and the observer that feeds them. Internal to
// src/model.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "model/glm4_moe_lite_quantize.h"
#include "quant/hessian.h"
#include "quant/hessian_cuda.h"

namespace trellm::calibration {

// Tokens per forward step when Options::chunk is 0: 128 on the CPU (its reference attention is per row; the step
// size changes nothing but the cache key), 2048 on the GPU (the routed experts' products and DSYRKs want rows).
int64_t chunk_for(const HessianCapture::Options& o);

// The capture's backend on `d` (the GPU: the encoder's, --device cuda:N, with the backend's own stream) and, on the
// GPU, the accumulators' context on that stream.
struct Device {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<trellis::HessianCudaContext> cuda;
};
Device open_device(trellis::EncodeDevice d);

using Sums = std::map<std::string, std::unique_ptr<trellis::HessianSum>>;  // per input group
using Recorder = std::map<const Linear*, trellis::HessianSum*>;           // the Linear that feeds each group

// For each input group of `linears` not yet in `sums`, an accumulator (on the GPU when cuda is set), fed by the
// group's first Linear (the others share its Hessian).
Recorder add_groups(std::span<const std::pair<LinearSpec, const Linear*>> linears, Sums& sums,
                    trellis::HessianCudaContext* cuda);

// The MTP layer as drafting's first step runs it, over `count` positions p0.. of one calibration row: position p fed
// t[p+1] (next[i]) and h_p (row i of rs.x, the main model's final hidden state after model.norm); the sequence owns
// mtp_kv (blocks 0, 1, 2, ...). shared_head.head sees every row.
class MtpStep {
 public:
  MtpStep(int max_rows, int blocks);
  void run(Model& m, RunState& rs, KvCache& mtp_kv, const int32_t* next, int count, int p0);

 private:
  std::vector<int32_t> pos_, seq_, table_;
};

// While alive, `b`'s observer feeds each recorded Linear's rows to its accumulator (host or device rows, as the
// backend's); cleared when it goes, exceptions included.
class Observing {
 public:
  Observing(Backend& b, const Recorder& r);
  ~Observing();
  Observing(const Observing&) = delete;
  Observing& operator=(const Observing&) = delete;

 private:
  Backend& b_;
};

}  // namespace trellm::calibration
