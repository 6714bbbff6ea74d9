// BufferPool: 4 KiB-aligned buffers of one size (a chunk) for copy-before-
// write, kept for reuse up to a maximum count (free_diff_buffer_pool_size).
// Safe for concurrent use.
#pragma once

#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace nbdsnap {

class BufferPool {
 public:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  using Buffer = std::unique_ptr<char, Free>;

  BufferPool(size_t buffer_size, size_t keep) : size_(buffer_size), keep_(keep) {}
  Buffer get() {
    {
      std::lock_guard lk(mu_);
      if (!free_.empty()) {
        Buffer b = std::move(free_.back());
        free_.pop_back();
        return b;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, 4096, size_) != 0) throw std::bad_alloc();
    return Buffer(static_cast<char*>(p));
  }
  void put(Buffer b) {
    std::lock_guard lk(mu_);
    if (free_.size() < keep_) free_.push_back(std::move(b));
  }
  size_t buffer_size() const { return size_; }

 private:
  const size_t size_;
  const size_t keep_;
  std::mutex mu_;
  std::vector<Buffer> free_;
};

}  // namespace nbdsnap
