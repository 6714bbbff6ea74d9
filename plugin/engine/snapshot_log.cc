#include "snapshot_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "crc32c.h"
#include "file_io.h"

namespace nbdsnap {
namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'S', 'L', 'O', 'G', '1'};
constexpr uint64_t kHeaderBytes = 64;

struct Wire {
  uint32_t type, key, value, length, entry, crc;
};
static_assert(sizeof(Wire) == 24);

}  // namespace

SnapshotLog::~SnapshotLog() {
  if (fd_ >= 0) ::close(fd_);
}

Status SnapshotLog::create(const std::string& path) {
  path_ = path;
  if (path.empty()) return Status::ok();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd_ < 0) return Status::from_errno("snapshot log " + path + ": create");
  char header[kHeaderBytes] = {};
  std::memcpy(header, kMagic, sizeof kMagic);
  uint32_t version = 1;
  std::memcpy(header + 8, &version, 4);
  uint32_t crc = crc32c(header, 12);
  std::memcpy(header + 12, &crc, 4);
  end_ = kHeaderBytes;
  return pwrite_all(fd_, header, sizeof header, 0, "write snapshot log header").with_context(path);
}

Status SnapshotLog::replay(const std::string& path, const std::function<void(const LogRecord&)>& fn) {
  path_ = path;
  fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd_ < 0) return Status::from_errno("snapshot log " + path + ": open");
  auto size = file_size(fd_);
  if (!size) return size.status().with_context(path);
  char header[kHeaderBytes];
  if (*size < kHeaderBytes) return Status::error(EBADMSG, "snapshot log " + path + ": truncated header");
  Status st = pread_all(fd_, header, sizeof header, 0, "read snapshot log header");
  if (!st) return st.with_context(path);
  uint32_t version, crc;
  std::memcpy(&version, header + 8, 4);
  std::memcpy(&crc, header + 12, 4);
  if (std::memcmp(header, kMagic, 8) != 0 || version != 1 || crc32c(header, 12) != crc)
    return Status::error(EBADMSG, "snapshot log " + path + ": bad header");
  uint64_t records = (*size - kHeaderBytes) / sizeof(Wire);
  std::vector<Wire> buf(4096);
  for (uint64_t i = 0; i < records; i += buf.size()) {
    uint64_t n = std::min<uint64_t>(buf.size(), records - i);
    st = pread_all(fd_, buf.data(), n * sizeof(Wire), kHeaderBytes + i * sizeof(Wire), "read snapshot log");
    if (!st) return st.with_context(path);
    for (uint64_t j = 0; j < n; ++j) {
      const Wire& w = buf[j];
      if (w.type == 0 && w.crc == 0) continue;  // reserved, never written
      if (crc32c(&w, offsetof(Wire, crc)) != w.crc || w.type < 1 || w.type > 4)
        return Status::error(EBADMSG, "snapshot log " + path + ": damaged record " + std::to_string(i + j));
      fn(LogRecord{static_cast<LogType>(w.type), w.key, w.value, w.length, w.entry});
    }
  }
  end_ = kHeaderBytes + records * sizeof(Wire);
  return Status::ok();
}

Status SnapshotLog::append(const LogRecord& r) {
  if (fd_ < 0) return Status::ok();
  Wire w{static_cast<uint32_t>(r.type), r.key, r.value, r.length, r.entry, 0};
  w.crc = crc32c(&w, offsetof(Wire, crc));
  uint64_t at = end_.fetch_add(sizeof w);
  return pwrite_all(fd_, &w, sizeof w, at, "append snapshot log");
}

Status SnapshotLog::sync() {
  if (fd_ >= 0 && ::fdatasync(fd_) != 0) return Status::from_errno("sync snapshot log " + path_);
  return Status::ok();
}

}  // namespace nbdsnap
