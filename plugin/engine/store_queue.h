// StoreQueue: the copies of one volume on their way to difference storage
// (blksnap's store queue; chunk_maximum_in_queue of them at once).
//
// Owns the staging area: `entries` chunk-sized, 4 KiB-aligned buffers. With a
// path they are a file mapped MAP_SHARED (bytes put there are in the page
// cache at once, so a copy staged before an origin write survives a crash of
// the process and can be stored at restart); without one, anonymous memory.
// Also owns the storer threads that run submitted jobs, taken in submission
// order, several at once; they start with the first job (a volume opens
// before nbdkit's daemonizing fork, which keeps no thread).
//
// An entry is reserved before a copy is read into it and given back by the
// job that stores it (or by the caller if no job is submitted). Reservations
// are all or nothing and first come, first served, so callers that wait never
// hold entries while they wait for more. Safe for concurrent use.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "status.h"

namespace nbdsnap {

class StoreQueue {
 public:
  // Opens (creating, never truncating: it may hold staged copies from before
  // a crash) the staging file at `path`, or maps anonymous memory if empty.
  static Result<std::unique_ptr<StoreQueue>> open(const std::string& path, uint32_t entries,
                                                  uint64_t entry_size, unsigned threads);
  ~StoreQueue();  // runs every submitted job, then stops the threads
  StoreQueue(const StoreQueue&) = delete;
  StoreQueue& operator=(const StoreQueue&) = delete;

  uint32_t entries() const { return entries_; }
  uint64_t entry_size() const { return entry_size_; }
  char* entry(uint32_t e) { return base_ + e * entry_size_; }

  // Takes n free entries (n <= entries()) into *out, only if no caller waits
  // for entries and n are free. Never blocks.
  bool try_reserve(size_t n, std::vector<uint32_t>* out);
  // Waits its turn, then takes n entries (n <= entries()).
  void reserve(size_t n, std::vector<uint32_t>* out);
  void release(uint32_t e);

  // Runs job on a storer thread.
  void submit(std::function<void()> job);
  // Returns once every job submitted before the call has run.
  void drain();

  // A staging file that was missing or shorter than the area when opened
  // is replaced by a new one under PATH.new, renamed into place here (call
  // once the restart is durably recorded: until then a crash must find the
  // old file, or none). No-op otherwise.
  Status commit();
  // Restart: staged bytes of entry e as the file held them when opened. EIO
  // if the file was shorter then (missing, truncated).
  Status read_file_entry(uint32_t e, void* buf, uint64_t length) const;

  // Tests: while held, storer threads start no job.
  void hold_for_test(bool held);

 private:
  StoreQueue(uint32_t entries, uint64_t entry_size);
  void run();

  const uint32_t entries_;
  const uint64_t entry_size_;
  int fd_ = -1;       // mapped
  int read_fd_ = -1;  // the file found at open (may be fd_), for restart reads
  std::string path_;
  std::string new_path_;  // PATH.new until commit()
  uint64_t found_bytes_ = 0;  // size of the staging file when opened
  char* base_ = nullptr;

  // A caller of reserve() waiting for entries; woken alone when granted.
  struct Waiter {
    Waiter(size_t count, std::vector<uint32_t>* to) : n(count), out(to) {}
    size_t n;
    std::vector<uint32_t>* out;
    bool granted = false;
    std::condition_variable cv;
  };
  void grant();  // requires mu_: serves waiters in order while entries suffice
  void take(size_t n, std::vector<uint32_t>* out);  // requires mu_ and n free

  std::mutex mu_;
  std::deque<Waiter*> waiters_;    // guarded by mu_, first come first served
  std::condition_variable work_;   // a job was submitted, held, or stopping
  std::condition_variable done_;   // a job finished
  std::vector<uint32_t> free_;     // guarded by mu_
  uint64_t next_job_ = 0;          // guarded by mu_
  std::deque<std::pair<uint64_t, std::function<void()>>> jobs_;  // guarded by mu_
  std::set<uint64_t> unfinished_;  // guarded by mu_: queued or running jobs
  bool held_ = false;              // guarded by mu_
  bool stopping_ = false;          // guarded by mu_
  unsigned thread_count_ = 1;
  std::vector<std::thread> threads_;  // guarded by mu_ until joined
};

}  // namespace nbdsnap
