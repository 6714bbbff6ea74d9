// SnapshotLog: append-only record file of one snapshot on one volume. Each
// chunk copy, each saved CBT stamp and the corruption of the snapshot is
// written here before the origin write it protects, so that a restart after a
// crash (same boot) rebuilds the chunk table exactly.
//
// Records are 24 bytes with a CRC-32C; appends reserve their place with an
// atomic add and use pwrite, so concurrent appends need no lock. A record that
// was reserved but never written reads as zeros and is skipped on replay.
// Without a path the log keeps nothing (tests). Safe for concurrent append().
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "status.h"

namespace nbdsnap {

// kStaged: the chunk's old data is in staging entry `entry`, on its way to
// slot `value`; closed by a kChunk (stored) or kCorrupted record. One left
// open at restart is stored from the staging file then.
enum class LogType : uint32_t { kChunk = 1, kCbtStamp = 2, kCorrupted = 3, kStaged = 4 };

struct LogRecord {
  LogType type;
  uint32_t key;     // chunk index / CBT block index / 0
  uint32_t value;   // slot address / old stamp / errno
  uint32_t length;  // kChunk, kStaged: bytes stored in the slot
  uint32_t entry = 0;  // kStaged: staging entry
};

class SnapshotLog {
 public:
  SnapshotLog() = default;
  ~SnapshotLog();
  SnapshotLog(const SnapshotLog&) = delete;
  SnapshotLog& operator=(const SnapshotLog&) = delete;

  // Creates a new empty log (truncating any old one).
  Status create(const std::string& path);
  // Opens an existing log and calls fn for each valid record in order.
  // A damaged record (bad CRC) fails with EBADMSG.
  Status replay(const std::string& path, const std::function<void(const LogRecord&)>& fn);
  Status append(const LogRecord& r);
  Status sync();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  std::atomic<uint64_t> end_{0};
};

}  // namespace nbdsnap
