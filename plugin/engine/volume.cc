#include "volume.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "file_io.h"

namespace nbdsnap {

Result<std::unique_ptr<Volume>> Volume::open(const std::string& name, const std::string& path,
                                             const Params& params, const std::string& cbt_path,
                                             const std::string& staging_path,
                                             const std::atomic<uint32_t>* sequence) {
  std::string ctx = "volume " + name;
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Status::from_errno(ctx + ": open " + path);
  auto size = file_size(fd);
  if (!size) {
    ::close(fd);
    return size.status().with_context(ctx + ": " + path);
  }
  if (*size == 0) {
    ::close(fd);
    return Status::error(EINVAL, ctx + ": " + path + " is empty");
  }
  Geometry g(*size, params);
  if (g.chunk_count() >= kZeroSlot || g.cbt_block_count() >= 0xffffffffu) {
    ::close(fd);
    return Status::error(EFBIG, ctx + ": too large for the chunk and CBT parameters");
  }
  std::unique_ptr<Volume> v(new Volume(name, path, fd, g, sequence));
  struct stat st;
  if (::fstat(fd, &st) == 0) {
    v->block_device_ = S_ISBLK(st.st_mode);
    v->dev_ = v->block_device_ ? st.st_rdev : st.st_dev;
    v->ino_ = v->block_device_ ? 0 : st.st_ino;
    if (S_ISREG(st.st_mode)) v->writer_ = std::make_unique<OriginWriter>(fd, "write origin");
  }
  Status cs = v->cbt_.open(cbt_path, g, &v->cbt_reset_reason_);
  if (!cs) return cs.with_context(ctx);
  // One storer thread per staging entry (at most 64): every staged copy can
  // be in flight at once, as many as the request threads wrote themselves
  // before (this disk takes about twice the 256 KiB direct writes at depth
  // 16 as at depth 1).
  unsigned storers = std::min<unsigned>(params.chunk_maximum_in_queue, 64);
  auto q = StoreQueue::open(staging_path, params.chunk_maximum_in_queue, g.chunk_size(), storers);
  if (!q) return q.status().with_context(ctx);
  v->store_ = std::move(*q);
  return v;
}

Volume::Volume(std::string name, std::string path, int fd, const Geometry& g,
               const std::atomic<uint32_t>* sequence)
    : name_(std::move(name)),
      path_(std::move(path)),
      fd_(fd),
      geometry_(g),
      sequence_(sequence),
      chain_(std::make_shared<Chain>()) {}

Volume::~Volume() {
  // Every staged copy stored first: the jobs use store_ and the members.
  if (store_) store_->drain();
  store_.reset();
  writer_.reset();  // before the descriptor it writes to is closed
  (void)cbt_.close();
  ::close(fd_);
}

// ---------------------------------------------------------------- origin I/O

namespace {
constexpr uint64_t kWriterMaxBytes = 256 * 1024;  // origin writes below this go to writer_
}

Status Volume::usable(const char* op) const {
  if (retired_.load(std::memory_order_acquire))
    return Status::error(EIO, std::string(op) + ": volume " + name_ + " was removed");
  return Status::ok();
}

Status Volume::read(void* buf, uint64_t length, uint64_t offset) {
  if (Status st = usable("read"); !st) return st;
  if (!geometry_.contains(offset, length)) return Status::error(EINVAL, "read: beyond the end of the volume");
  return pread_all(fd_, buf, length, offset, "read origin");
}

template <typename Apply>
Status Volume::modify(uint64_t offset, uint64_t length, const char* op, Apply&& apply) {
  if (Status st = usable(op); !st) return st;
  if (!geometry_.contains(offset, length))
    return Status::error(EINVAL, std::string(op) + ": beyond the end of the volume");
  // Staging entries reserved for this request's copies and not used yet.
  std::vector<uint32_t> entries;
  struct GiveBack {
    StoreQueue& q;
    std::vector<uint32_t>& e;
    ~GiveBack() {
      for (uint32_t x : e) q.release(x);
    }
  } give_back{*store_, entries};
  for (;;) {
    size_t wait_for = 0;
    {
      // Never wait for a closing gate while holding entries: a writer inside
      // may need them to finish, and the close waits for that writer.
      if (entries.empty()) {
        gate_.enter();
      } else if (!gate_.try_enter()) {
        for (uint32_t x : entries) store_->release(x);
        entries.clear();
        gate_.enter();
      }
      GateGuard guard(gate_, std::adopt_lock);
      const Chain* chain = chain_.get();  // stable while we are inside the gate
      if (!chain->empty()) {
        size_t need = std::min<size_t>(copies_needed(offset, length, *chain), store_->entries());
        if (entries.size() < need && !store_->try_reserve(need - entries.size(), &entries)) wait_for = need;
      }
      if (wait_for == 0) {
        Status log_error;
        stamp(offset, length, sequence_->load(std::memory_order_acquire), chain, &log_error);
        if (!chain->empty()) {
          Status st;
          geometry_.for_each_chunk_piece(offset, length, [&](const Piece& p) {
            st = preserve(ChunkIndex(static_cast<uint32_t>(p.unit)), chain_, &entries);
            return st.is_ok();
          });
          if (!st) return st.with_context(op);
        }
        return apply();
      }
    }
    // The staging area is full: wait for room outside the gate, so that a
    // take or destroy never waits for the disk, and holding nothing, so that
    // two waiting writers never hold entries the other needs.
    for (uint32_t x : entries) store_->release(x);
    entries.clear();
    store_->reserve(wait_for, &entries);
  }
}

Status Volume::write(const void* buf, uint64_t length, uint64_t offset, bool fua) {
  return modify(offset, length, "write", [&]() -> Status {
    // Small writes go to the writer thread (they are what the inode lock
    // spinning hurt); large ones are mostly a copy into the page cache, and
    // the hand-over cost them more than it saved (A/B: 1M writes 0.88x
    // through the writer, 1.06x direct next to small ones through it).
    Status st = writer_ && length < kWriterMaxBytes ? writer_->write(buf, length, offset)
                                                     : pwrite_all(fd_, buf, length, offset, "write origin");
    if (st && fua && ::fdatasync(fd_) != 0) return Status::from_errno("write origin: fdatasync");
    return st;
  });
}

Status Volume::trim(uint64_t length, uint64_t offset, bool fua) {
  return modify(offset, length, "trim", [&]() -> Status {
    int r;
    if (block_device_) {
      uint64_t range[2] = {offset, length};
      r = ::ioctl(fd_, BLKDISCARD, range);
    } else {
      r = ::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                      static_cast<off_t>(length));
    }
    // Trim is advisory: a device or file system without it keeps the data.
    if (r != 0 && errno != EOPNOTSUPP && errno != ENOTTY) return Status::from_errno("trim origin");
    if (fua && ::fdatasync(fd_) != 0) return Status::from_errno("trim origin: fdatasync");
    return Status::ok();
  });
}

