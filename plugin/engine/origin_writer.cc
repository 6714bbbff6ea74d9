#include "origin_writer.h"

#include <atomic>

#include "file_io.h"

namespace nbdsnap {

struct OriginWriter::Request {
  const void* buf;
  uint64_t length;
  uint64_t offset;
  Status result;
  std::atomic<bool> done{false};
};

OriginWriter::OriginWriter(int fd, const char* op) : fd_(fd), op_(op) {}

OriginWriter::~OriginWriter() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

Status OriginWriter::write(const void* buf, uint64_t length, uint64_t offset) {
  Request r{buf, length, offset, Status::ok()};
  bool was_idle;
  {
    std::lock_guard lk(mu_);
    // Started by the first write, not by the constructor: volumes open
    // before nbdkit's daemonizing fork, which would drop the thread.
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
    was_idle = queue_.empty();
    queue_.push_back(&r);
  }
  // A non-empty queue means the thread is awake or already notified.
  if (was_idle) wake_.notify_one();
  r.done.wait(false, std::memory_order_acquire);
  return std::move(r.result);
}

void OriginWriter::run() {
  std::vector<Request*> batch;
  std::unique_lock lk(mu_);
  for (;;) {
    wake_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    batch.swap(queue_);
    ++batches_;
    writes_ += batch.size();
    lk.unlock();
    for (Request* r : batch) {
      r->result = pwrite_all(fd_, r->buf, r->length, r->offset, op_);
      // After this store the caller may return and free *r: touch it no more
      // except through the atomic's own notify.
      r->done.store(true, std::memory_order_release);
      r->done.notify_one();
    }
    batch.clear();
    lk.lock();
  }
}

uint64_t OriginWriter::writes() const {
  std::lock_guard lk(mu_);
  return writes_;
}

uint64_t OriginWriter::batches() const {
  std::lock_guard lk(mu_);
  return batches_;
}

}  // namespace nbdsnap
