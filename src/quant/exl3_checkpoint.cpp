#include "quant/exl3_checkpoint.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "core/error.h"
#include "core/half.h"
#include "core/thread_pool.h"
#include "core/trace.h"
#include "core/work_ahead.h"
#include "format/json_file.h"
#include "format/safetensors.h"
#include "quant/exl3_export.h"

namespace trellm::trellis {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// 64-bit FNV-1a over the source weight bytes: a resumed run must not reuse codes made from other weights.
uint64_t fingerprint(const void* data, size_t n) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

std::vector<float> weight_f32(const TensorInfo& t) {
  std::vector<float> w(static_cast<size_t>(t.numel()));
  const TensorView v = t.view();
  for (size_t i = 0; i < w.size(); i++) {
    switch (t.dtype) {
      case DType::F32: w[i] = v.ptr<float>()[i]; break;
      case DType::F16: w[i] = f16_to_f32(v.ptr<uint16_t>()[i]); break;
      case DType::BF16: w[i] = bf16_to_f32(v.ptr<uint16_t>()[i]); break;
      default: fail(t.name, ": dtype ", dtype_name(t.dtype), " cannot be quantized (expected BF16, F16 or F32)");
    }
  }
  return w;
}

std::map<std::string, std::string> qtensor_meta(const QuantizePlanEntry& e, uint64_t seed, uint64_t fp,
                                                const std::map<std::string, std::string>& extra) {
  std::map<std::string, std::string> m = {
      {"key", e.key},          {"K", std::to_string(e.K)}, {"codebook", codebook_name(e.codebook)},
      {"in", std::to_string(e.in)}, {"out", std::to_string(e.out)}, {"seed", std::to_string(seed)},
      {"source_fnv1a", std::to_string(fp)}};
  for (const auto& [k, v] : extra)
    if (!m.emplace(k, v).second) fail("quantize: extra metadata key \"", k, "\" clashes with a built-in one");
  return m;
}

void write_json(const fs::path& path, const json& j) {
  errno = 0;
  std::ofstream f(path);
  if (!f) fail(path.string(), ": cannot open for writing: ", std::strerror(errno ? errno : EIO));
  f << j.dump(4) << "\n";
  f.close();
  if (!f) fail(path.string(), ": write failed: ", std::strerror(errno ? errno : EIO), " (disk full?)");
}

}  // namespace