Status Volume::zero(uint64_t length, uint64_t offset, bool may_trim, bool fua) {
  return modify(offset, length, "zero", [&]() -> Status {
    int r = -1;
    if (block_device_) {
      uint64_t range[2] = {offset, length};
      r = ::ioctl(fd_, BLKZEROOUT, range);
    } else {
      int mode = may_trim ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : FALLOC_FL_ZERO_RANGE;
      r = ::fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(length));
    }
    if (r != 0) {  // no fast path: write zeros
      static const std::vector<char> zeros(1 << 20, 0);
      for (uint64_t done = 0; done < length;) {
        uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
        Status st = pwrite_all(fd_, zeros.data(), n, offset + done, "zero origin");
        if (!st) return st;
        done += n;
      }
    }
    if (fua && ::fdatasync(fd_) != 0) return Status::from_errno("zero origin: fdatasync");
    return Status::ok();
  });
}

Status Volume::flush() {
  store_->drain();
  if (::fdatasync(fd_) != 0) return Status::from_errno("flush origin");
  return Status::ok();
}

Status Volume::origin_extents(uint64_t length, uint64_t offset, std::vector<Extent>* out) {
  uint64_t end = offset + length;
  if (block_device_) {
    out->push_back(Extent{offset, length, false});
    return Status::ok();
  }
  uint64_t pos = offset;
  while (pos < end) {
    off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0 && errno == ENXIO) data = static_cast<off_t>(end);  // hole to EOF
    if (data < 0) {  // no SEEK_DATA: report data
      out->push_back(Extent{pos, end - pos, false});
      return Status::ok();
    }
    uint64_t d = std::min<uint64_t>(static_cast<uint64_t>(data), end);
    if (d > pos) out->push_back(Extent{pos, d - pos, true});
    if (d >= end) break;
    off_t hole = ::lseek(fd_, data, SEEK_HOLE);
    uint64_t h = hole < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(hole), end);
    out->push_back(Extent{d, h - d, false});
    pos = h;
  }
  return Status::ok();
}

