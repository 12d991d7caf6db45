// libFuzzer target: model.safetensors.index.json (the shard map) through TensorStore::open on a directory that
// holds two small valid shards. An accepted index must map every name to a tensor of the shard it names.
#include <filesystem>

#include "format/safetensors.h"
#include "fuzz_util.h"

using namespace trellm;

namespace {
[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_safetensors_index: %s\n", what.c_str());
  std::abort();
}

const std::string& model_dir() {
  static const std::string dir = [] {
    std::string d = fuzz::scratch_dir() + "/model";
    std::filesystem::create_directories(d);
    static const float x[6] = {1, 2, 3, 4, 5, 6};
    static const uint16_t y[4] = {1, 2, 3, 4};
    static const int32_t z[1] = {7};
    write_safetensors(d + "/model-00001-of-00002.safetensors",
                      {{"model.embed_tokens.weight", DType::F32, {2, 3}, x, sizeof x},
                       {"model.norm.weight", DType::BF16, {4}, y, sizeof y}});
    write_safetensors(d + "/model-00002-of-00002.safetensors", {{"lm_head.weight", DType::I32, {1}, z, sizeof z}});
    return d;
  }();
  return dir;
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)model_dir();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = model_dir();
  fuzz::write_bytes(dir + "/model.safetensors.index.json", data, size);
  std::optional<TensorStore> s;
  if (!fuzz::accepts([&] { s.emplace(TensorStore::open(dir)); })) return 0;
  size_t total = 0;
  for (const std::string& n : s->names()) {
    const TensorInfo& t = s->get(n);
    if (t.name != n || !t.file) finding("get(\"" + n + "\") returned another tensor");
    total += t.nbytes;
  }
  if (total != s->total_bytes()) finding("total_bytes disagrees with the tensors");
  return 0;
}
