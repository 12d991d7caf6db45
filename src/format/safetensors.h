// Safetensors reading (mmap, strict header validation, sharded checkpoints) and writing.
//
// File layout: u64 little-endian header length N, N bytes of JSON header, then the data buffer.
// Header: {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}
// with offsets relative to the data buffer. Every violation is an Error naming the file and the tensor.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace trellm {

// Headers larger than this are rejected before parsing (real checkpoints: < 2 MB; the safetensors
// reference implementation caps at 100 MB).
constexpr uint64_t kMaxSafetensorsHeader = 100ull << 20;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // inside the mapping
  size_t nbytes = 0;
  const std::string* file = nullptr;  // path of the file that holds it

  int64_t numel() const;
  // A view of the mapped data (read-only in practice; TensorView has no const flavour).
  TensorView view() const;
};

// One mapped .safetensors file.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  void parse_header();

  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint: a directory with model.safetensors.index.json (shards), a directory with
// model.safetensors, or a single .safetensors file.
class TensorStore {
 public:
  static TensorStore open(const std::string& path);
  // `base` with the tensors of `files` (safetensors paths) over it and the names in `hidden` left out: a
  // checkpoint seen with some Linears replaced by their EXL3 tensors (the quantizer's finished layers). A name in
  // two of `files` is an error. `base` must outlive the overlay.
  static TensorStore overlay(const TensorStore& base, const std::vector<std::string>& files,
                             const std::vector<std::string>& hidden);

  const TensorInfo* find(const std::string& name) const;
  // Like find, but a missing tensor is an Error naming it and the checkpoint.
  const TensorInfo& get(const std::string& name) const;
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  std::vector<std::string> names() const;  // sorted
  const std::string& path() const { return path_; }
  size_t total_bytes() const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, const TensorInfo*> by_name_;
};

// Writing. Tensors are written in the given order, 8-byte aligned header (as the reference writer does).
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t nbytes;
};
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace trellm