Status Volume::extents(uint64_t length, uint64_t offset, std::vector<Extent>* out) {
  if (!geometry_.contains(offset, length)) return Status::error(EINVAL, "extents: beyond the end");
  return origin_extents(length, offset, out);
}

// ---------------------------------------------------------- copy-before-write

void Volume::stamp(uint64_t offset, uint64_t length, uint32_t seq, const Chain* chain, Status* log_error) {
  // The CBT target is the newest part that is not hidden: it keeps the old
  // stamp of every block changed after its take (for its frozen view).
  SnapshotPart* target = nullptr;
  size_t target_pos = 0;
  for (size_t i = chain->size(); i-- > 0;) {
    if (!(*chain)[i]->hidden.load(std::memory_order_relaxed)) {
      target = (*chain)[i].get();
      target_pos = i;
      break;
    }
  }
  uint64_t first = offset >> geometry_.cbt_shift();
  uint64_t last = length == 0 ? first : (offset + length - 1) >> geometry_.cbt_shift();
  for (uint64_t b = first; b <= last && b < cbt_.block_count(); ++b) {
    CbtBlockIndex block{static_cast<uint32_t>(b)};
    uint32_t old = cbt_.load(block);
    if (old == seq) continue;
    if (target) {
      bool kept = target->saved_stamps.find(to_u32(block)).has_value();
      for (size_t i = target_pos + 1; !kept && i < chain->size(); ++i)
        kept = (*chain)[i]->saved_stamps.find(to_u32(block)).has_value();
      if (!kept && target->saved_stamps.insert(to_u32(block), old)) {
        Status st = target->log.append(LogRecord{LogType::kCbtStamp, to_u32(block), old, 0});
        if (!st) {
          // The frozen view could not be persisted: never silently wrong.
          target->snapshot->corrupt(name_, st.with_context("persist CBT stamp"));
          *log_error = st;
        }
      }
    }
    cbt_.exchange(block, seq);
  }
}

size_t Volume::copy_target(const Chain& chain) {
  // The newest part that is live and healthy.
  size_t t = chain.size();
  while (t > 0 && (chain[t - 1]->hidden.load(std::memory_order_relaxed) || !chain[t - 1]->snapshot->healthy()))
    --t;
  return t;
}

size_t Volume::copies_needed(uint64_t offset, uint64_t length, const Chain& chain) {
  size_t t = copy_target(chain);
  if (t == 0) return 0;
  size_t n = 0;
  geometry_.for_each_chunk_piece(offset, length, [&](const Piece& p) {
    // Without the chunk lock: an estimate of the entries to reserve; preserve
    // decides under the lock and waits for more if it needs them.
    if (!find_copy(chain, t - 1, chain.size(), ChunkIndex(static_cast<uint32_t>(p.unit)), false).part) ++n;
    return true;
  });
  return n;
}

