// Quantizing a whole checkpoint directory into an EXL3 one, given a plan from the caller (which Linears, their
// dims, K and codebook: model knowledge lives in src/model and the CLI). What this adds over exl3_export.h is
// the directory discipline of `trellm quantize`:
//  - atomic: everything is built in "<out>.partial/" and renamed to <out> only when complete, so an
//    interrupted run never leaves a directory that looks like a finished model;
//  - resumable: each quantized Linear is written to "<out>.partial/qtensors/<key>.safetensors" through a
//    temporary file and a rename; a rerun reuses every such file whose recorded K / codebook / seed / shape /
//    source fingerprint still match the plan;
//  - output like exllamav3's compile step (exllamav3/conversion/compile.py, read, not copied): shards
//    model-XXXXX-of-YYYYY.safetensors (or model.safetensors) plus model.safetensors.index.json, config.json with
//    quantization_config, quantization_config.json with tensor_storage, and the source's other files copied
//    (tokenizer, chat template, generation_config; *.bin / *.pt / *.pth / *.ckpt are skipped).
// Tensors not in the plan (embeddings, norms, router weights, ...) are copied byte for byte.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "quant/trellis_encode.h"
#include "quant/trellis_weight.h"

namespace trellm::trellis {

struct QuantizePlanEntry {
  std::string key;        // module key; the source holds key + ".weight" [out, in] (BF16, F16 or F32)
  int64_t in = 0, out = 0;
  int K = 4;
  Codebook codebook = Codebook::Mcg;
  // Entries with the same non-empty batch key (consecutive in the plan) and the same shape, K and codebook may be
  // encoded together (CheckpointQuantizeOptions::group_linears): "layer 3" puts a layer's 64 expert gate/up
  // projections in one group and its 64 down projections in another. Empty: alone.
  std::string batch{};
};

struct QuantizeProgress {
  int64_t done = 0, total = 0;        // Linears
  int64_t weights_done = 0, weights_total = 0;
  bool reused = false;                // this Linear came from an earlier, interrupted run
  int64_t group = 0;                  // Linears encoded together with this one (quantize_linears); 0 when reused
  const std::string* key = nullptr;   // the Linear just finished
};

struct CheckpointQuantizeOptions {
  std::string out_dir;
  // An existing out_dir is an error unless this is set; then it is replaced only at the very end, when the
  // new directory is complete (the caller decides whether out_dir is something that may be replaced).
  bool replace_existing = false;
  uint64_t seed = 0;                   // module i uses seed + i (sign flips), like exllamav3's per-module seed
  uint64_t shard_bytes = 8192ull << 20;  // exllamav3's default shard size (8192 MB)
  // Calibration Hessian of a Linear's input, (in, in); return an empty vector for plain Viterbi.
  std::function<std::vector<float>(const QuantizePlanEntry&)> hessian;
  std::function<void(const QuantizeProgress&)> on_progress;  // after each Linear
  // Called when the plan reaches a new batch key, before the Hessian of any of its Linears is asked for, once every
  // Linear of the earlier entries is finished in work_dir (<work_dir>/<key>.safetensors, their EXL3 tensors): the
  // layer-streamed calibration runs the layers before `batch` from their codes there (quantized propagation).
  // Setting it drains the pipeline at each new batch (the next layer's Hessians wait for the last LDLQ of the one
  // before; only the work on its weights alone, ahead_bytes, goes on meanwhile).
  std::function<void(const std::string& batch, const std::string& work_dir)> on_batch;
  EncodeOptions encode;                // K and codebook are overridden per plan entry
  // Plan entries of one batch key, shape, K and codebook are encoded together (quantize_linears: one batched LDLQ),
  // up to this many and about this many bytes of host working memory; the files are the same for any grouping
  // (1: one Linear at a time).
  int group_linears = 64;
  uint64_t group_bytes = 8ull << 30;
  // With the GPU encoder: groups whose LDLQ may run at once (each holds its host working memory, ~6 GB for 64
  // experts, and its device arrays, 4.3 GB, until its files are written); the files do not depend on it. 3: a MoE
  // layer's three 64-expert groups at once (one LDLQ alone ran at ~97 K tiles/s on the H200, two at ~123 K).
  int gpu_groups_in_flight = 3;
  // Bytes of later groups rotated ahead of the main thread, on a thread of their own (rotate_linears: signs, Hadamards,
  // the scale search), 8 B per padded weight; 0 rotates each group when its turn comes. Unset: 6 GiB with the GPU
  // encoder, 0 on the CPU (there both would only share the same cores). The files do not depend on it.
  std::optional<uint64_t> ahead_bytes;
  // Recorded with every finished Linear and compared on resume, next to K / codebook / seed / shape / source
  // fingerprint: whatever else decides the codes (calibration data, encoder settings). Keys must not clash
  // with those ("key", "K", "codebook", "in", "out", "seed", "source_fnv1a").
  std::map<std::string, std::string> extra_metadata;
};

// Quantizes `in_dir` (a directory readable by TensorStore, with config.json) into opt.out_dir. `qcfg.bits` is
// filled in with the real average K of the plan (128-padded numel-weighted) when left at 0. Errors name the
// tensor or file; on error the partial directory stays for a resume.
void quantize_checkpoint(const std::string& in_dir, const std::vector<QuantizePlanEntry>& plan, Exl3QuantConfig qcfg,
                         const CheckpointQuantizeOptions& opt);

}  // namespace trellm::trellis
