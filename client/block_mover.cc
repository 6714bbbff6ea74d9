#include "block_mover.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "crc32c.h"

namespace nbdsnap {
namespace {

using Clock = std::chrono::steady_clock;

// The largest NBD request sent (qemu-nbd refuses more than 32 MiB).
constexpr uint64_t kMaxRequest = 32 << 20;

// One request-sized piece of the work with its allocation.
struct Piece {
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<Extent> extents;  // cover [offset, offset + length)
};

bool all_zero(const char* p, size_t n) {
  // Word at a time; the buffers are 4 KiB aligned.
  const char* end = p + n;
  while (p + 64 <= end) {
    uint64_t a, b, c, d, e, f, g, h;
    std::memcpy(&a, p, 8), std::memcpy(&b, p + 8, 8), std::memcpy(&c, p + 16, 8), std::memcpy(&d, p + 24, 8);
    std::memcpy(&e, p + 32, 8), std::memcpy(&f, p + 40, 8), std::memcpy(&g, p + 48, 8), std::memcpy(&h, p + 56, 8);
    if ((a | b | c | d | e | f | g | h) != 0) return false;
    p += 64;
  }
  while (p < end)
    if (*p++ != 0) return false;
  return true;
}

struct AlignedFree {
  void operator()(char* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, AlignedFree>;

Buffer aligned_buffer(size_t n) {
  void* p = nullptr;
  if (::posix_memalign(&p, 4096, std::max<size_t>(n, 4096)) != 0) return nullptr;
  return Buffer(static_cast<char*>(p));
}

// Shared state of one run.
struct Shared {
  const MoveOptions* o;
  const std::vector<Piece>* pieces;
  std::vector<uint32_t>* crcs;
  uint32_t zero_block_crc;
  const char* zeros;  // zeros_size bytes of zeros
  uint64_t zeros_size;
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0}, read{0}, written{0}, zero{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  Status error;
  std::mutex file_mu;  // kFile: serializes pwrite

  void fail(Status st) {
    std::lock_guard lk(mu);
    if (error.is_ok()) error = std::move(st);
    failed = true;
  }
};

class Worker {
 public:
  Worker(Shared* sh, NbdConnection src, std::optional<NbdConnection> dst)
      : sh_(sh), o_(*sh->o), src_(std::move(src)), dst_(std::move(dst)) {}

  void run() {
    Status st = loop();
    if (!st) sh_->fail(st);
    // Close the handles before the buffers go (in-flight commands end there).
    if (dst_) {
      if (st) {
        if (Status f = dst_->flush(); !f) sh_->fail(f.with_context("write to " + o_.sink_endpoint.display()));
      }
      dst_->close();
    }
    src_.close();
  }

 private:
  struct Slot {
    Buffer buf;
    const Piece* piece = nullptr;
    enum { kFree, kReading, kWriting } state = kFree;
    int pending = 0;
    int err = 0;
  };

  static int on_done(void* ud, int* error) {
    auto* s = static_cast<Slot*>(ud);
    if (*error != 0 && s->err == 0) s->err = *error;
    --s->pending;
    return 1;  // retire the command
  }
  nbd_completion_callback callback(Slot* s) {
    nbd_completion_callback cb;
    cb.callback = on_done;
    cb.user_data = s;
    cb.free = nullptr;
    return cb;
  }

  Status loop() {
    // About 64 MiB of buffers per connection at most.
    int slots = std::max(1, o_.requests_per_connection);
    slots = static_cast<int>(std::max<uint64_t>(2, std::min<uint64_t>(slots, (64u << 20) / o_.request_size)));
    slots_.resize(static_cast<size_t>(slots));
    for (auto& s : slots_) {
      s.buf = aligned_buffer(o_.request_size);
      if (!s.buf) return Status::error(ENOMEM, "allocate read buffers");
    }
    bool no_more = false;
    for (;;) {
      if (sh_->failed) return Status::ok();  // another worker failed; its error is reported
      for (auto& s : slots_) {
        if (s.state != Slot::kFree || no_more) continue;
        size_t idx = sh_->next.fetch_add(1);
        if (idx >= sh_->pieces->size()) {
          no_more = true;
          break;
        }
        if (Status st = start_read(&s, &(*sh_->pieces)[idx]); !st) return st;
      }
      bool busy = false;
      for (auto& s : slots_) {
        if (s.state == Slot::kReading && s.pending == 0) {
          if (s.err) return Status::error(s.err, "read " + range_text(*s.piece) + " from " + o_.source.display() + ": " +
                                                     std::strerror(s.err));
          if (Status st = process(&s); !st) return st;
        }
        if (s.state == Slot::kWriting && s.pending == 0) {
          if (s.err) return Status::error(s.err, "write " + range_text(*s.piece) + " to " + o_.sink_endpoint.display() +
                                                     ": " + std::strerror(s.err));
          finish(&s);
        }
        if (s.state != Slot::kFree) busy = true;
      }
      if (!busy && no_more) return Status::ok();
      if (!busy) continue;
      if (Status st = wait(); !st) return st;
    }
  }

  static std::string range_text(const Piece& p) {
    return std::to_string(p.offset) + ":" + std::to_string(p.length);
  }

  Status start_read(Slot* s, const Piece* p) {
    s->piece = p;
    s->state = Slot::kReading;
    s->pending = 0;
    s->err = 0;
    for (const auto& e : p->extents) {
      char* at = s->buf.get() + (e.offset - p->offset);
      if (e.zero) {
        std::memset(at, 0, e.length);
        continue;
      }
      for (uint64_t done = 0; done < e.length; done += kMaxRequest) {
        uint64_t n = std::min(kMaxRequest, e.length - done);
        if (::nbd_aio_pread(src_.get(), at + done, n, e.offset + done, callback(s), 0) == -1)
          return Status::error(nbd_last_errno(), "read " + range_text(*p) + " from " + o_.source.display() + ": " +
                                                     nbd_last_error());
        ++s->pending;
      }
      sh_->read += e.length;
    }
    return Status::ok();
  }

  // Checksums and zero detection per block, then the sink's writes.
  Status process(Slot* s) {
    const Piece& p = *s->piece;
    const uint64_t bs = o_.block_size;
    const char* base = s->buf.get();
    // Which blocks are entirely in zero extents (no need to look at them).
    std::vector<uint8_t> zero(static_cast<size_t>((p.length + bs - 1) / bs), 0);
    {
      size_t ei = 0;
      for (size_t k = 0; k < zero.size(); ++k) {
        uint64_t b0 = p.offset + k * bs, b1 = std::min(b0 + bs, p.offset + p.length);
        while (ei < p.extents.size() && p.extents[ei].offset + p.extents[ei].length <= b0) ++ei;
        bool hole = true;
        for (size_t j = ei; j < p.extents.size() && p.extents[j].offset < b1; ++j)
          if (!p.extents[j].zero) hole = false;
        zero[k] = hole ? 2 : 0;  // 2: known zero, 1: found zero, 0: data
      }
    }
    for (size_t k = 0; k < zero.size(); ++k) {
      uint64_t off = k * bs, len = std::min(bs, p.length - off);
      uint64_t block = (p.offset + off) / bs;
      if (zero[k] == 2) {
        (*sh_->crcs)[block] = len == bs ? sh_->zero_block_crc : crc32c(base + off, len);
        continue;
      }
      // One pass: a block whose CRC is not that of zeros has data; only
      // the (rare) equal ones are scanned for zeros.
      uint32_t crc = crc32c(base + off, len);
      uint32_t zero_crc = len == bs ? sh_->zero_block_crc : crc32c(sh_->zeros, len);
      (*sh_->crcs)[block] = crc;
      if (crc == zero_crc && all_zero(base + off, len)) zero[k] = 1;
    }
    s->state = Slot::kWriting;
    s->pending = 0;
    s->err = 0;
    // Runs of data blocks and of zero blocks.
    size_t k = 0;
    while (k < zero.size()) {
      bool is_zero = zero[k] != 0;
      size_t j = k;
      while (j < zero.size() && (zero[j] != 0) == is_zero) ++j;
      uint64_t off = k * bs, len = std::min<uint64_t>(j * bs, p.length) - off;
      if (is_zero) {
        sh_->zero += len;
        if (o_.write_zeroes)
          if (Status st = write_zero(s, p.offset + off, len); !st) return st;
      } else {
        sh_->written += o_.sink == SinkKind::kNone ? 0 : len;
        if (Status st = write_data(s, base + off, p.offset + off, len); !st) return st;
      }
      k = j;
    }
    return Status::ok();
  }

  Status write_data(Slot* s, const char* data, uint64_t offset, uint64_t len) {
    switch (o_.sink) {
      case SinkKind::kNone: return Status::ok();
      case SinkKind::kNbd:
        for (uint64_t done = 0; done < len; done += kMaxRequest) {
          uint64_t n = std::min(kMaxRequest, len - done);
          if (::nbd_aio_pwrite(dst_->get(), data + done, n, offset + done, callback(s), 0) == -1)
            return Status::error(nbd_last_errno(), "write " + std::to_string(offset + done) + ":" + std::to_string(n) +
                                                       " to " + o_.sink_endpoint.display() + ": " + nbd_last_error());
          ++s->pending;
        }
        return Status::ok();
      case SinkKind::kFile: {
        // One writer at a time: buffered writes to one file serialize on
        // its inode lock anyway, and waiting there spins (17% of a
        // backup's CPU in perf); a mutex lets the other workers sleep.
        std::unique_lock lk(sh_->file_mu);
        Status st = pwrite_all(data, offset, len);
        lk.unlock();
        if (st && o_.start_writeback) evict(offset, len);
        return st;
      }
    }
    return Status::ok();
  }

  Status pwrite_all(const char* data, uint64_t offset, uint64_t len) {
    while (len > 0) {
      ssize_t n = ::pwrite(o_.sink_fd, data, len, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        return Status::from_errno("write " + std::to_string(offset) + ":" + std::to_string(len) + " to " + o_.sink_path,
                                  n < 0 ? errno : EIO);
      data += n, offset += static_cast<uint64_t>(n), len -= static_cast<uint64_t>(n);
    }
    return Status::ok();
  }

  Status write_zero(Slot* s, uint64_t offset, uint64_t len) {
    switch (o_.sink) {
      case SinkKind::kNone: return Status::ok();
      case SinkKind::kNbd:
        if (dst_->can_zero()) {
          for (uint64_t done = 0; done < len; done += kMaxRequest) {
            uint64_t n = std::min(kMaxRequest, len - done);
            if (::nbd_aio_zero(dst_->get(), n, offset + done, callback(s), 0) == -1)
              return Status::error(nbd_last_errno(), "zero " + std::to_string(offset + done) + ":" + std::to_string(n) +
                                                         " on " + o_.sink_endpoint.display() + ": " + nbd_last_error());
            ++s->pending;
          }
          return Status::ok();
        }
        for (uint64_t done = 0; done < len;) {
          uint64_t n = std::min(len - done, sh_->zeros_size);
          if (Status st = write_data(s, sh_->zeros, offset + done, n); !st) return st;
          done += n;
        }
        return Status::ok();
      case SinkKind::kFile: {
        if (o_.sink_is_block_device) {
          uint64_t r[2] = {offset, len};
          if (::ioctl(o_.sink_fd, BLKZEROOUT, r) == 0) return Status::ok();
        } else if (::fallocate(o_.sink_fd, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                               static_cast<off_t>(len)) == 0) {
          return Status::ok();
        }
        for (uint64_t done = 0; done < len;) {
          uint64_t n = std::min(len - done, sh_->zeros_size);
          if (Status st = pwrite_all(sh_->zeros, offset + done, n); !st) return st;
          done += n;
        }
        return Status::ok();
      }
    }
    return Status::ok();
  }

  // Writeback of this write starts now; the previous one is waited for
  // and dropped from the page cache (as nbdcopy does): the copy does not
  // fill memory with pages nobody reads again, which on these machines
  // makes every new page expensive, and the final fsync has little left.
  void evict(uint64_t offset, uint64_t len) {
    ::sync_file_range(o_.sink_fd, static_cast<off_t>(offset), static_cast<off_t>(len), SYNC_FILE_RANGE_WRITE);
    if (prev_len_ > 0) {
      ::sync_file_range(o_.sink_fd, static_cast<off_t>(prev_off_), static_cast<off_t>(prev_len_),
                        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
      ::posix_fadvise(o_.sink_fd, static_cast<off_t>(prev_off_), static_cast<off_t>(prev_len_), POSIX_FADV_DONTNEED);
    }
    prev_off_ = offset;
    prev_len_ = len;
  }

  void finish(Slot* s) {
    sh_->done += s->piece->length;
    s->state = Slot::kFree;
    s->piece = nullptr;
  }

  Status wait() {
    pollfd fds[2];
    nbd_handle* hs[2] = {src_.get(), dst_ ? dst_->get() : nullptr};
    int n = 0;
    nbd_handle* which[2];
    for (nbd_handle* h : hs) {
      if (!h || ::nbd_aio_in_flight(h) <= 0) continue;
      int dir = ::nbd_aio_get_direction(h);
      short ev = 0;
      if (dir & LIBNBD_AIO_DIRECTION_READ) ev |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) ev |= POLLOUT;
      fds[n] = {::nbd_aio_get_fd(h), ev, 0};
      which[n++] = h;
    }
    if (n == 0) return Status::ok();
    int r = ::poll(fds, static_cast<nfds_t>(n), 1000);
    if (r < 0 && errno != EINTR) return Status::from_errno("poll");
    for (int i = 0; i < n && r > 0; ++i) {
      int rc = 0;
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) rc = ::nbd_aio_notify_read(which[i]);
      else if (fds[i].revents & POLLOUT) rc = ::nbd_aio_notify_write(which[i]);
      if (rc == -1)
        return Status::error(nbd_last_errno(), std::string(which[i] == src_.get() ? "source " : "target ") +
                                                   "connection: " + nbd_last_error());
    }
    return Status::ok();
  }

  Shared* sh_;
  const MoveOptions& o_;
  NbdConnection src_;
  std::optional<NbdConnection> dst_;
  std::vector<Slot> slots_;
  uint64_t prev_off_ = 0, prev_len_ = 0;  // the last write, for evict()
};

}  // namespace

Result<MoveResult> BlockMover::run(const std::vector<ByteRange>& ranges, std::vector<uint32_t>* crcs,
                                   uint64_t expected_size) {
  auto t0 = Clock::now();
  MoveResult res;
  const uint64_t bs = o_.block_size;
  if (bs == 0 || bs % 512 != 0) return Status::error(EINVAL, "block size " + std::to_string(bs) + " is not a multiple of 512");
  o_.request_size = std::max(bs, o_.request_size / bs * bs);

  auto first = NbdConnection::open(o_.source);
  if (!first) return first.status();
  uint64_t size = first->size();
  if (expected_size != 0) {
    if (size != expected_size && size != (expected_size + 511) / 512 * 512)
      return Status::error(EINVAL, o_.source.display() + ": size " + std::to_string(first->size()) + ", expected " +
                                       std::to_string(expected_size));
    size = expected_size;
  }
  res.source_size = size;
  if (crcs->size() < block_count(size, bs)) return Status::error(EINVAL, "checksum array too small");
  int conns = o_.connections > 0 ? o_.connections : 4;
  // Without multi-conn the server promises no consistency across
  // connections and may take a single client (a second connect would hang).
  if (!first->multi_conn()) conns = 1;
  std::optional<NbdConnection> first_sink;
  if (o_.sink == SinkKind::kNbd) {
    auto d = NbdConnection::open(o_.sink_endpoint);
    if (!d) return d.status();
    if (d->read_only()) return Status::error(EROFS, "write to " + o_.sink_endpoint.display() + ": the export is read-only");
    if (d->size() < size)
      return Status::error(ENOSPC, "write to " + o_.sink_endpoint.display() + ": " + std::to_string(d->size()) +
                                       " bytes, smaller than the " + std::to_string(size) + " to write");
    if (!d->multi_conn()) conns = 1;
    first_sink = std::move(*d);
  }
  res.connections = conns;

  // Pieces with their allocation.
  std::vector<Piece> pieces;
  uint64_t total = 0;
  for (const auto& r : ranges) {
    if (r.length == 0) continue;
    if (r.offset % bs != 0 || (r.length % bs != 0 && r.offset + r.length != size) || r.offset + r.length > size)
      return Status::error(EINVAL, "range " + std::to_string(r.offset) + ":" + std::to_string(r.length) +
                                       " is not aligned to blocks of " + std::to_string(bs) + " inside " +
                                       std::to_string(size) + " bytes");
    auto ext = first->allocation(r.offset, r.length);
    if (!ext) return ext.status().with_context("allocation of " + o_.source.display());
    size_t ei = 0;
    for (uint64_t off = r.offset; off < r.offset + r.length; off += o_.request_size) {
      Piece p;
      p.offset = off;
      p.length = std::min(o_.request_size, r.offset + r.length - off);
      while (ei < ext->size() && (*ext)[ei].offset + (*ext)[ei].length <= off) ++ei;
      for (size_t j = ei; j < ext->size() && (*ext)[j].offset < off + p.length; ++j) {
        uint64_t a = std::max((*ext)[j].offset, off), b = std::min((*ext)[j].offset + (*ext)[j].length, off + p.length);
        p.extents.push_back({a, b - a, (*ext)[j].zero});
      }
      total += p.length;
      pieces.push_back(std::move(p));
    }
  }

  const uint64_t zeros_size = std::min<uint64_t>(o_.request_size, 4 << 20);
  Buffer zero_block = aligned_buffer(std::max(zeros_size, bs));
  if (!zero_block) return Status::error(ENOMEM, "allocate buffers");
  std::memset(zero_block.get(), 0, std::max(zeros_size, bs));
  Shared sh;
  sh.o = &o_;
  sh.pieces = &pieces;
  sh.crcs = crcs;
  sh.zero_block_crc = crc32c(zero_block.get(), bs);
  sh.zeros = zero_block.get();
  sh.zeros_size = zeros_size;

  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < conns; ++i) {
    std::optional<NbdConnection> src;
    if (i == 0) {
      src = std::move(*first);
    } else {
      auto c = NbdConnection::open(o_.source);
      if (!c) return c.status();
      src = std::move(*c);
    }
    std::optional<NbdConnection> dst;
    if (o_.sink == SinkKind::kNbd) {
      if (i == 0) {
        dst = std::move(first_sink);
      } else {
        auto d = NbdConnection::open(o_.sink_endpoint);
        if (!d) return d.status();
        dst = std::move(*d);
      }
    }
    workers.push_back(std::make_unique<Worker>(&sh, std::move(*src), std::move(dst)));
  }

  std::vector<std::thread> threads;
  for (auto& w : workers) threads.emplace_back([p = w.get()] { p->run(); });
  std::atomic<bool> all_done{false};
  std::thread joiner([&] {
    for (auto& t : threads) t.join();
    all_done = true;
  });
  while (!all_done) {
    for (int i = 0; i < 10 && !all_done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (o_.progress && !all_done) o_.progress(sh.done.load(), total);
  }
  joiner.join();
  if (!sh.error.is_ok()) return sh.error;
  if (o_.progress) o_.progress(sh.done.load(), total);
  res.bytes_read = sh.read;
  res.bytes_written = sh.written;
  res.bytes_zero = sh.zero;
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace nbdsnap