Volume::Hit Volume::find_copy(const Chain& chain, size_t from, size_t to, ChunkIndex c, bool pin) {
  if (from >= to) return Hit{};
  // The first part's table comes first in the walk and never loses an
  // entry: a hit there needs no lock (most writes to a copied chunk).
  if (auto slot = chain[from]->chunks.find(to_u32(c))) return Hit{chain[from].get(), *slot};
  StagedShard& sh = staged_shard(c);
  std::unique_lock lk(sh.mu);
  auto copies = sh.copies.equal_range(to_u32(c));
  if (copies.first == copies.second) {
    // None staged: the tables alone. A copy staged from now on goes to a
    // target from which on no part holds the chunk (checked under its
    // exclusive lock), so this walk finds no hit there either, and a copy
    // that moves or leaves for a table was staged before this check.
    lk.unlock();
    for (size_t i = from; i < to; ++i)
      if (auto slot = chain[i]->chunks.find(to_u32(c))) return Hit{chain[i].get(), *slot};
    return Hit{};
  }
  // Held across the walk: a staged copy moves to an older part or leaves for
  // its part's table under it, so the walk sees each copy exactly once.
  for (size_t i = from; i < to; ++i) {
    const SnapshotPart* part = chain[i].get();
    if (auto slot = part->chunks.find(to_u32(c))) return Hit{part, *slot};
    for (auto it = copies.first; it != copies.second; ++it) {
      if (it->second.part != part) continue;
      if (pin) ++it->second.readers;
      return Hit{part, 0, true, it->second.entry};
    }
  }
  return Hit{};
}

void Volume::add_staged(ChunkIndex c, const SnapshotPart* part, uint32_t entry) {
  StagedShard& sh = staged_shard(c);
  std::lock_guard lk(sh.mu);
  sh.copies.emplace(to_u32(c), StagedCopy{part, entry});
}

namespace {
template <typename Map>
typename Map::iterator staged_copy(Map& copies, uint32_t c, uint32_t entry) {
  auto range = copies.equal_range(c);
  for (auto it = range.first; it != range.second; ++it)
    if (it->second.entry == entry) return it;
  return copies.end();
}
}  // namespace

void Volume::move_staged(ChunkIndex c, uint32_t entry, const SnapshotPart* part) {
  StagedShard& sh = staged_shard(c);
  std::lock_guard lk(sh.mu);
  auto it = staged_copy(sh.copies, to_u32(c), entry);
  if (it != sh.copies.end()) it->second.part = part;
}

void Volume::unstage(ChunkIndex c, uint32_t entry) {
  StagedShard& sh = staged_shard(c);
  {
    std::lock_guard lk(sh.mu);
    auto it = staged_copy(sh.copies, to_u32(c), entry);
    if (it != sh.copies.end() && it->second.readers > 0) {
      it->second.part = nullptr;  // the last reader gives the entry back
      return;
    }
    if (it != sh.copies.end()) sh.copies.erase(it);
  }
  store_->release(entry);
}

void Volume::unpin(ChunkIndex c, uint32_t entry) {
  StagedShard& sh = staged_shard(c);
  {
    std::lock_guard lk(sh.mu);
    auto it = staged_copy(sh.copies, to_u32(c), entry);
    if (it == sh.copies.end() || --it->second.readers > 0 || it->second.part) return;
    sh.copies.erase(it);
  }
  store_->release(entry);
}

struct Volume::Staged {
  std::shared_ptr<const Chain> chain;  // as it was when the copy was staged
  size_t target;                       // index in chain
  ChunkIndex c;
  SlotAddress slot;
  uint32_t entry;
  uint32_t length;
};

