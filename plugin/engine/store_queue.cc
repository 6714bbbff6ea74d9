#include "store_queue.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "file_io.h"

namespace nbdsnap {

StoreQueue::StoreQueue(uint32_t entries, uint64_t entry_size) : entries_(entries), entry_size_(entry_size) {
  free_.reserve(entries);
  for (uint32_t e = entries; e-- > 0;) free_.push_back(e);  // entry 0 handed out first
}

Result<std::unique_ptr<StoreQueue>> StoreQueue::open(const std::string& path, uint32_t entries,
                                                     uint64_t entry_size, unsigned threads) {
  std::unique_ptr<StoreQueue> q(new StoreQueue(entries, entry_size));
  const uint64_t bytes = uint64_t{entries} * entry_size;
  void* base = MAP_FAILED;
  if (path.empty()) {
    base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return Status::from_errno("staging area: map " + std::to_string(bytes) + " bytes");
  } else {
    std::string ctx = "staging file " + path;
    q->path_ = path;
    q->read_fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (q->read_fd_ < 0 && errno != ENOENT) return Status::from_errno(ctx + ": open");
    if (q->read_fd_ >= 0) {
      auto size = file_size(q->read_fd_);
      if (!size) return size.status().with_context(ctx);
      q->found_bytes_ = *size;
    }
    if (q->read_fd_ >= 0 && q->found_bytes_ >= bytes) {
      q->fd_ = q->read_fd_;
    } else {
      // Missing or short: a new file, put in its place by commit() once the
      // restart no longer needs the old one (until then a crash leaves the
      // old one, never a file of zeros taken for staged copies).
      q->new_path_ = path + ".new";
      q->fd_ = ::open(q->new_path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (q->fd_ < 0) return Status::from_errno(ctx + ".new: create");
      if (::ftruncate(q->fd_, static_cast<off_t>(bytes)) != 0)
        return Status::from_errno(ctx + ".new: extend to " + std::to_string(bytes) + " bytes");
    }
    base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, q->fd_, 0);
    if (base == MAP_FAILED) return Status::from_errno(ctx + ": map");
  }
  q->base_ = static_cast<char*>(base);
  q->thread_count_ = threads == 0 ? 1 : threads;
  return q;
}

StoreQueue::~StoreQueue() {
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
    held_ = false;
  }
  work_.notify_all();
  for (auto& t : threads_) t.join();  // no submit() can run now: threads_ is stable
  if (base_) ::munmap(base_, uint64_t{entries_} * entry_size_);
  if (read_fd_ >= 0 && read_fd_ != fd_) ::close(read_fd_);
  if (fd_ >= 0) ::close(fd_);
  // Never committed (a start that failed): it holds nothing anyone needs.
  if (!new_path_.empty()) ::unlink(new_path_.c_str());
}

void StoreQueue::take(size_t n, std::vector<uint32_t>* out) {
  for (size_t i = 0; i < n; ++i) {
    out->push_back(free_.back());
    free_.pop_back();
  }
}

bool StoreQueue::try_reserve(size_t n, std::vector<uint32_t>* out) {
  std::lock_guard lk(mu_);
  if (!waiters_.empty() || free_.size() < n) return false;
  take(n, out);
  return true;
}

void StoreQueue::reserve(size_t n, std::vector<uint32_t>* out) {
  std::unique_lock lk(mu_);
  if (waiters_.empty() && free_.size() >= n) {
    take(n, out);
    return;
  }
  Waiter w(n, out);
  waiters_.push_back(&w);
  w.cv.wait(lk, [&] { return w.granted; });
}

void StoreQueue::grant() {
  while (!waiters_.empty() && free_.size() >= waiters_.front()->n) {
    Waiter* w = waiters_.front();
    waiters_.pop_front();
    take(w->n, w->out);
    w->granted = true;
    w->cv.notify_one();  // under mu_: w lives until it sees granted
  }
}

void StoreQueue::release(uint32_t e) {
  std::lock_guard lk(mu_);
  free_.push_back(e);
  grant();
}

void StoreQueue::submit(std::function<void()> job) {
  {
    std::lock_guard lk(mu_);
    uint64_t id = next_job_++;
    unfinished_.insert(id);
    jobs_.emplace_back(id, std::move(job));
    // Started by the first job: volumes open before nbdkit's daemonizing
    // fork, which keeps no thread.
    if (threads_.empty())
      for (unsigned i = 0; i < thread_count_; ++i) threads_.emplace_back([this] { run(); });
  }
  work_.notify_one();
}

void StoreQueue::drain() {
  std::unique_lock lk(mu_);
  uint64_t last = next_job_;  // jobs below this were submitted before the call
  done_.wait(lk, [&] { return unfinished_.empty() || *unfinished_.begin() >= last; });
}

void StoreQueue::hold_for_test(bool held) {
  {
    std::lock_guard lk(mu_);
    held_ = held;
  }
  work_.notify_all();
}

void StoreQueue::run() {
  std::unique_lock lk(mu_);
  for (;;) {
    work_.wait(lk, [&] { return (!jobs_.empty() && !held_) || (stopping_ && jobs_.empty()); });
    if (jobs_.empty()) return;  // stopping, nothing left
    auto [id, job] = std::move(jobs_.front());
    jobs_.pop_front();
    lk.unlock();
    job();
    lk.lock();
    unfinished_.erase(id);
    done_.notify_all();
  }
}

Status StoreQueue::commit() {
  if (new_path_.empty()) return Status::ok();
  if (::rename(new_path_.c_str(), path_.c_str()) != 0)
    return Status::from_errno("staging file " + path_ + ": rename " + new_path_);
  new_path_.clear();
  if (read_fd_ >= 0 && read_fd_ != fd_) ::close(read_fd_);
  read_fd_ = fd_;
  found_bytes_ = uint64_t{entries_} * entry_size_;
  return Status::ok();
}

Status StoreQueue::read_file_entry(uint32_t e, void* buf, uint64_t length) const {
  if (path_.empty()) return Status::error(ENOENT, "staging area: no file");
  if (length > entry_size_) return Status::error(EINVAL, "staging file " + path_ + ": entry too short");
  // Only what the file held when it was opened (before it was extended) can
  // be a staged copy: a missing or truncated file is an error, never zeros.
  uint64_t at = uint64_t{e} * entry_size_;
  if (at + length > found_bytes_)
    return Status::error(EIO, "staging file " + path_ + ": entry " + std::to_string(e) +
                                  " is beyond the end the file had at start (" + std::to_string(found_bytes_) +
                                  " bytes)");
  Status st = pread_all(read_fd_, buf, length, at, "read staging file");
  return st ? st : st.with_context(path_);
}

}  // namespace nbdsnap
