// libFuzzer target: the EXL3 tensor reader (quant/trellis_weight: TrellisReader over a TensorStore, the checkpoint
// format exllamav3 writes and quant/exl3_checkpoint produces). Input: a .safetensors file. Every module with a
// `.trellis` tensor is read with the Linear dims taken from __metadata__ ("KEY.in" / "KEY.out", decimal) when present,
// else from the trellis shape; an accepted descriptor is then used: y = x·W through the CPU reference (which reads
// every code, suh, svh and the bias) when small, else one decoded tile and the last element of each factor.
#include <charconv>

#include "format/safetensors.h"
#include "fuzz_util.h"
#include "quant/trellis_ref.h"
#include "quant/trellis_weight.h"

using namespace trellm;
using namespace trellm::trellis;

namespace {
int64_t meta_dim(const SafetensorsFile& f, const std::string& key, int64_t def) {
  auto it = f.metadata().find(key);
  if (it == f.metadata().end()) return def;
  int64_t v = 0;
  const char* b = it->second.data();
  auto [p, ec] = std::from_chars(b, b + it->second.size(), v);
  return ec == std::errc() ? v : def;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::scratch_dir() + "/model.safetensors";
  fuzz::write_bytes(path, data, size);
  std::optional<TensorStore> store;
  if (!fuzz::accepts([&] { store.emplace(TensorStore::open(path)); })) return 0;
  const SafetensorsFile& file = *store->files()[0];
  TrellisReader reader(*store);
  for (const std::string& name : store->names()) {
    static const std::string suffix = ".trellis";
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string key = name.substr(0, name.size() - suffix.size());
    if (!reader.contains(key)) std::abort();
    const TensorInfo& t = store->get(name);
    const int64_t in_def = t.shape.size() == 3 ? t.shape[0] * 16 : 128, out_def = t.shape.size() == 3 ? t.shape[1] * 16 : 128;
    const int64_t in = meta_dim(file, key + ".in", in_def), out = meta_dim(file, key + ".out", out_def);
    TrellisWeight w;
    if (!fuzz::accepts([&] { w = reader.read(key, in, out); })) continue;
    if (w.in_padded * w.out_padded <= 256 * 256) {
      std::vector<float> x(size_t(w.in), 1.0f), y(size_t(w.out));
      trellis_matmul_ref(w, x.data(), 1, y.data());
    } else {
      volatile uint16_t sink = w.tile(w.tiles_k() - 1, w.tiles_n() - 1)[16 * w.K - 1];
      sink = w.suh[w.in_padded - 1];
      sink = w.svh[w.out_padded - 1];
      (void)sink;
    }
  }
  return 0;
}