Status Volume::preserve(ChunkIndex c, const std::shared_ptr<const Chain>& chain_ref, std::vector<uint32_t>* entries) {
  const Chain& chain = *chain_ref;
  for (;;) {
    size_t t = copy_target(chain);
    if (t == 0) return Status::ok();
    SnapshotPart& target = *chain[t - 1];
    // Preserved for the target if it or a newer part holds a copy, stored or
    // staged (the old data is safe: no need to wait for the slot).
    if (find_copy(chain, t - 1, chain.size(), c, false).part) return Status::ok();
    // More copies than the request reserved (a request over more chunks than
    // the staging area holds): wait here, holding no unused entry.
    if (entries->empty()) store_->reserve(1, entries);
    locks_.lock(c);
    if (!target.snapshot->healthy()) {
      locks_.unlock(c);
      continue;
    }
    if (find_copy(chain, t - 1, chain.size(), c, false).part) {
      locks_.unlock(c);
      return Status::ok();
    }

    uint32_t entry = entries->back();
    char* buf = store_->entry(entry);
    uint32_t len = static_cast<uint32_t>(geometry_.chunk_length(c));
    Status st = pread_all(fd_, buf, len, geometry_.chunk_offset(c), "copy-before-write: read origin");
    if (!st) {
      locks_.unlock(c);
      return st;  // the origin itself fails: the write fails too
    }
    Snapshot& snap = *target.snapshot;
    if (is_zero(buf, len)) {
      // Nothing to store: recorded at once.
      st = target.log.append(LogRecord{LogType::kChunk, to_u32(c), kZeroSlot, len});
      if (st) {
        target.chunks.insert(to_u32(c), kZeroSlot);
        snap.chunks_copied.fetch_add(1, std::memory_order_relaxed);
        locks_.unlock(c);
        return Status::ok();
      }
    } else {
      auto a = snap.storage().allocate(len);
      if (a) {
        snap.check_free_space();
        // Logged before the origin write: a crash from here on finds the
        // copy in the staging file at restart.
        st = target.log.append(LogRecord{LogType::kStaged, to_u32(c), *a, len, entry});
        if (st) {
          entries->pop_back();
          add_staged(c, &target, entry);  // before the unlock: readers find it from now on
          auto job = std::make_shared<Staged>(Staged{chain_ref, t - 1, c, *a, entry, len});
          store_->submit([this, job] { store(*job); });
          locks_.unlock(c);
          return Status::ok();  // the job owns the entry now
        }
      } else {
        st = a.status();
      }
    }
    // The origin never fails because of a snapshot: this one becomes
    // corrupted and the write goes on (to an older snapshot if any).
    if (snap.corrupt(name_, st.with_context("copy-before-write chunk " + std::to_string(to_u32(c)))))
      (void)target.log.append(LogRecord{LogType::kCorrupted, 0, static_cast<uint32_t>(st.code()), 0});
    locks_.unlock(c);
  }
}

Status Volume::store_into(SnapshotPart& part, ChunkIndex c, SlotAddress slot, const char* data, uint32_t len) {
  Snapshot& snap = *part.snapshot;
  Status st = snap.healthy() ? snap.storage().write(slot, data, len) : snap.error();
  if (st) st = part.log.append(LogRecord{LogType::kChunk, to_u32(c), slot, len});
  if (st) {
    part.chunks.insert(to_u32(c), slot);
    snap.chunks_copied.fetch_add(1, std::memory_order_relaxed);
  }
  return st;
}

