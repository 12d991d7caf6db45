// A bump allocator over large backend allocations: a model's ~30,000 tensors become a few dozen cudaMalloc
// calls instead of one each (each costs tens of microseconds and fragments the heap). Freed all at once.
#pragma once
#include <algorithm>
#include <cstddef>
#include <vector>

#include "backend/backend.h"

namespace trellm {

class Arena {
 public:
  explicit Arena(Backend* backend = nullptr) : be_(backend) {}
  ~Arena() { release(); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  void set_backend(Backend* b) { be_ = b; }

  // `bytes` aligned to 256 (what cudaMalloc guarantees, enough for any vector load).
  void* alloc(size_t bytes) {
    bytes = (std::max<size_t>(bytes, 1) + 255) & ~size_t(255);
    used_ += bytes;
    if (bytes > left_) {
      // Big requests get their own allocation; small ones share 64 MiB chunks (the tail of a chunk is lost).
      const size_t chunk = std::max(bytes, kChunk);
      char* p = static_cast<char*>(be_->alloc(chunk));
      chunks_.push_back(p);
      if (bytes == chunk) return p;
      cur_ = p;
      left_ = chunk;
    }
    void* r = cur_;
    cur_ += bytes;
    left_ -= bytes;
    return r;
  }
  void release() {
    for (void* p : chunks_) be_->release(p);
    chunks_.clear();
    left_ = 0;
    used_ = 0;
  }
  size_t used() const { return used_; }

  // Undoing a failed group of allocations (a KV cache that did not fit): roll_back(m) frees every chunk allocated
  // since m = mark(); nothing allocated since may still be in use.
  struct Mark {
    size_t chunks, used, left;
    char* cur;
  };
  Mark mark() const { return {chunks_.size(), used_, left_, cur_}; }
  void roll_back(const Mark& m) {
    while (chunks_.size() > m.chunks) {
      be_->release(chunks_.back());
      chunks_.pop_back();
    }
    used_ = m.used, left_ = m.left, cur_ = m.cur;
  }  // bytes handed out (the chunks' lost tails not counted)

 private:
  static constexpr size_t kChunk = size_t(64) << 20;
  Backend* be_;
  std::vector<void*> chunks_;
  char* cur_ = nullptr;
  size_t left_ = 0;
  size_t used_ = 0;
};

}  // namespace trellm
