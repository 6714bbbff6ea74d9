#include "cbt_map.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "crc32c.h"
#include "file_io.h"

namespace nbdsnap {
namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'S', 'C', 'B', 'T', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kHeaderBytes = 4096;

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t header_crc;  // CRC-32C of the header with this field 0
  uint8_t generation[16];
  uint64_t capacity;
  uint32_t block_shift;
  uint32_t clean;  // 1 after a clean close, 0 while in use
  uint64_t block_count;
  char boot_id[40];
};
static_assert(sizeof(Header) <= kHeaderBytes);

uint32_t header_crc(Header h) {
  h.header_crc = 0;
  return crc32c(&h, sizeof h);
}

}  // namespace

CbtMap::~CbtMap() {
  if (mapping_) ::munmap(mapping_, mapping_bytes_);
  if (fd_ >= 0) ::close(fd_);
}

Status CbtMap::map_file(int fd, uint64_t bytes, bool create) {
  if (create && ::ftruncate(fd, static_cast<off_t>(bytes)) != 0)
    return Status::from_errno("cbt map " + path_ + ": ftruncate");
  void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   fd >= 0 ? MAP_SHARED : (MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE), fd, 0);
  if (m == MAP_FAILED) return Status::from_errno("cbt map " + path_ + ": mmap");
  mapping_ = m;
  mapping_bytes_ = bytes;
  stamps_ = reinterpret_cast<uint32_t*>(static_cast<char*>(m) + kHeaderBytes);
  return Status::ok();
}

void CbtMap::write_header(bool clean) {
  if (fd_ < 0) return;
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kVersion;
  std::memcpy(h.generation, generation_.bytes.data(), 16);
  h.capacity = capacity_;
  h.block_shift = block_shift_;
  h.clean = clean ? 1 : 0;
  h.block_count = block_count_;
  std::string boot = boot_id();
  std::strncpy(h.boot_id, boot.c_str(), sizeof h.boot_id - 1);
  h.header_crc = header_crc(h);
  std::memcpy(mapping_, &h, sizeof h);
}

Status CbtMap::open(const std::string& path, const Geometry& g, std::string* reset_reason) {
  path_ = path;
  capacity_ = g.size();
  block_shift_ = g.cbt_shift();
  block_count_ = g.cbt_block_count();
  uint64_t bytes = kHeaderBytes + ((block_count_ * 4 + 4095) & ~uint64_t{4095});
  reset_reason->clear();
  if (path.empty()) {
    generation_ = Uuid::random();
    *reset_reason = "new volume";
    return map_file(-1, bytes, false);
  }
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  bool fresh = fd < 0;
  std::string why;
  if (fresh) {
    if (errno != ENOENT) return Status::from_errno("cbt map " + path + ": open");
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return Status::from_errno("cbt map " + path + ": create");
    why = "no change-tracking history for this volume";
  } else {
    Header h{};
    Status st = pread_all(fd, &h, sizeof h, 0, "read cbt header");
    if (!st) {
      ::close(fd);
      return st.with_context(path);
    }
    auto size = file_size(fd);
    if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0 || h.version != kVersion ||
        header_crc(h) != h.header_crc)
      why = "change-tracking map header damaged or of an unknown version";
    else if (h.capacity != capacity_ || h.block_shift != block_shift_ || h.block_count != block_count_)
      why = "volume size or CBT block size changed";
    else if (!size || *size < bytes)
      why = "change-tracking map truncated";
    else if (!h.clean && std::string(h.boot_id, strnlen(h.boot_id, sizeof h.boot_id)) != boot_id())
      why = "unclean shutdown across a reboot: stamps may not have reached the disk";
    if (why.empty()) std::memcpy(generation_.bytes.data(), h.generation, 16);
    fresh = !why.empty();
    if (fresh && ::ftruncate(fd, 0) != 0) {  // drop the old stamps
      ::close(fd);
      return Status::from_errno("cbt map " + path + ": truncate");
    }
  }
  fd_ = fd;
  Status st = map_file(fd, bytes, true);
  if (!st) return st;
  if (fresh) {
    generation_ = Uuid::random();
    *reset_reason = why;
  }
  write_header(false);
  // The "in use" mark must be on disk before any stamp could be lost to a
  // power failure; otherwise a reboot could not tell the map was unclean.
  if (::msync(mapping_, kHeaderBytes, MS_SYNC) != 0 || ::fdatasync(fd_) != 0)
    return Status::from_errno("cbt map " + path + ": sync header");
  return Status::ok();
}

Status CbtMap::sync() {
  if (fd_ < 0 || !mapping_) return Status::ok();
  if (::msync(mapping_, mapping_bytes_, MS_SYNC) != 0) return Status::from_errno("cbt map " + path_ + ": msync");
  return Status::ok();
}

Status CbtMap::close() {
  if (fd_ < 0 || !mapping_) return Status::ok();
  Status st = sync();
  if (!st) return st;
  write_header(true);
  if (::msync(mapping_, kHeaderBytes, MS_SYNC) != 0) return Status::from_errno("cbt map " + path_ + ": msync");
  return Status::ok();
}

void CbtMap::reset() {
  generation_ = Uuid::random();
  std::memset(stamps_, 0, block_count_ * 4);
  write_header(false);
}

}  // namespace nbdsnap