void Volume::store(Staged& job) {
  const Chain& chain = *job.chain;
  const char* data = store_->entry(job.entry);
  size_t at = job.target;
  SlotAddress slot = job.slot;
  for (;;) {
    SnapshotPart& part = *chain[at];
    Status st = store_into(part, job.c, slot, data, job.length);
    if (st) break;  // in the table before it leaves the staged map: no gap
    std::string what = "store chunk " + std::to_string(to_u32(job.c));
    (void)part.snapshot->corrupt(name_, st.with_context(what));
    const size_t failed = at;
    // The origin already holds the new data: the copy goes to the next older
    // snapshot that needs it, from the same staged bytes. Staged there
    // before this part's record is closed: a crash in between finds the copy
    // open in the older log and stores it at restart.
    bool next = false;
    while (at > 0 && !next) {
      --at;
      SnapshotPart& older = *chain[at];
      Snapshot& snap = *older.snapshot;
      if (older.hidden.load(std::memory_order_relaxed) || !snap.healthy()) continue;
      // It or a part between it and the failed one holds a copy: it reads
      // that. (Up to the failed part, whose own staged copy is this one.
      // Without the chunk lock: while this copy is listed for the failed
      // part, no writer copies the chunk for an older one.)
      if (find_copy(chain, at, failed, job.c, false).part) break;
      auto a = snap.storage().allocate(job.length);
      Status s2 = a.status();
      if (a) {
        snap.check_free_space();
        s2 = older.log.append(LogRecord{LogType::kStaged, to_u32(job.c), *a, job.length, job.entry});
      }
      if (s2) {
        slot = *a;
        next = true;
        move_staged(job.c, job.entry, &older);
      } else if (snap.corrupt(name_, s2.with_context(what))) {
        (void)older.log.append(LogRecord{LogType::kCorrupted, 0, static_cast<uint32_t>(s2.code()), 0});
      }
    }
    // Closes the staged record whatever else recorded the corruption.
    (void)part.log.append(LogRecord{LogType::kCorrupted, 0, static_cast<uint32_t>(st.code()), 0});
    if (!next) break;
  }
  unstage(job.c, job.entry);
}

Status Volume::restore_staged(SnapshotPart& part, ChunkIndex c, SlotAddress slot, uint32_t entry, uint32_t length) {
  std::string what = "restore staged copy of chunk " + std::to_string(to_u32(c));
  if (length == 0 || length > geometry_.chunk_size()) return Status::error(EBADMSG, what + ": bad length");
  void* p = nullptr;
  if (posix_memalign(&p, 4096, length) != 0) return Status::error(ENOMEM, what);
  std::unique_ptr<char, decltype(&std::free)> buf(static_cast<char*>(p), &std::free);
  Status st = store_->read_file_entry(entry, buf.get(), length);
  if (st) st = store_into(part, c, slot, buf.get(), length);
  return st ? st : st.with_context(what);
}

// ------------------------------------------------------------ snapshot reads

std::shared_ptr<const Chain> Volume::chain() const {
  std::lock_guard lk(chain_mu_);
  return chain_;
}

size_t Volume::position(const Chain& chain, const SnapshotPart* part) {
  for (size_t i = 0; i < chain.size(); ++i)
    if (chain[i].get() == part) return i;
  return chain.size();
}

Status Volume::readable(const SnapshotPart& part) const {
  const Snapshot& s = *part.snapshot;
  if (s.destroyed.load()) return Status::error(EIO, "snapshot " + s.label() + " was destroyed");
  if (!s.healthy())
    return Status::error(EIO, "snapshot " + s.label() + " is corrupted: " + s.error().message());
  return Status::ok();
}

Status Volume::read_piece(const SnapshotPart& part, const Piece& p, char* buf) {
  ChunkIndex c{static_cast<uint32_t>(p.unit)};
  auto read_slot = [&](const SnapshotPart& holder, SlotAddress slot) -> Status {
    if (slot == kZeroSlot) {
      std::memset(buf, 0, p.length);
      return Status::ok();
    }
    return holder.snapshot->storage().read(slot, p.unit_offset, buf, p.length);
  };
  std::shared_ptr<const Chain> chain = this->chain();
  size_t pos = position(*chain, &part);
  if (pos == chain->size()) return Status::error(EIO, "snapshot " + part.snapshot->label() + " was destroyed");
  // The first part from this one on that holds a copy, stored or staged (a
  // newer part's table alone is not enough: this part's copy may be staged
  // while the newer part already stored a later one). A copy found is the
  // answer without the chunk lock: a copy staged meanwhile goes to a target
  // from which on no part held the chunk.
  Hit h = find_copy(*chain, pos, chain->size(), c, true);
  if (!h.part) {
    // None: read the origin while no copy of this chunk can be staged, after
    // looking again with the current chain (a take may have added a part).
    SharedChunkLock lock(locks_, c);
    chain = this->chain();
    pos = position(*chain, &part);
    if (pos == chain->size()) return Status::error(EIO, "snapshot " + part.snapshot->label() + " was destroyed");
    h = find_copy(*chain, pos, chain->size(), c, true);
    if (!h.part) return pread_all(fd_, buf, p.length, p.offset, "read origin");
  }
  if (!h.staged) return read_slot(*h.part, h.slot);  // a slot in a table does not change
  std::memcpy(buf, store_->entry(h.entry) + p.unit_offset, p.length);
  unpin(c, h.entry);
  return Status::ok();
}

