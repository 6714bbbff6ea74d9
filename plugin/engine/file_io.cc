#include "file_io.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace nbdsnap {

Status pread_all(int fd, void* buf, uint64_t length, uint64_t offset, const char* op) {
  auto* p = static_cast<char*>(buf);
  while (length > 0) {
    ssize_t n = ::pread(fd, p, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::from_errno(op);
    }
    if (n == 0) {  // past the end of a file: reads as zeros
      std::memset(p, 0, length);
      return Status::ok();
    }
    p += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::ok();
}

Status pwrite_all(int fd, const void* buf, uint64_t length, uint64_t offset, const char* op) {
  const auto* p = static_cast<const char*>(buf);
  while (length > 0) {
    ssize_t n = ::pwrite(fd, p, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::from_errno(op);
    }
    p += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::ok();
}

Result<uint64_t> file_size(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return Status::from_errno("fstat");
  if (S_ISBLK(st.st_mode)) {
    uint64_t size = 0;
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) return Status::from_errno("ioctl BLKGETSIZE64");
    return size;
  }
  if (!S_ISREG(st.st_mode)) return Status::error(EINVAL, "not a regular file or block device");
  return static_cast<uint64_t>(st.st_size);
}

Status zero_fill_regular_file(const std::string& path, uint64_t offset, uint64_t length) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno("zero-fill: open");
  struct Closer {
    int fd;
    ~Closer() {
      if (fd >= 0) ::close(fd);
    }
  } close_fd{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return Status::from_errno("zero-fill: fstat");
  if (!S_ISREG(st.st_mode)) return Status::ok();
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (offset > size || length > size - offset)
    return Status::error(EINVAL, "zero-fill: range " + std::to_string(offset) + ":" + std::to_string(length) +
                                     " beyond its end (size " + std::to_string(size) + ")");
  Closer close_direct{::open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC)};  // -1: buffered only
  constexpr uint64_t kBlock = 1 << 20;
  void* mem = nullptr;
  if (::posix_memalign(&mem, 4096, kBlock) != 0) return Status::error(ENOMEM, "zero-fill: buffer");
  std::unique_ptr<void, decltype(&std::free)> zeros(mem, &std::free);
  std::memset(mem, 0, kBlock);
  for (uint64_t done = 0; done < length;) {
    uint64_t n = std::min(kBlock, length - done);
    bool direct = close_direct.fd >= 0 && (offset + done) % 4096 == 0 && n % 4096 == 0;
    Status s = pwrite_all(direct ? close_direct.fd : fd, mem, n, offset + done, "zero-fill: write");
    if (!s) return s;
    done += n;
  }
  if (::fdatasync(fd) != 0) return Status::from_errno("zero-fill: fdatasync");
  return Status::ok();
}

bool is_zero(const void* buf, uint64_t length) {
  const auto* p = static_cast<const unsigned char*>(buf);
  // Check the first 16 bytes, then compare the buffer with itself shifted.
  uint64_t head = length < 16 ? length : 16;
  for (uint64_t i = 0; i < head; ++i)
    if (p[i]) return false;
  return length <= 16 || std::memcmp(p, p + 16, length - 16) == 0;
}

Status write_file_atomic(const std::string& path, const std::string& data, const char* temp_suffix, unsigned mode) {
  std::string tmp = path + temp_suffix;
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, static_cast<mode_t>(mode));
  if (fd < 0) return Status::from_errno("write " + tmp + ": open");
  Status st = pwrite_all(fd, data.data(), data.size(), 0, "write");
  if (st && ::fsync(fd) != 0) st = Status::from_errno("fsync");
  ::close(fd);
  if (st && ::rename(tmp.c_str(), path.c_str()) != 0) st = Status::from_errno("rename to " + path);
  if (!st) {
    ::unlink(tmp.c_str());
    return st.with_context("write " + tmp);
  }
  std::string dir = path.substr(0, path.find_last_of('/') + 1);
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::ok();
}

Result<std::string> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno("read " + path);
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status st = Status::from_errno("read " + path);
      ::close(fd);
      return st;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

std::string boot_id() {
  auto r = read_file("/proc/sys/kernel/random/boot_id");
  if (!r) return "";
  std::string s = *r;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace nbdsnap
