#include "format/safetensors.h"

#include "format/map_guard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <set>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "core/error.h"

namespace trellm {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// One JSON object (or array) being parsed: its key in the parent ("" at the top) and the keys seen so far.
struct JsonObjectScope {
  std::string name;
  std::unordered_set<std::string> keys;
};

// nlohmann::json keeps one of two equal keys silently, so a header or index naming a tensor twice would load
// whichever it kept. Parses [begin, end) and calls on_duplicate(open objects and arrays, key) for the first
// repeated key of any object (it must throw).
json parse_unique_keys(const char* begin, const char* end,
                       const std::function<void(const std::vector<JsonObjectScope>&, const std::string&)>& on_duplicate) {
  std::vector<JsonObjectScope> open;
  std::string last_key;
  json::parser_callback_t cb = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) {
      open.push_back({last_key, {}});
    } else if (event == json::parse_event_t::object_end || event == json::parse_event_t::array_end) {
      open.pop_back();
    } else if (event == json::parse_event_t::key) {
      last_key = parsed.get<std::string>();
      if (!open.back().keys.insert(last_key).second) on_duplicate(open, last_key);
    }
    return true;
  };
  return json::parse(begin, end, cb);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

TensorView TensorInfo::view() const {
  TensorView v;
  v.data = const_cast<void*>(data);
  v.dtype = dtype;
  TRELLM_ASSERT(shape.size() <= size_t(kMaxDims), "tensor ", name, " has ", shape.size(), " dims");
  v.ndim = int(shape.size());
  for (size_t i = 0; i < shape.size(); i++) v.shape[i] = shape[i];
  return v;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  f->size_ = size_t(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    fail(path, ": truncated safetensors file (", f->size_, " bytes; the 8-byte header length is missing)");
  }
  void* m = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  ::close(fd);
  if (m == MAP_FAILED) fail(path, ": mmap failed: ", std::strerror(e));
  f->map_ = m;
  guard_mapping(m, f->size_, path);
  f->parse_header();
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) {
    unguard_mapping(map_);
    munmap(map_, size_);
  }
}

void SafetensorsFile::parse_header() {
  const auto* bytes = static_cast<const uint8_t*>(map_);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | bytes[i];
  if (n > kMaxSafetensorsHeader)
    fail(path_, ": safetensors header length ", n, " exceeds the limit of ", kMaxSafetensorsHeader, " bytes");
  if (n > size_ - 8)
    fail(path_, ": truncated safetensors file: header claims ", n, " bytes but only ", size_ - 8, " follow");
  const char* hdr = reinterpret_cast<const char*>(bytes + 8);
  json j;
  try {
    j = parse_unique_keys(hdr, hdr + n, [&](const std::vector<JsonObjectScope>& open, const std::string& key) {
      if (open.size() == 1) fail(path_, ": the safetensors header names tensor \"", key, "\" twice (ambiguous)");
      if (open[1].name == "__metadata__") fail(path_, ": __metadata__ names \"", key, "\" twice (ambiguous)");
      fail(path_, ": tensor \"", open[1].name, "\": key \"", key, "\" appears twice (ambiguous)");
    });
  } catch (const json::parse_error& e) {
    fail(path_, ": invalid safetensors header JSON at byte ", e.byte, ": ", e.what());
  } catch (const json::exception& e) {  // out_of_range.406: a number too large for a double (e.g. 1e999)
    fail(path_, ": invalid safetensors header JSON: ", e.what());
  }
  if (!j.is_object()) fail(path_, ": safetensors header is not a JSON object");
  const uint64_t data_size = size_ - 8 - n;
  const uint8_t* data = bytes + 8 + n;

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(path_, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(path_, ": __metadata__ value for \"", m.key(), "\" is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& what) { fail(path_, ": tensor \"", name, "\": ", what); };
    if (!v.is_object()) bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) bad("missing or non-string \"dtype\"");
    if (!v.contains("shape") || !v["shape"].is_array()) bad("missing or non-array \"shape\"");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      bad("\"data_offsets\" must be an array of two integers");
    std::string dt = v["dtype"].get<std::string>();
    auto dtype = dtype_from_name(dt);
    if (!dtype) bad("unsupported dtype \"" + dt + "\" (supported: F32, F16, BF16, I64, I32, I16, I8, U8)");
    TensorInfo t;
    t.name = name;
    t.dtype = *dtype;
    t.file = &path_;
    if (v["shape"].size() > size_t(kMaxDims)) bad(str_cat("has ", v["shape"].size(), " dimensions; at most ", kMaxDims, " are supported"));
    uint64_t numel = 1;
    for (const json& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad("shape entries must be non-negative integers");
      uint64_t s = d.get<uint64_t>();
      if (s != 0 && numel > std::numeric_limits<uint64_t>::max() / 4 / s) bad("shape is too large");
      numel *= s;
      t.shape.push_back(int64_t(s));
    }
    for (const json& o : v["data_offsets"])
      if (!o.is_number_unsigned()) bad("data_offsets must be non-negative integers");
    uint64_t begin = v["data_offsets"][0].get<uint64_t>(), end = v["data_offsets"][1].get<uint64_t>();
    if (begin > end) bad(str_cat("data_offsets [", begin, ", ", end, "] are reversed"));
    if (end > data_size)
      bad(str_cat("data_offsets [", begin, ", ", end, "] lie outside the data buffer of ", data_size,
                  " bytes (truncated file?)"));
    uint64_t want = numel * dtype_size(t.dtype);
    if (end - begin != want)
      bad(str_cat("byte length ", end - begin, " does not match shape × dtype size = ", want));
    t.data = data + begin;
    t.nbytes = size_t(want);
    tensors_.push_back(std::move(t));
  }
  // Overlap check: sort by begin offset and compare neighbours.
  std::vector<const TensorInfo*> order;
  for (auto& t : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->data < b->data; });
  for (size_t i = 1; i < order.size(); i++) {
    const auto* a = order[i - 1];
    const auto* b = order[i];
    if (a->nbytes && b->nbytes && static_cast<const uint8_t*>(a->data) + a->nbytes > b->data)
      fail(path_, ": tensors \"", a->name, "\" and \"", b->name, "\" overlap in the data buffer");
  }
  for (size_t i = 0; i < tensors_.size(); i++) index_[tensors_[i].name] = i;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