Status Volume::read_snapshot(const SnapshotPart& part, void* buf, uint64_t length, uint64_t offset) {
  if (!geometry_.contains(offset, length)) return Status::error(EINVAL, "read: beyond the end of the volume");
  Status st = readable(part);
  if (!st) return st.with_context("read");
  geometry_.for_each_chunk_piece(offset, length, [&](const Piece& p) {
    st = read_piece(part, p, static_cast<char*>(buf) + p.buf_offset);
    return st.is_ok();
  });
  if (!st) return st.with_context("read snapshot " + part.snapshot->label());
  // A copy that failed while we read means the origin may have changed under
  // us: the snapshot is corrupted and this read must not return data.
  st = readable(part);
  return st ? st : st.with_context("read");
}

Status Volume::snapshot_extents(const SnapshotPart& part, uint64_t length, uint64_t offset,
                                std::vector<Extent>* out) {
  if (!geometry_.contains(offset, length)) return Status::error(EINVAL, "extents: beyond the end");
  Status st = readable(part);
  if (!st) return st.with_context("extents");
  // The origin's allocation over the whole range first: one SEEK_DATA /
  // SEEK_HOLE walk instead of one per chunk (a 1 GiB read asked for 4096).
  // It is used for the chunks of which no part from this one on holds a
  // copy, stored or staged, when checked below under the chunk's shared lock:
  // the origin of such a chunk has not changed since the take (a change is
  // preceded by the copy, staged before the origin is written), so this walk,
  // made after the take, shows it as of the take.
  std::vector<Extent> origin;
  st = origin_extents(length, offset, &origin);
  if (!st) return st;
  size_t next = 0;  // first origin extent that may meet the current piece
  geometry_.for_each_chunk_piece(offset, length, [&](const Piece& p) {
    ChunkIndex c{static_cast<uint32_t>(p.unit)};
    SharedChunkLock lock(locks_, c);
    std::shared_ptr<const Chain> chain = this->chain();
    size_t pos = position(*chain, &part);
    if (pos == chain->size()) {
      st = Status::error(EIO, "extents: snapshot was destroyed");
      return false;
    }
    Hit h = find_copy(*chain, pos, chain->size(), c, false);
    if (h.part) {
      out->push_back(Extent{p.offset, p.length, !h.staged && h.slot == kZeroSlot});
      return true;
    }
    uint64_t end = p.offset + p.length;
    while (next < origin.size() && origin[next].offset + origin[next].length <= p.offset) ++next;
    for (size_t k = next; k < origin.size() && origin[k].offset < end; ++k) {
      uint64_t b = std::max(origin[k].offset, p.offset);
      uint64_t e = std::min(origin[k].offset + origin[k].length, end);
      out->push_back(Extent{b, e - b, origin[k].hole});
    }
    return true;
  });
  if (!st) return st;
  // As for reads: a copy that failed meanwhile means the origin may have
  // changed without a table entry, so no answer.
  st = readable(part);
  if (!st) return st.with_context("extents");
  // Merge neighbours of the same kind.
  std::vector<Extent> merged;
  for (const Extent& e : *out) {
    if (!merged.empty() && merged.back().hole == e.hole &&
        merged.back().offset + merged.back().length == e.offset)
      merged.back().length += e.length;
    else
      merged.push_back(e);
  }
  out->swap(merged);
  return Status::ok();
}

