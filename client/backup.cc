#include "backup.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>

#include "file_io.h"
#include "qemu_tools.h"

namespace nbdsnap {
namespace {

bool exists(const std::string& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

// Byte ranges of the blocks in RUNS.
std::vector<ByteRange> ranges_of(const BlockChecksums& cs, uint64_t size) {
  std::vector<ByteRange> out;
  for (const auto& [first, crcs] : cs.runs) {
    uint64_t off = first * cs.block_size;
    uint64_t end = std::min(size, (first + crcs.size()) * cs.block_size);
    out.push_back({off, end - off});
  }
  return out;
}

// Ranges widened to whole blocks, sorted and merged.
std::vector<ByteRange> block_ranges(std::vector<ByteRange> in, uint64_t bs, uint64_t size) {
  std::sort(in.begin(), in.end(), [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
  std::vector<ByteRange> out;
  for (const auto& r : in) {
    if (r.length == 0 || r.offset >= size) continue;
    uint64_t a = r.offset / bs * bs;
    uint64_t b = std::min(size, (std::min(size, r.offset + r.length) + bs - 1) / bs * bs);
    if (!out.empty() && out.back().offset + out.back().length >= a) {
      out.back().length = std::max(out.back().offset + out.back().length, b) - out.back().offset;
    } else {
      out.push_back({a, b - a});
    }
  }
  return out;
}

void compare(const std::vector<uint32_t>& got, const std::vector<uint32_t>& want, const std::vector<ByteRange>& ranges,
             uint64_t bs, uint64_t* blocks, uint64_t* bad_count, std::vector<uint64_t>* bad) {
  for (const auto& r : ranges)
    for (uint64_t b = r.offset / bs; b * bs < r.offset + r.length; ++b) {
      ++*blocks;
      if (got[b] != want[b]) {
        ++*bad_count;
        if (bad->size() < 100) bad->push_back(b);
      }
    }
}

// Reads RANGES of the point M (its qcow2 file, served read-only by
// qemu-nbd) with O, whose source this sets; (*got)[b] receives the CRC of
// every block read.
Result<MoveResult> read_point(const BackupChain& chain, const Manifest& m, const std::vector<ByteRange>& ranges,
                              MoveOptions o, std::vector<uint32_t>* got) {
  auto server = QemuNbd::serve(chain.path_of(m.file), true, o.connections > 0 ? o.connections : 4);
  if (!server) return server.status();
  o.source = server->endpoint();
  auto moved = BlockMover(std::move(o)).run(ranges, got, m.size);
  Status stopped = server->stop();
  if (!moved) return moved.status();
  if (!stopped) return stopped;
  return moved;
}

}  // namespace

std::string utc_now() {
  time_t t = ::time(nullptr);
  struct tm tm {};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Result<Manifest> run_backup(const BackupChain& chain, const BackupRequest& r) {
  Manifest m;
  m.name = chain.next_name();
  m.file = m.name + ".qcow2";
  m.kind = r.parent ? "incremental" : "full";
  m.parent = r.parent ? r.parent->name : "";
  m.reason = r.reason;
  m.volume = r.volume;
  m.snapshot_id = r.snapshot_id;
  m.snapshot_name = r.snapshot_name;
  m.source = r.source.display();
  m.generation = r.generation;
  m.sequence = r.sequence;
  m.block_size = r.block_size;
  m.size = r.size;
  m.time = utc_now();
  m.changed_bytes = r.parent ? r.changed_bytes : r.size;

  const bool full = r.parent == nullptr;
  if (full) m.data = m.name + ".raw";
  const std::string image = chain.path_of(m.file), part = image + ".part", manifest = chain.path_of(m.name + ".json");
  const std::string data = full ? chain.path_of(m.data) : "", data_part = data + ".part";
  if (exists(manifest)) return Status::error(EEXIST, "backup " + m.name + ": " + manifest + " exists already");
  // Files of this number without a manifest are what an interrupted run
  // left (the caller holds the directory's lock): they are not a backup.
  for (const std::string& f : {image, part, chain.path_of(m.name + ".raw"), chain.path_of(m.name + ".raw.part")})
    if (exists(f) && ::unlink(f.c_str()) != 0) return Status::from_errno("backup " + m.name + ": remove leftover " + f);
  // From here on, a failure removes what this backup wrote.
  struct Cleanup {
    std::vector<std::string> paths;
    bool keep = false;
    ~Cleanup() {
      if (!keep)
        for (const auto& p : paths) ::unlink(p.c_str());
    }
  } cleanup;

  const uint64_t nblocks = block_count(r.size, r.block_size);
  std::vector<ByteRange> ranges = full ? std::vector<ByteRange>{{0, r.size}} : block_ranges(r.changes, r.block_size, r.size);

  MoveOptions o;
  o.source = r.source;
  o.block_size = r.block_size;
  o.connections = r.connections;
  o.progress = r.progress;
  std::vector<uint32_t> crcs(nblocks, 0);
  Result<MoveResult> moved = Status::error(EIO, "not run");
  if (full) {
    // The bytes go straight into a new sparse raw file: holes and zero
    // blocks are not written.
    int fd = ::open(data_part.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return Status::from_errno("backup " + m.name + ": create " + data_part);
    cleanup.paths.push_back(data_part);
    if (::ftruncate(fd, static_cast<off_t>(r.size)) != 0) {
      int e = errno;
      ::close(fd);
      return Status::from_errno("backup " + m.name + ": size " + data_part, e);
    }
    o.sink = SinkKind::kFile;
    o.sink_fd = fd;
    o.sink_path = data_part;
    o.start_writeback = true;  // the fsync before the manifest overlaps the copy
    o.write_zeroes = false;
    moved = BlockMover(o).run(ranges, &crcs, r.size);
    int e = moved && ::fsync(fd) != 0 ? errno : 0;
    ::close(fd);
    if (!moved) return moved.status().with_context("backup " + m.name);
    if (e) return Status::from_errno("backup " + m.name + ": fsync " + data_part, e);
    if (::rename(data_part.c_str(), data.c_str()) != 0) return Status::from_errno("backup " + m.name + ": rename " + data_part);
    cleanup.paths.back() = data;
    // The qcow2 file of the point: an empty overlay of the raw data.
    if (Status st = qcow2_create(part, r.size, m.data, "raw"); !st) return st.with_context("backup " + m.name);
    cleanup.paths.push_back(part);
  } else {
    // An overlay of the previous backup, written through qemu-nbd; zero
    // blocks become zero clusters that hide older data.
    if (Status st = qcow2_create(part, r.size, r.parent->file, "qcow2"); !st) return st.with_context("backup " + m.name);
    cleanup.paths.push_back(part);
    auto probe = NbdConnection::open(r.source);
    if (!probe) return probe.status().with_context("backup");
    if (probe->size() != r.size)
      return Status::error(EINVAL, "backup: " + r.source.display() + " has " + std::to_string(probe->size()) +
                                       " bytes, the volume " + std::to_string(r.size));
    int conns = r.connections > 0 ? r.connections : (probe->multi_conn() ? 4 : 1);
    probe->close();
    auto server = QemuNbd::serve(part, false, conns);
    if (!server) return server.status().with_context("backup");
    o.sink = SinkKind::kNbd;
    o.sink_endpoint = server->endpoint();
    o.write_zeroes = true;
    moved = BlockMover(o).run(ranges, &crcs, r.size);
    Status stopped = server->stop();
    if (!moved) return moved.status().with_context("backup " + m.name);
    if (!stopped) return stopped.with_context("backup " + m.name);
  }

  std::vector<uint8_t> present(nblocks, 0);
  for (const auto& rg : ranges)
    for (uint64_t b = rg.offset / r.block_size; b * r.block_size < rg.offset + rg.length; ++b) present[b] = 1;
  m.checksums = BlockChecksums::from_array(r.block_size, crcs, present);
  m.bytes_read = moved->bytes_read;
  m.bytes_written = moved->bytes_written;
  m.bytes_zero = moved->bytes_zero;
  m.connections = moved->connections;
  m.seconds = moved->seconds;

  // The image first (fsync'd by qemu-nbd's flush and exit), then the
  // manifest, which is what makes the backup exist.
  int fd = ::open(part.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    int e = errno;
    if (fd >= 0) ::close(fd);
    return Status::from_errno("backup " + m.name + ": fsync " + part, e);
  }
  ::close(fd);
  if (::rename(part.c_str(), image.c_str()) != 0) return Status::from_errno("backup " + m.name + ": rename " + part);
  cleanup.paths.back() = image;
  if (Status st = write_file_atomic(manifest, m.to_json().dump() + "\n", ".part", 0644); !st)
    return st.with_context("backup " + m.name);
  cleanup.keep = true;
  return m;
}

Result<RestoreResult> run_restore(const BackupChain& chain, const Manifest& point, const RestoreTarget& t,
                                  int connections, ProgressFn progress) {
  const std::string what = "restore " + point.name;
  auto want = chain.expected(point);
  if (!want) return want.status().with_context(what);

  MoveOptions o;
  o.block_size = point.block_size;
  o.connections = connections;
  o.progress = std::move(progress);
  int fd = -1;
  struct CloseFd {
    int* fd;
    ~CloseFd() {
      if (*fd >= 0) ::close(*fd);
    }
  } close_fd{&fd};
  if (!t.nbd.uri.empty()) {
    o.sink = SinkKind::kNbd;
    o.sink_endpoint = t.nbd;
    o.write_zeroes = true;  // the export holds other data
  } else {
    o.sink = SinkKind::kFile;
    struct stat st {};
    bool existed = ::stat(t.path.c_str(), &st) == 0;
    if (existed && S_ISBLK(st.st_mode)) {
      fd = ::open(t.path.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd < 0) return Status::from_errno(what + ": open " + t.path);
      uint64_t dev_size = 0;
      if (::ioctl(fd, BLKGETSIZE64, &dev_size) != 0) return Status::from_errno(what + ": size of " + t.path);
      if (dev_size < point.size)
        return Status::error(ENOSPC, what + ": " + t.path + " has " + std::to_string(dev_size) +
                                         " bytes, smaller than the backup's " + std::to_string(point.size));
      o.sink_is_block_device = true;
      o.write_zeroes = true;
    } else if (existed && !S_ISREG(st.st_mode)) {
      return Status::error(EINVAL, what + ": " + t.path + " is neither a regular file nor a block device");
    } else {
      if (existed && !t.force)
        return Status::error(EEXIST, what + ": " + t.path + " exists (give --force to overwrite it)");
      fd = ::open(t.path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0) return Status::from_errno(what + ": open " + t.path);
      // Emptied and sized: every hole reads as zero, only data is written.
      if (::ftruncate(fd, 0) != 0 || ::ftruncate(fd, static_cast<off_t>(point.size)) != 0)
        return Status::from_errno(what + ": size " + t.path);
    }
    o.sink_fd = fd;
    o.sink_path = t.path;
    o.start_writeback = true;
  }
  RestoreResult res;
  std::vector<uint32_t> got(want->size(), 0);
  auto moved = read_point(chain, point, {{0, point.size}}, std::move(o), &got);
  if (!moved) return moved.status().with_context(what);
  if (fd >= 0 && ::fsync(fd) != 0) return Status::from_errno(what + ": fsync " + t.path);
  res.move = *moved;
  compare(got, *want, {{0, point.size}}, point.block_size, &res.blocks, &res.bad_count, &res.bad_blocks);
  return res;
}

Result<VerifyResult> run_verify(const BackupChain& chain, const Manifest& b, bool whole_point, int connections,
                                ProgressFn progress) {
  const std::string what = "verify " + b.name;
  VerifyResult res;
  res.name = b.name;
  res.whole_point = whole_point;
  std::vector<uint32_t> want;
  std::vector<ByteRange> ranges;
  if (whole_point) {
    auto w = chain.expected(b);
    if (!w) return w.status().with_context(what);
    want = std::move(*w);
    ranges = {{0, b.size}};
  } else {
    auto anc = chain.ancestry(b);
    if (!anc) return anc.status().with_context(what);
    want.assign(block_count(b.size, b.block_size), 0);
    for (const auto& [first, cs] : b.checksums.runs)
      for (size_t k = 0; k < cs.size(); ++k) want[first + k] = cs[k];
    ranges = ranges_of(b.checksums, b.size);
  }
  MoveOptions o;
  o.block_size = b.block_size;
  o.connections = connections;
  o.progress = std::move(progress);
  std::vector<uint32_t> got(want.size(), 0);
  auto moved = read_point(chain, b, ranges, std::move(o), &got);
  if (!moved) return moved.status().with_context(what);
  res.move = *moved;
  compare(got, want, ranges, b.block_size, &res.blocks, &res.bad_count, &res.bad_blocks);
  return res;
}

}  // namespace nbdsnap