TensorStore TensorStore::open(const std::string& path) {
  TensorStore s;
  s.path_ = path;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    fs::path dir(path);
    fs::path index = dir / "model.safetensors.index.json";
    if (fs::exists(index)) {
      std::ifstream in(index, std::ios::binary);
      if (!in) fail(index.string(), ": cannot open");
      const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      json j;
      try {
        j = parse_unique_keys(text.data(), text.data() + text.size(),
                              [&](const std::vector<JsonObjectScope>& open, const std::string& key) {
          if (open.size() == 2 && open[1].name == "weight_map")
            fail(index.string(), ": weight_map names tensor \"", key, "\" twice (ambiguous)");
          fail(index.string(), ": key \"", key, "\" appears twice in ",
               open.size() == 1 ? std::string("the top-level object") : "\"" + open.back().name + "\"");
        });
      } catch (const json::parse_error& e) {
        fail(index.string(), ": invalid JSON at byte ", e.byte, ": ", e.what());
      } catch (const json::exception& e) {  // out_of_range.406: a number too large for a double
        fail(index.string(), ": invalid JSON: ", e.what());
      }
      if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
        fail(index.string(), ": missing \"weight_map\" object");
      std::map<std::string, size_t> shard_idx;
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        if (!it.value().is_string()) fail(index.string(), ": weight_map[\"", it.key(), "\"] is not a string");
        std::string shard = it.value().get<std::string>();
        if (shard.find('/') != std::string::npos || shard.find("..") != std::string::npos)
          fail(index.string(), ": shard name \"", shard, "\" must be a plain file name");
        if (!shard_idx.count(shard)) {
          shard_idx[shard] = s.files_.size();
          s.files_.push_back(SafetensorsFile::open((dir / shard).string()));
        }
      }
      // Every listed tensor must be in its shard; no tensor may appear in two shards.
      for (auto& f : s.files_)
        for (auto& t : f->tensors()) {
          if (!s.by_name_.emplace(t.name, &t).second)
            fail(path, ": tensor \"", t.name, "\" appears in more than one shard (", *s.by_name_[t.name]->file,
                 " and ", f->path(), ")");
        }
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        auto* t = s.find(it.key());
        std::string shard_path = (dir / it.value().get<std::string>()).string();
        if (!t || *t->file != shard_path)
          fail(index.string(), ": tensor \"", it.key(), "\" is listed in ", it.value().get<std::string>(),
               " but that shard does not contain it");
      }
      return s;
    }
    fs::path single = dir / "model.safetensors";
    if (!fs::exists(single))
      fail(path, ": no model.safetensors.index.json or model.safetensors in this directory");
    s.files_.push_back(SafetensorsFile::open(single.string()));
  } else {
    s.files_.push_back(SafetensorsFile::open(path));
  }
  for (auto& t : s.files_[0]->tensors()) s.by_name_[t.name] = &t;
  return s;
}

const TensorInfo* TensorStore::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const TensorInfo& TensorStore::get(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail(path_, ": tensor \"", name, "\" is missing");
  return *t;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  for (auto& kv : by_name_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

TensorStore TensorStore::overlay(const TensorStore& base, const std::vector<std::string>& files,
                                 const std::vector<std::string>& hidden) {
  TensorStore s;
  s.path_ = base.path_;
  s.by_name_ = base.by_name_;
  for (const std::string& n : hidden) s.by_name_.erase(n);
  std::set<std::string> given;
  for (const std::string& f : files) {
    s.files_.push_back(SafetensorsFile::open(f));
    for (auto& t : s.files_.back()->tensors()) {
      if (!given.insert(t.name).second) fail(f, ": tensor \"", t.name, "\" is also in another file of the overlay");
      s.by_name_[t.name] = &t;
    }
  }
  return s;
}

size_t TensorStore::total_bytes() const {
  size_t n = 0;
  for (auto& kv : by_name_) n += kv.second->nbytes;
  return n;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t s : t.shape) numel *= uint64_t(s);
    TRELLM_ASSERT(numel * dtype_size(t.dtype) == t.nbytes, "tensor ", t.name, ": nbytes does not match shape");
    h[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {off, off + t.nbytes}}};
    off += t.nbytes;
  }
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');  // data buffer 8-byte aligned, like the reference writer
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(path, ": cannot open for writing: ", std::strerror(errno ? errno : EIO));
  uint64_t n = hs.size();
  char len[8];
  for (int i = 0; i < 8; i++) len[i] = char((n >> (8 * i)) & 0xff);
  out.write(len, 8);
  out.write(hs.data(), std::streamsize(hs.size()));
  for (auto& t : tensors) out.write(static_cast<const char*>(t.data), std::streamsize(t.nbytes));
  out.close();
  if (!out) fail(path, ": write failed: ", std::strerror(errno ? errno : EIO), " (disk full?)");
}

}  // namespace trellm