// ----------------------------------------------------------- change tracking

Status Volume::mark_dirty(uint64_t offset, uint64_t length) {
  if (!geometry_.contains(offset, length))
    return Status::error(EINVAL, "mark-dirty: range beyond the end of volume " + name_);
  GateGuard guard(gate_);
  Status log_error;
  stamp(offset, length, sequence_->load(std::memory_order_acquire), chain_.get(), &log_error);
  return Status::ok();
}

uint32_t Volume::frozen_stamp(const Chain& chain, size_t pos, CbtBlockIndex b, uint64_t taken_seq) const {
  uint32_t live = cbt_.load(b);
  if (live <= taken_seq) return live;
  for (size_t i = pos; i < chain.size(); ++i) {
    auto old = chain[i]->saved_stamps.find(to_u32(b));
    if (old) return *old;
  }
  return live;  // not found: report it as changed rather than hide a change
}

Result<std::vector<uint32_t>> Volume::cbt_stamps(const SnapshotPart* part, uint64_t first, uint64_t count) {
  uint64_t n = cbt_.block_count();
  if (first > n) return Status::error(EINVAL, "cbt map: first block beyond the map");
  count = std::min(count, n - first);
  std::vector<uint32_t> out(count);
  std::shared_ptr<const Chain> chain = this->chain();
  size_t pos = part ? position(*chain, part) : 0;
  if (part && pos == chain->size()) return Status::error(ENOENT, "cbt map: snapshot was destroyed");
  for (uint64_t i = 0; i < count; ++i) {
    CbtBlockIndex b{static_cast<uint32_t>(first + i)};
    out[i] = part ? frozen_stamp(*chain, pos, b, part->snapshot->sequence()) : cbt_.load(b);
  }
  return out;
}

Result<std::vector<ByteRange>> Volume::cbt_changes(const SnapshotPart* part, uint64_t since) {
  std::shared_ptr<const Chain> chain = this->chain();
  size_t pos = part ? position(*chain, part) : 0;
  if (part && pos == chain->size()) return Status::error(ENOENT, "cbt changes: snapshot was destroyed");
  uint64_t taken = part ? part->snapshot->sequence() : 0;
  std::vector<ByteRange> out;
  uint64_t n = cbt_.block_count();
  for (uint64_t i = 0; i < n; ++i) {
    CbtBlockIndex b{static_cast<uint32_t>(i)};
    uint32_t s = cbt_.load(b);
    if (s <= since) continue;
    if (part && s > taken) {
      s = frozen_stamp(*chain, pos, b, taken);
      if (s <= since) continue;
    }
    uint64_t off = geometry_.cbt_block_offset(b);
    uint64_t len = geometry_.cbt_block_length(b);
    if (!out.empty() && out.back().offset + out.back().length == off)
      out.back().length += len;
    else
      out.push_back(ByteRange{off, len});
  }
  return out;
}

// --------------------------------------------------------------------- chain

void Volume::push_part(std::shared_ptr<SnapshotPart> part) {
  auto next = std::make_shared<Chain>(*chain_);
  next->push_back(std::move(part));
  std::lock_guard lk(chain_mu_);
  chain_ = std::move(next);
}

Chain Volume::hide_part(const SnapshotPart* part) {
  auto next = std::make_shared<Chain>(*chain_);
  for (auto& p : *next)
    if (p.get() == part) p->hidden = true;
  Chain dropped;
  // Hidden parts at the old end serve nobody: no older part reads through them.
  while (!next->empty() && next->front()->hidden.load()) {
    dropped.push_back(next->front());
    next->erase(next->begin());
  }
  std::lock_guard lk(chain_mu_);
  chain_ = std::move(next);
  return dropped;
}

void Volume::restore_chain(Chain chain) {
  std::lock_guard lk(chain_mu_);
  chain_ = std::make_shared<const Chain>(std::move(chain));
}

}  // namespace nbdsnap