void quantize_checkpoint(const std::string& in_dir, const std::vector<QuantizePlanEntry>& plan, Exl3QuantConfig qcfg,
                         const CheckpointQuantizeOptions& opt) {
  if (opt.out_dir.empty()) fail("quantize: no output directory");
  const fs::path out(opt.out_dir), src(in_dir);
  const fs::path partial = fs::path(opt.out_dir + ".partial"), qdir = partial / "qtensors";
  if (fs::exists(out) && !opt.replace_existing)
    fail(out.string(), ": already exists (trellm never writes into an existing model directory)");
  if (!fs::exists(src / "config.json")) fail(in_dir, ": no config.json");
  json config = read_json_file((src / "config.json").string());
  const TensorStore store = TensorStore::open(in_dir);

  // Validate the plan against the checkpoint before spending hours on it.
  std::set<std::string> planned;
  double numel = 0, bits = 0;
  int64_t weights_total = 0;
  for (const QuantizePlanEntry& e : plan) {
    if (!planned.insert(e.key).second) fail("quantize plan: ", e.key, " appears twice");
    const TensorInfo& t = store.get(e.key + ".weight");
    if (t.shape != std::vector<int64_t>{e.out, e.in})
      fail(in_dir, ": tensor \"", e.key, ".weight\" has shape ", shape_str(t.view()), ", the plan expects [", e.out,
           ", ", e.in, "]");
    if (e.K < kMinK || e.K > kMaxK) fail("quantize plan: ", e.key, ": K = ", e.K, " is outside 1..8");
    const double n = double(round_up_128(e.in) * round_up_128(e.out));
    numel += n;
    bits += n * e.K;
    weights_total += e.in * e.out;
  }
  if (qcfg.bits == 0 && numel > 0) qcfg.bits = bits / numel;
  fs::create_directories(qdir);

  // 1. Quantize every planned Linear into its own file (or reuse it from an interrupted run), in groups of one
  //    batch key, shape, K and codebook (see group_linears).
  QuantizeProgress prog;
  prog.total = int64_t(plan.size());
  prog.weights_total = weights_total;
  auto same_kind = [](const QuantizePlanEntry& a, const QuantizePlanEntry& b) {
    return a.in == b.in && a.out == b.out && a.K == b.K && a.codebook == b.codebook;
  };
  struct Member {
    size_t i = 0;
    std::map<std::string, std::string> meta;
    bool reuse = false;
    std::vector<float> h;  // its Hessian, until the group is prepared
  };
  // A prepared group whose codes are being computed: on the GPU by a worker thread while the main thread prepares the
  // next group on the CPU, on the CPU when its files are written (deferred: the two halves would only compete for the
  // same cores). On the GPU up to gpu_groups_in_flight groups encode at once, each on its own lane of the encoder
  // (ViterbiLane), beside the scale search of the groups being rotated ahead: one LDLQ alone leaves SMs idle in its
  // tracebacks and copies, and a queue of one group stalls the GPU whenever a group's CPU half is the longer.
  struct InFlight {
    std::vector<Member> members;
    PreparedLinearsPtr prepared;
    std::future<std::vector<EncodedLinear>> encoded;  // declared last: joined before `prepared` is freed
  };
  const bool overlap = opt.encode.device == EncodeDevice::Cuda;
  auto write_group = [&](InFlight& f) {
    std::vector<EncodedLinear> encoded = [&] {
      const trace::Span span("wait for the codes");
      return f.encoded.get();
    }();
    const trace::Span span("write files");
    size_t next = 0;
    for (Member& m : f.members) {
      const QuantizePlanEntry& e = plan[m.i];
      if (!m.reuse) {
        EncodedLinear& enc = encoded[next++];
        if (const TensorInfo* b = store.find(e.key + ".bias")) {
          if (b->shape != std::vector<int64_t>{e.out}) fail(in_dir, ": tensor \"", e.key, ".bias\" is not [", e.out, "]");
          const std::vector<float> bf = weight_f32(*b);
          enc.bias = padded_bias_f16(bf.data(), e.out, enc.out_padded);
        }
        const fs::path file = qdir / (e.key + ".safetensors"), tmp = qdir / (e.key + ".safetensors.tmp");
        write_safetensors(tmp.string(), exl3_tensors(e.key, enc), m.meta);
        fs::rename(tmp, file);  // a file under its final name is complete
        enc = EncodedLinear{};
      }
      prog.done++;
      prog.weights_done += e.in * e.out;
      prog.reused = m.reuse;
      prog.group = m.reuse ? 0 : int64_t(encoded.size());
      prog.key = &e.key;
      if (opt.on_progress) opt.on_progress(prog);
    }
  };

  // The groups, in the order their first entries have in the plan: an entry and the later untaken ones of its batch (a
  // consecutive run of the plan) of the same kind. Host bytes one member holds while its group is encoded: weight,
  // rotated weight, codes, reconstruction (and the encoder's temporaries) ~18 B per padded weight; Hessian, rotated
  // Hessian and factor ~12 B per in².
  std::vector<std::vector<size_t>> groups;
  {
    std::vector<bool> taken(plan.size(), false);
    for (size_t g0 = 0; g0 < plan.size(); g0++) {
      if (taken[g0]) continue;
      const QuantizePlanEntry& first = plan[g0];
      const uint64_t kp = uint64_t(round_up_128(first.in)), np = uint64_t(round_up_128(first.out));
      const uint64_t member_bytes = 18 * kp * np + 12 * kp * kp;
      std::vector<size_t> group = {g0};
      for (size_t j = g0 + 1; j < plan.size() && !first.batch.empty() && plan[j].batch == first.batch; j++)
        if (!taken[j] && same_kind(plan[j], first) && int64_t(group.size()) < std::max(1, opt.group_linears) &&
            uint64_t(group.size() + 1) * member_bytes <= opt.group_bytes)
          group.push_back(j);
      for (size_t i : group) taken[i] = true;
      groups.push_back(std::move(group));
    }
    // Within a batch (a layer), the largest groups first: their LDLQ starts as soon as the layer's Hessians are in,
    // side by side, and the small groups (attention projections, the shared expert, a remainder of experts) fill in
    // beside them. In plan order the five attention projections came first, one after another, and the last
    // 64-expert group of each layer ran alone at the end (quantize --trace); with 3 groups in flight, a MoE layer went
    // from 25.7 s to 24.2 s on the H200.
    auto work = [&](const std::vector<size_t>& g) { return uint64_t(g.size()) * plan[g[0]].in * plan[g[0]].out; };
    for (size_t a = 0; a < groups.size();) {
      const std::string& batch = plan[groups[a][0]].batch;
      size_t b = a + 1;
      while (b < groups.size() && !batch.empty() && plan[groups[b][0]].batch == batch) b++;
      std::stable_sort(groups.begin() + ptrdiff_t(a), groups.begin() + ptrdiff_t(b),
                       [&](const auto& x, const auto& y) { return work(x) > work(y); });
      a = b;
    }
  }

  // A group's name in the trace (--trace): its first Linear and how many more.
  auto group_name = [&](size_t gi) {
    const size_t more = groups[gi].size() - 1;
    return plan[groups[gi][0]].key + (more ? str_cat(" +", more) : std::string());
  };

  // What depends on the weights alone is done ahead, on a thread (and a thread pool) of its own: each group's members
  // (metadata, whether an earlier run's file is reusable), and for the others the rotations and the scale search
  // (rotate_linears). The main thread adds the Hessians, which the layer-by-layer calibration can only give once the
  // layers before are coded; the scale search of later groups meanwhile fills the SMs the LDLQ in flight leaves idle
  // (at the layer boundaries, the GPU would otherwise wait for the capture and the first groups' preparation).
  struct Rotated {
    std::vector<Member> members;
    PreparedLinearsPtr prepared;
  };
  const uint64_t ahead_budget = opt.ahead_bytes.value_or(overlap ? uint64_t(6) << 30 : 0);
  // Half as many threads as the global pool (--threads), beside it: the main thread's share is the critical path.
  ThreadPool ahead_pool(ahead_budget > 0 ? std::max(1, ThreadPool::global().size() / 2) : 1);
  auto rotate_group = [&](size_t gi) {
    std::optional<ThreadPoolScope> scope;  // the thread ahead uses its own workers, the main thread the global ones
    if (ahead_budget > 0) scope.emplace(ahead_pool), trace::name_thread("rotate ahead");
    const trace::Span span("rotate " + group_name(gi));
    Rotated r;
    std::vector<std::vector<float>> ws;
    std::vector<uint64_t> seeds;
    for (size_t i : groups[gi]) {
      const QuantizePlanEntry& e = plan[i];
      const TensorInfo& wt = store.get(e.key + ".weight");
      Member m;
      m.i = i;
      m.meta = qtensor_meta(e, opt.seed + i, fingerprint(wt.data, wt.nbytes), opt.extra_metadata);
      const fs::path file = qdir / (e.key + ".safetensors");
      if (fs::exists(file)) {
        try {
          m.reuse = SafetensorsFile::open(file.string())->metadata() == m.meta;
        } catch (const Error&) {
          m.reuse = false;  // unreadable leftovers are simply redone
        }
      }
      if (!m.reuse) {
        ws.push_back(weight_f32(wt));
        seeds.push_back(opt.seed + i);
      }
      r.members.push_back(std::move(m));
    }
    std::vector<const float*> wp;
    for (const auto& w : ws) wp.push_back(w.data());
    EncodeOptions eo = opt.encode;
    const QuantizePlanEntry& first = plan[groups[gi][0]];
    eo.K = first.K;
    eo.codebook = first.codebook;
    r.prepared = rotate_linears(wp, first.out, first.in, seeds, eo);
    return r;
  };
  // Rotated state per member: the weight and its rotation, 8 B per padded weight. Up to ~6 GiB of it ahead (three
  // 64-expert groups of GLM-4.7-Flash, 1.6 GB each, and the small groups between them), at least one group.
  auto rotated_bytes = [&](size_t gi) {
    const QuantizePlanEntry& e = plan[groups[gi][0]];
    return uint64_t(groups[gi].size()) * 8 * uint64_t(round_up_128(e.in)) * uint64_t(round_up_128(e.out));
  };
  WorkAhead<Rotated> ahead(groups.size(), ahead_budget, rotated_bytes, rotate_group);

  std::deque<InFlight> pending;  // oldest first: files are written in plan order
  const size_t depth = overlap ? size_t(std::max(1, opt.gpu_groups_in_flight)) : 1;
  auto drain = [&](size_t keep) {
    while (pending.size() > keep) {
      write_group(pending.front());
      pending.pop_front();
    }
  };
  std::optional<std::string> batch_seen;
  for (size_t gi = 0; gi < groups.size(); gi++) {
    const QuantizePlanEntry& first = plan[groups[gi][0]];
    if (opt.on_batch && batch_seen != first.batch) {
      drain(0);
      batch_seen = first.batch;
      opt.on_batch(first.batch, qdir.string());
    }
    Rotated r = [&] {
      const trace::Span span("wait for the rotations");
      return ahead.take(gi);
    }();
    InFlight f;
    f.members = std::move(r.members);
    std::vector<const float*> hs;
    {
      const trace::Span span("Hessians of " + group_name(gi));
      for (Member& m : f.members) {
        if (m.reuse) continue;
        const QuantizePlanEntry& e = plan[m.i];
        m.h = opt.hessian ? opt.hessian(e) : std::vector<float>{};
        if (!m.h.empty() && int64_t(m.h.size()) != e.in * e.in)
          fail("quantize: the Hessian for ", e.key, " has ", m.h.size(), " values, expected ", e.in * e.in);
        hs.push_back(m.h.empty() ? nullptr : m.h.data());
      }
    }
    add_hessians(*r.prepared, hs);
    for (Member& m : f.members) m.h = {};
    f.prepared = std::move(r.prepared);
    drain(depth - 1);
    PreparedLinears* p = f.prepared.get();
    f.encoded = std::async(overlap ? std::launch::async : std::launch::deferred,
                           [p, overlap, name = group_name(gi), row = str_cat("encode slot ", gi % depth + 1)] {
                             if (overlap) trace::name_thread(row);  // a thread of its own (else the main thread)
                             const trace::Span span("encode " + name);
                             return encode_prepared(*p);
                           });
    pending.push_back(std::move(f));
  }
  drain(0);
  const trace::Span span("write the model");

  // 2. Gather the output tensors in source order: a planned Linear's .weight/.bias become its EXL3 tensors.
  std::vector<std::unique_ptr<SafetensorsFile>> qfiles;
  std::map<std::string, const SafetensorsFile*> qfile_of;
  for (const QuantizePlanEntry& e : plan) {
    qfiles.push_back(SafetensorsFile::open((qdir / (e.key + ".safetensors")).string()));
    qfile_of[e.key] = qfiles.back().get();
  }
  std::vector<const TensorInfo*> tensors;
  std::set<std::string> emitted;
  for (const std::string& name : store.names()) {
    const size_t dot = name.rfind('.');
    const std::string owner = dot == std::string::npos ? "" : name.substr(0, dot);
    const std::string leaf = dot == std::string::npos ? name : name.substr(dot + 1);
    if (planned.count(owner) && (leaf == "weight" || leaf == "bias")) {
      if (emitted.insert(owner).second)
        for (const TensorInfo& t : qfile_of[owner]->tensors()) tensors.push_back(&t);
      continue;
    }
    tensors.push_back(store.find(name));
  }

  // 3. Shards (a new shard when the next tensor would overflow a non-empty one), index, configs, other files.
  std::vector<std::vector<const TensorInfo*>> shards(1);
  uint64_t cur = 0, total = 0;
  for (const TensorInfo* t : tensors) {
    if (cur + t->nbytes > opt.shard_bytes && cur > 0) shards.emplace_back(), cur = 0;
    shards.back().push_back(t);
    cur += t->nbytes;
    total += t->nbytes;
  }
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); s++) {
    char name[64];
    if (shards.size() == 1) std::snprintf(name, sizeof name, "model.safetensors");
    else std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    std::vector<TensorToWrite> w;
    for (const TensorInfo* t : shards[s]) {
      w.push_back({t->name, t->dtype, t->shape, t->data, t->nbytes});
      weight_map[t->name] = name;
    }
    write_safetensors((partial / name).string(), w, {{"format", "pt"}});
  }
  if (shards.size() > 1)
    write_json(partial / "model.safetensors.index.json", {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});

  apply_exl3_config(config, qcfg);
  write_json(partial / "config.json", config);
  json qc = config["quantization_config"];
  json storage = json::object();
  for (const QuantizePlanEntry& e : plan) {
    json stored = json::object();
    for (const TensorInfo& t : qfile_of[e.key]->tensors())
      stored[t.name] = {{"shape", t.shape}, {"n_bytes", t.nbytes}, {"dtype", std::string(dtype_name(t.dtype))}};
    json entry = {{"stored_tensors", stored}, {"quant_format", "exl3"}, {"bits_per_weight", e.K}};
    if (e.codebook == Codebook::Mcg) entry["mcg_multiplier"] = kMcgMul;
    if (e.codebook == Codebook::Mul1) entry["mul1_multiplier"] = kMul1Mul;
    storage[e.key] = entry;
  }
  qc["tensor_storage"] = storage;
  write_json(partial / "quantization_config.json", qc);

  for (const auto& f : fs::directory_iterator(src)) {
    if (!f.is_regular_file()) continue;
    const std::string n = f.path().filename().string(), ext = f.path().extension().string();
    if (ext == ".safetensors" || n == "model.safetensors.index.json" || n == "config.json") continue;
    if (ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".ckpt") continue;  // not model data we write
    fs::copy_file(f.path(), partial / n, fs::copy_options::overwrite_existing);
  }

  // 4. Done: drop the work files and make the directory appear under its final name in one step.
  qfiles.clear();
  fs::remove_all(qdir);
  if (opt.replace_existing && fs::exists(out)) fs::remove_all(out);
  fs::rename(partial, out);
}

}  // namespace trellm::trellis
