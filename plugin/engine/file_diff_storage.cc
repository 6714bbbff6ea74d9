// FileDiffStorage: difference storage in ranges of files or block devices.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "diff_storage.h"
#include "file_io.h"

namespace nbdsnap {
namespace {

class FileDiffStorage final : public DiffStorage {
 public:
  ~FileDiffStorage() override {
    for (int fd : fds_) ::close(fd);
    for (int fd : direct_fds_)
      if (fd >= 0) ::close(fd);
  }

  Status append(const StorageRange& r) override {
    std::string ctx = "append-storage " + r.path;
    if (r.offset % kStorageUnit || r.length % kStorageUnit || r.length == 0)
      return Status::error(EINVAL, ctx + ": offset and length must be multiples of 4096 (length > 0)");
    std::lock_guard lk(mu_);
    int fd = -1;
    for (size_t i = 0; i < paths_.size(); ++i)
      if (paths_[i] == r.path) fd = fds_[i];
    bool opened = false;
    int direct_fd = -1;
    for (size_t i = 0; i < paths_.size(); ++i)
      if (paths_[i] == r.path) direct_fd = direct_fds_[i];
    if (fd < 0) {
      fd = ::open(r.path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0) return Status::from_errno(ctx + ": open");
      // Slot writes bypass the page cache: the old data is written once and
      // read rarely, and filling fresh cache pages was the cost of first-touch
      // copies. Reads stay buffered. No O_DIRECT support: buffered writes.
      direct_fd = ::open(r.path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
      opened = true;
    }
    auto size = file_size(fd);
    if (!size || r.offset > *size || r.length > *size - r.offset) {
      if (opened) ::close(fd);
      if (opened && direct_fd >= 0) ::close(direct_fd);
      if (!size) return size.status().with_context(ctx);
      return Status::error(EINVAL, ctx + ": range " + std::to_string(r.offset) + ":" +
                                       std::to_string(r.length) + " beyond its end (size " +
                                       std::to_string(*size) + ")");
    }
    // Preallocate regular files: copy-before-write then never waits for the
    // file system to allocate blocks (a sparse file made first touch about 4x
    // slower here), and a full file system fails now, with a clear error,
    // rather than corrupting the snapshot at its first copy.
    struct stat st;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        ::fallocate(fd, 0, static_cast<off_t>(r.offset), static_cast<off_t>(r.length)) != 0 &&
        errno != EOPNOTSUPP) {
      Status err = Status::from_errno(ctx + ": preallocate");
      if (opened) ::close(fd);
      if (opened && direct_fd >= 0) ::close(direct_fd);
      return err;
    }
    auto idx = alloc_.add(r.length, [&](size_t i) {
      range_fd_[i] = fd;
      range_direct_fd_[i] = direct_fd;
      range_offset_[i] = r.offset;
    });
    if (!idx) {
      if (opened) ::close(fd);
      if (opened && direct_fd >= 0) ::close(direct_fd);
      return idx.status();
    }
    if (opened) {
      paths_.push_back(r.path);
      fds_.push_back(fd);
      direct_fds_.push_back(direct_fd);
    }
    ranges_.push_back(r);
    return Status::ok();
  }

  Status zero_fill(const StorageRange& r) override {
    return zero_fill_regular_file(r.path, r.offset, r.length).with_context("append-storage " + r.path);
  }

  Result<SlotAddress> allocate(uint64_t length) override { return alloc_.allocate(length); }

  Status write(SlotAddress slot, const void* buf, uint64_t length) override {
    SlotAllocator::Located at;
    if (!alloc_.locate(slot, 0, length, &at))
      return Status::error(EINVAL, "write slot: address outside storage");
    uint64_t offset = range_offset_[at.range] + at.range_offset;
    int direct = range_direct_fd_[at.range];
    bool aligned = direct >= 0 && length % kStorageUnit == 0 && offset % kStorageUnit == 0 &&
                   reinterpret_cast<uintptr_t>(buf) % kStorageUnit == 0;
    return pwrite_all(aligned ? direct : range_fd_[at.range], buf, length, offset, "write slot");
  }

  Status read(SlotAddress slot, uint64_t offset, void* buf, uint64_t length) override {
    SlotAllocator::Located at;
    if (!alloc_.locate(slot, offset, length, &at))
      return Status::error(EINVAL, "read slot: address outside storage");
    return pread_all(range_fd_[at.range], buf, length, range_offset_[at.range] + at.range_offset,
                     "read slot");
  }

  Status flush() override {
    std::vector<int> fds;
    {
      std::lock_guard lk(mu_);
      fds = fds_;
    }
    for (int fd : fds)
      if (::fdatasync(fd) != 0) return Status::from_errno("flush difference storage");
    return Status::ok();
  }

  StorageUsage usage() const override { return alloc_.usage(); }
  std::vector<StorageRange> ranges() const override {
    std::lock_guard lk(mu_);
    return ranges_;
  }
  void restore_allocation(uint64_t end, uint64_t used) override { alloc_.restore(end, used); }

 private:
  SlotAllocator alloc_;
  // Indexed by range; written before the range is published by alloc_.add.
  std::array<int, SlotAllocator::kMaxRanges> range_fd_{};
  std::array<uint64_t, SlotAllocator::kMaxRanges> range_offset_{};
  std::array<int, SlotAllocator::kMaxRanges> range_direct_fd_{};  // -1: none
  mutable std::mutex mu_;
  std::vector<std::string> paths_;  // guarded by mu_
  std::vector<int> fds_;            // guarded by mu_
  std::vector<int> direct_fds_;     // guarded by mu_; O_DIRECT twins of fds_ (-1: none)
  std::vector<StorageRange> ranges_;
};

}  // namespace

std::unique_ptr<DiffStorage> make_file_storage() { return std::make_unique<FileDiffStorage>(); }

}  // namespace nbdsnap
