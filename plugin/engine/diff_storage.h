// DiffStorage: where copy-before-write puts old chunk data. An interface with
// three implementations: FileDiffStorage (ranges of files or block devices),
// MemoryDiffStorage (heap; tests) and FaultyDiffStorage (injects ENOSPC/EIO
// into another storage; tests).
//
// Storage is a sequence of appended ranges, seen as one linear space counted
// in 4 KiB units. A slot is one chunk-sized place in it, allocated
// sequentially and never split across two ranges; its address is the 4 KiB
// unit where it starts (so 16 TiB of storage per snapshot at most). Slots are
// written once and then only read. SlotAllocator holds the arithmetic shared
// by the implementations. All implementations are safe for concurrent use;
// append() may run while other threads read and write slots.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "status.h"

namespace nbdsnap {

using SlotAddress = uint32_t;
// Table value for a chunk that was all zeros when copied: no slot used.
constexpr SlotAddress kZeroSlot = 0xffffffffu;
constexpr uint64_t kStorageUnit = 4096;

struct StorageRange {
  std::string path;     // empty for memory storage
  uint64_t offset = 0;  // bytes, multiple of 4096
  uint64_t length = 0;  // bytes, multiple of 4096
};

struct StorageUsage {
  uint64_t capacity = 0;  // bytes appended
  uint64_t used = 0;      // bytes in allocated slots (plus skipped range tails)
};

class DiffStorage {
 public:
  virtual ~DiffStorage() = default;
  // Adds a range. FileDiffStorage opens range.path; MemoryDiffStorage ignores
  // it and allocates range.length bytes.
  virtual Status append(const StorageRange& range) = 0;
  // Writes zeros over a range about to be appended (diff_storage_zero_fill),
  // never over one re-appended at restart (it holds slots). FileDiffStorage:
  // regular files only, block devices are left as they are; others: no-op.
  virtual Status zero_fill(const StorageRange& range) {
    (void)range;
    return Status::ok();
  }
  // A slot of `length` bytes (at most one chunk). ENOSPC when full.
  virtual Result<SlotAddress> allocate(uint64_t length) = 0;
  virtual Status write(SlotAddress slot, const void* buf, uint64_t length) = 0;
  // Reads `length` bytes at byte `offset` inside the slot.
  virtual Status read(SlotAddress slot, uint64_t offset, void* buf, uint64_t length) = 0;
  // Makes written slots durable.
  virtual Status flush() = 0;
  virtual StorageUsage usage() const = 0;
  virtual std::vector<StorageRange> ranges() const = 0;
  // After a restart: slots below `end` (4 KiB units) are in use, `used` bytes.
  virtual void restore_allocation(uint64_t end, uint64_t used) = 0;
};

// Linear space over appended ranges: allocation and address -> range lookup.
// Lookup is lock-free (ranges are published with a release store of the
// count); append and allocate take a mutex.
class SlotAllocator {
 public:
  static constexpr size_t kMaxRanges = 4096;
  struct Located {
    size_t range;            // index of the range
    uint64_t range_offset;   // byte offset of the slot inside the range
  };

  // Registers a range of `length` bytes; returns its index. `prepare(index)`
  // runs before the range becomes visible to allocate() and locate().
  template <typename Prepare>
  Result<size_t> add(uint64_t length, Prepare&& prepare) {
    std::lock_guard lk(mu_);
    auto n = reserve(length);
    if (!n) return n;
    prepare(*n);
    count_.store(*n + 1, std::memory_order_release);
    return n;
  }
  Result<SlotAddress> allocate(uint64_t length);
  // Where slot + offset lives; false if the address is not inside a range.
  bool locate(SlotAddress slot, uint64_t offset, uint64_t length, Located* out) const;
  StorageUsage usage() const;
  void restore(uint64_t end, uint64_t used);

 private:
  Result<size_t> reserve(uint64_t length);  // requires mu_
  struct Span {
    uint64_t start;   // first unit
    uint64_t units;
  };
  std::array<Span, kMaxRanges> spans_{};
  std::atomic<size_t> count_{0};
  mutable std::mutex mu_;
  uint64_t end_units_ = 0;   // guarded by mu_: units of all ranges
  uint64_t cursor_ = 0;      // guarded by mu_: next free unit
  uint64_t used_ = 0;        // guarded by mu_: bytes
};

std::unique_ptr<DiffStorage> make_memory_storage();
std::unique_ptr<DiffStorage> make_file_storage();

// Fault injection: after `ok_writes` successful slot writes, every further
// write fails with `error` (ENOSPC, EIO...). With fail_allocate, allocate
// fails instead of write.
struct FaultPlan {
  uint64_t ok_writes = 0;
  int error = EIO;
  bool fail_allocate = false;
  bool fail_reads = false;
};
std::unique_ptr<DiffStorage> make_faulty_storage(std::unique_ptr<DiffStorage> inner, FaultPlan plan);

}  // namespace nbdsnap
