#include "diff_storage.h"

#include <algorithm>

namespace nbdsnap {

Result<size_t> SlotAllocator::reserve(uint64_t length) {
  size_t n = count_.load(std::memory_order_relaxed);
  if (n == kMaxRanges)
    return Status::error(EFBIG, "append-storage: too many ranges (at most 4096)");
  uint64_t units = length / kStorageUnit;
  if (end_units_ + units >= kZeroSlot)
    return Status::error(EFBIG, "append-storage: more than 16 TiB of storage in one snapshot");
  spans_[n] = Span{end_units_, units};
  end_units_ += units;
  return n;
}

Result<SlotAddress> SlotAllocator::allocate(uint64_t length) {
  uint64_t units = (length + kStorageUnit - 1) / kStorageUnit;
  std::lock_guard lk(mu_);
  size_t n = count_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) {
    const Span& s = spans_[i];
    if (cursor_ >= s.start + s.units) continue;
    uint64_t at = std::max(cursor_, s.start);
    if (at + units <= s.start + s.units) {
      used_ += (at - cursor_) * kStorageUnit + length;  // a skipped tail counts as used
      cursor_ = at + units;
      return static_cast<SlotAddress>(at);
    }
  }
  return Status::error(ENOSPC, "allocate slot: difference storage is full");
}

bool SlotAllocator::locate(SlotAddress slot, uint64_t offset, uint64_t length, Located* out) const {
  size_t n = count_.load(std::memory_order_acquire);
  // Ranges are in ascending order of start: binary search.
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (spans_[mid].start + spans_[mid].units <= slot) lo = mid + 1; else hi = mid;
  }
  if (lo == n) return false;
  const Span& s = spans_[lo];
  if (slot < s.start) return false;
  uint64_t byte = (slot - s.start) * kStorageUnit + offset;
  if (byte + length > s.units * kStorageUnit) return false;
  *out = Located{lo, byte};
  return true;
}

StorageUsage SlotAllocator::usage() const {
  std::lock_guard lk(mu_);
  return StorageUsage{end_units_ * kStorageUnit, used_};
}

void SlotAllocator::restore(uint64_t end, uint64_t used) {
  std::lock_guard lk(mu_);
  cursor_ = std::max(cursor_, end);
  used_ = std::max(used_, used);
}

namespace {

class MemoryDiffStorage final : public DiffStorage {
 public:
  Status append(const StorageRange& r) override {
    if (r.length == 0 || r.length % kStorageUnit)
      return Status::error(EINVAL, "append-storage: length must be a positive multiple of 4096");
    std::lock_guard lk(mu_);
    auto idx = alloc_.add(r.length, [&](size_t i) { buffers_[i].reset(new char[r.length]()); });
    if (!idx) return idx.status();
    ranges_.push_back(r);
    return Status::ok();
  }
  Result<SlotAddress> allocate(uint64_t length) override { return alloc_.allocate(length); }
  Status write(SlotAddress slot, const void* buf, uint64_t length) override {
    SlotAllocator::Located at;
    if (!alloc_.locate(slot, 0, length, &at))
      return Status::error(EINVAL, "write slot: address outside storage");
    std::copy_n(static_cast<const char*>(buf), length, buffers_[at.range].get() + at.range_offset);
    return Status::ok();
  }
  Status read(SlotAddress slot, uint64_t offset, void* buf, uint64_t length) override {
    SlotAllocator::Located at;
    if (!alloc_.locate(slot, offset, length, &at))
      return Status::error(EINVAL, "read slot: address outside storage");
    std::copy_n(buffers_[at.range].get() + at.range_offset, length, static_cast<char*>(buf));
    return Status::ok();
  }
  Status flush() override { return Status::ok(); }
  StorageUsage usage() const override { return alloc_.usage(); }
  std::vector<StorageRange> ranges() const override {
    std::lock_guard lk(mu_);
    return ranges_;
  }
  void restore_allocation(uint64_t end, uint64_t used) override { alloc_.restore(end, used); }

 private:
  SlotAllocator alloc_;
  std::array<std::unique_ptr<char[]>, SlotAllocator::kMaxRanges> buffers_;
  mutable std::mutex mu_;
  std::vector<StorageRange> ranges_;
};

class FaultyDiffStorage final : public DiffStorage {
 public:
  FaultyDiffStorage(std::unique_ptr<DiffStorage> inner, FaultPlan plan)
      : inner_(std::move(inner)), plan_(plan) {}
  Status append(const StorageRange& r) override { return inner_->append(r); }
  Status zero_fill(const StorageRange& r) override { return inner_->zero_fill(r); }
  Result<SlotAddress> allocate(uint64_t length) override {
    if (plan_.fail_allocate && should_fail())
      return Status::error(plan_.error, "allocate slot: injected fault");
    return inner_->allocate(length);
  }
  Status write(SlotAddress slot, const void* buf, uint64_t length) override {
    if (!plan_.fail_allocate && should_fail())
      return Status::from_errno("write slot (injected fault)", plan_.error);
    return inner_->write(slot, buf, length);
  }
  Status read(SlotAddress slot, uint64_t offset, void* buf, uint64_t length) override {
    if (plan_.fail_reads) return Status::from_errno("read slot (injected fault)", plan_.error);
    return inner_->read(slot, offset, buf, length);
  }
  Status flush() override { return inner_->flush(); }
  StorageUsage usage() const override { return inner_->usage(); }
  std::vector<StorageRange> ranges() const override { return inner_->ranges(); }
  void restore_allocation(uint64_t end, uint64_t used) override { inner_->restore_allocation(end, used); }

 private:
  bool should_fail() { return ops_.fetch_add(1) >= plan_.ok_writes; }
  std::unique_ptr<DiffStorage> inner_;
  FaultPlan plan_;
  std::atomic<uint64_t> ops_{0};
};

}  // namespace

std::unique_ptr<DiffStorage> make_memory_storage() { return std::make_unique<MemoryDiffStorage>(); }

std::unique_ptr<DiffStorage> make_faulty_storage(std::unique_ptr<DiffStorage> inner, FaultPlan plan) {
  return std::make_unique<FaultyDiffStorage>(std::move(inner), plan);
}

}  // namespace nbdsnap
