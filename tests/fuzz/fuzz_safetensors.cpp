// libFuzzer target: a .safetensors file (8-byte header length, JSON header, data buffer) through SafetensorsFile and
// TensorStore. An accepted file must describe tensors that lie inside the mapping (every byte of each is read) and
// must survive a write_safetensors round trip unchanged.
#include <cstring>

#include "format/safetensors.h"
#include "fuzz_util.h"

using namespace trellm;

namespace {
[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what.c_str());
  std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::scratch_dir() + "/model.safetensors";
  const std::string copy = fuzz::scratch_dir() + "/copy.safetensors";
  fuzz::write_bytes(path, data, size);
  std::unique_ptr<SafetensorsFile> f;
  if (!fuzz::accepts([&] { f = SafetensorsFile::open(path); })) return 0;

  const auto* lo = static_cast<const uint8_t*>(nullptr);
  uint64_t sum = 0;
  std::vector<TensorToWrite> out;
  for (const TensorInfo& t : f->tensors()) {
    if (f->find(t.name) != &t) finding("find(\"" + t.name + "\") does not return its tensor");
    const auto* p = static_cast<const uint8_t*>(t.data);
    for (size_t i = 0; i < t.nbytes; i++) sum += p[i];  // ASan: every byte inside the mapping
    if (t.numel() * int64_t(dtype_size(t.dtype)) != int64_t(t.nbytes)) finding("nbytes disagrees with the shape: " + t.name);
    if (t.shape.size() <= size_t(kMaxDims)) (void)t.view();
    out.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
  }
  (void)lo;
  (void)sum;
  // Round trip: what we accept, we can write, and reading that back gives the same tensors.
  write_safetensors(copy, out, f->metadata());
  auto g = SafetensorsFile::open(copy);
  if (g->tensors().size() != f->tensors().size() || g->metadata() != f->metadata()) finding("round trip changed the file");
  for (const TensorInfo& t : f->tensors()) {
    const TensorInfo* u = g->find(t.name);
    if (!u || u->dtype != t.dtype || u->shape != t.shape || u->nbytes != t.nbytes ||
        (t.nbytes && std::memcmp(u->data, t.data, t.nbytes) != 0))
      finding("round trip changed tensor \"" + t.name + "\"");
  }
  // The single-file TensorStore path.
  TensorStore s = TensorStore::open(path);
  if (s.names().size() != f->tensors().size()) finding("TensorStore lists other tensors than the file");
  return 0;
}
