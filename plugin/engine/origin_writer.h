// OriginWriter: one thread that performs the buffered writes of one origin
// file, one after another, for any number of calling threads.
//
// Why: nbdkit runs each request on its own thread. Buffered writes to one
// ext4 file serialize on the inode lock, and the threads that wait for it
// spin on the owner (rwsem_spin_on_owner), taking CPU from the one that
// writes. With one writer the lock is never contended and the callers sleep
// until their write is done (the same shape as io_uring's one worker per
// file that QEMU gets). See docs/benchmarks.md, "4k random writes".
//
// Owns its thread, started by the first write (volumes open before nbdkit's
// daemonizing fork, which keeps no thread). Borrows the file descriptor (the caller keeps it open for
// the writer's lifetime). write() is safe for concurrent use and returns when
// the bytes are in the file (as pwrite would); requests are written in the
// order they arrive, several per wake-up. The destructor writes what is
// queued, then joins.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "status.h"

namespace nbdsnap {

class OriginWriter {
 public:
  // `op` names the writes in errors ("write origin").
  OriginWriter(int fd, const char* op);
  ~OriginWriter();
  OriginWriter(const OriginWriter&) = delete;
  OriginWriter& operator=(const OriginWriter&) = delete;

  // Writes all of buf at offset; blocks until written or failed.
  Status write(const void* buf, uint64_t length, uint64_t offset);

  // Writes done so far, and how many times the thread woke up for them
  // (batches); for tests and statistics.
  uint64_t writes() const;
  uint64_t batches() const;

 private:
  struct Request;
  void run();

  const int fd_;
  const char* const op_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::vector<Request*> queue_;  // guarded by mu_
  bool stop_ = false;            // guarded by mu_
  uint64_t writes_ = 0;          // guarded by mu_
  uint64_t batches_ = 0;         // guarded by mu_
  std::thread thread_;            // guarded by mu_ until joined
};

}  // namespace nbdsnap
