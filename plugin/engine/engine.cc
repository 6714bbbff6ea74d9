#include "engine.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "crc32c.h"
#include "file_io.h"
#include "state.pb.h"

namespace nbdsnap {
namespace fs = std::filesystem;

namespace {

constexpr char kRegistryMagic[8] = {'N', 'B', 'D', 'S', 'R', 'E', 'G', '1'};
constexpr uint32_t kRegistryVersion = 1;
constexpr size_t kRegistryHeader = 20;  // magic, version, length, crc

struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool block = false;
};

std::optional<FileId> identify(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  if (S_ISBLK(st.st_mode)) return FileId{st.st_rdev, 0, true};
  return FileId{st.st_dev, st.st_ino, false};
}

bool same_file(const FileId& a, const FileId& b) {
  return a.block == b.block && a.dev == b.dev && a.ino == b.ino;
}

}  // namespace

Status check_name(const std::string& what, const std::string& name) {
  if (name.empty() || name.size() > 128)
    return Status::error(EINVAL, what + " name must have 1 to 128 characters");
  if (name[0] == '.' || name[0] == '-')
    return Status::error(EINVAL, what + " name \"" + name + "\" must not start with '.' or '-'");
  for (char c : name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return Status::error(EINVAL, what + " name \"" + name + "\" may only hold letters, digits, '.', '_' and '-'");
  return Status::ok();
}

Engine::Engine(EngineOptions options) : options_(std::move(options)) {
  if (!options_.storage_factory) options_.storage_factory = make_file_storage;
}

Engine::~Engine() {
  if (started_) (void)stop();
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

void Engine::note(const std::string& msg) const {
  if (options_.log) options_.log(msg);
}

std::unique_ptr<DiffStorage> Engine::new_storage() const { return options_.storage_factory(); }

uint64_t Engine::volumes_bytes(const std::vector<std::string>& names) const {
  uint64_t total = 0;
  for (const auto& n : names) {
    auto v = volume(n);
    if (!v) return UINT64_MAX;  // unknown size: keep the warnings
    total += v->size();
  }
  return total;
}

std::string Engine::cbt_path(const std::string& volume) const {
  return options_.state_dir.empty() ? "" : options_.state_dir + "/cbt/" + volume + ".map";
}

std::string Engine::staging_path(const std::string& volume) const {
  return staging_prefix_.empty() ? "" : staging_prefix_ + volume + ".chunks";
}

std::string Engine::snapshot_dir(const Uuid& id) const {
  return options_.state_dir.empty() ? "" : options_.state_dir + "/snapshots/" + id.str();
}

// ------------------------------------------------------------- start / stop

Status Engine::start() {
  Status st = options_.params.validate();
  if (!st) return st;
  const std::string& dir = options_.state_dir;
  bool unclean_reboot = false;
  if (!dir.empty()) {
    std::error_code ec;
    fs::create_directories(dir + "/cbt", ec);
    if (!ec) fs::create_directories(dir + "/snapshots", ec);
    if (ec) return Status::error(ec.value(), "state " + dir + ": " + ec.message());
    // Staging files on tmpfs: the copies in them are rewritten all the time
    // and needed only after a crash of the process, never after a reboot (an
    // unclean one distrusts every snapshot, a clean stop stores them all).
    // In a file of the state directory, each mapped page written after the
    // kernel wrote it back faulted through the file system again: first-touch
    // 1M writes measured 0.89x of tmpfs staging.
    struct stat st_dir, st_shm;
    if (::stat(dir.c_str(), &st_dir) == 0 && ::stat("/dev/shm", &st_shm) == 0 && S_ISDIR(st_shm.st_mode) &&
        ::access("/dev/shm", W_OK | X_OK) == 0) {
      char name[80];
      std::snprintf(name, sizeof name, "/dev/shm/nbdsnap-%llx-%llx-", static_cast<unsigned long long>(st_dir.st_dev),
                    static_cast<unsigned long long>(st_dir.st_ino));
      staging_prefix_ = name;
    } else {
      fs::create_directories(dir + "/staging", ec);
      if (ec) return Status::error(ec.value(), "state " + dir + ": staging: " + ec.message());
      staging_prefix_ = dir + "/staging/";
    }
    lock_fd_ = ::open((dir + "/lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd_ < 0) return Status::from_errno("state " + dir + ": open lock");
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0)
      return Status::error(EBUSY, "state " + dir + ": in use by another process");
    auto marker = read_file(dir + "/in-use");
    if (marker) {
      std::string boot = *marker;
      while (!boot.empty() && boot.back() == '\n') boot.pop_back();
      unclean_reboot = boot != boot_id();
      note(unclean_reboot ? "state: unclean shutdown across a reboot: snapshots will be marked corrupted"
                          : "state: recovering after a process crash (same boot): state is kept");
    }
  }
  std::vector<std::string> seen;
  for (const auto& [name, path] : options_.volumes) {
    st = check_name("volume", name);
    if (!st) return st.with_context("config: volume");
    if (std::find(seen.begin(), seen.end(), name) != seen.end())
      return Status::error(EINVAL, "config: volume " + name + " given twice");
    seen.push_back(name);
    auto v = Volume::open(name, path, options_.params, cbt_path(name), staging_path(name), &sequence_);
    if (!v) return v.status();
    if (!dir.empty() && !(*v)->cbt_reset_reason().empty())
      note("volume " + name + ": new CBT generation " + (*v)->cbt().generation().str() + ": " +
           (*v)->cbt_reset_reason());
    volumes_.push_back(std::shared_ptr<Volume>(std::move(*v)));
  }
  for (size_t i = 0; i < volumes_.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (volumes_[i]->device() == volumes_[j]->device() && volumes_[i]->inode() == volumes_[j]->inode())
        return Status::error(EINVAL, "config: volumes " + volumes_[j]->name() + " and " +
                                         volumes_[i]->name() + " are the same file");
  if (!dir.empty()) {
    st = load_registry();
    if (!st) return st;
    if (unclean_reboot) {
      for (auto& [id, e] : snapshots_)  // only taken snapshots hold copies
        if (!e.parts.empty() &&
            e.snapshot->corrupt("", Status::error(EIO, "unclean shutdown across a reboot: "
                                                       "copied chunks may not have reached the disk")))
          for (auto& [vol, part] : e.parts)
            (void)part->log.append(LogRecord{LogType::kCorrupted, 0, EIO, 0});
    }
    st = write_file_atomic(dir + "/in-use", boot_id() + "\n");
    if (!st) return st.with_context("state " + dir);
    std::lock_guard lk(mu_);
    st = save_registry();
    if (!st) return st;
    // The restart is recorded: staging files made anew may replace old ones.
    for (auto& v : volumes_) {
      st = v->commit_staging();
      if (!st) return st.with_context("volume " + v->name());
    }
  }
  started_ = true;
  return Status::ok();
}

Status Engine::stop() {
  if (!started_) return Status::ok();
  started_ = false;
  std::lock_guard lk(mu_);
  Status first;
  auto keep = [&](Status s) {
    if (first && !s) first = s;
  };
  for (auto& v : volumes()) v->drain_stores();  // before storage and logs are synced
  for (auto& [id, e] : snapshots_) {
    keep(e.snapshot->storage().flush());
    for (auto& [vol, part] : e.parts) keep(part->log.sync());
    e.snapshot->events().close();
  }
  for (auto& v : volumes()) {
    keep(v->flush());
    keep(v->cbt().close());
    // Every copy is stored: the staging file holds nothing needed any more.
    if (!staging_prefix_.empty()) ::unlink(staging_path(v->name()).c_str());
  }
  if (!options_.state_dir.empty()) {
    keep(save_registry());
    // Clean only if everything above made it to disk.
    if (first && ::unlink((options_.state_dir + "/in-use").c_str()) != 0)
      keep(Status::from_errno("state: remove in-use marker"));
  }
  return first;
}

// ---------------------------------------------------------------- registry

Status Engine::save_registry(const PendingTake* pending) {
  if (options_.state_dir.empty()) return Status::ok();
  state::Registry reg;
  reg.set_sequence(pending ? pending->sequence + 1 : sequence_.load());
  reg.set_next_take_order(pending ? pending->take_order + 1 : next_take_order_);
  for (const auto& [id, e] : snapshots_) {
    const Snapshot& s = *e.snapshot;
    auto* r = reg.add_snapshots();
    r->set_id(s.id().raw());
    r->set_name(s.name());
    for (const auto& v : s.volumes()) r->add_volumes(v);
    r->set_state(static_cast<uint32_t>(s.state()));
    r->set_sequence(s.sequence());
    Status err = s.error();
    r->set_error_code(err.code());
    r->set_error(err.message());
    for (const auto& range : s.storage().ranges()) {
      auto* sr = r->add_storage();
      sr->set_path(range.path);
      sr->set_offset(range.offset);
      sr->set_length(range.length);
    }
    r->set_storage_limit(s.storage_limit());
    r->set_destroyed(s.destroyed.load());
    r->set_take_order(s.take_order());
    if (pending && pending->snapshot == &s) {
      r->set_state(static_cast<uint32_t>(SnapshotState::kTaken));
      r->set_sequence(pending->sequence);
      r->set_take_order(pending->take_order);
    }
  }
  std::string payload;
  if (!reg.SerializeToString(&payload)) return Status::error(EIO, "save registry: serialize");
  std::string data(kRegistryHeader, '\0');
  std::memcpy(data.data(), kRegistryMagic, 8);
  uint32_t version = kRegistryVersion, length = static_cast<uint32_t>(payload.size());
  uint32_t crc = crc32c(payload.data(), payload.size());
  std::memcpy(data.data() + 8, &version, 4);
  std::memcpy(data.data() + 12, &length, 4);
  std::memcpy(data.data() + 16, &crc, 4);
  data += payload;
  return write_file_atomic(options_.state_dir + "/registry", data).with_context("save registry");
}

Status Engine::load_registry() {
  const std::string path = options_.state_dir + "/registry";
  auto data = read_file(path);
  if (!data) {
    if (data.status().code() != ENOENT) return data.status();
    // No registry: the sequence is unknown, so no older stamp can be trusted.
    for (auto& v : volumes_) {
      if (!v->cbt_reset_reason().empty()) continue;
      v->cbt().reset();
      note("volume " + v->name() + ": new CBT generation " + v->cbt().generation().str() +
           ": registry missing");
    }
    return Status::ok();
  }
  const std::string& d = *data;
  uint32_t version = 0, length = 0, crc = 0;
  if (d.size() >= kRegistryHeader) {
    std::memcpy(&version, d.data() + 8, 4);
    std::memcpy(&length, d.data() + 12, 4);
    std::memcpy(&crc, d.data() + 16, 4);
  }
  if (d.size() < kRegistryHeader || std::memcmp(d.data(), kRegistryMagic, 8) != 0)
    return Status::error(EBADMSG, "load registry " + path + ": not an nbdsnap registry");
  if (version != kRegistryVersion)
    return Status::error(EBADMSG, "load registry " + path + ": format version " + std::to_string(version) +
                                      " is not supported (this build reads version 1)");
  if (d.size() - kRegistryHeader != length || crc32c(d.data() + kRegistryHeader, length) != crc)
    return Status::error(EBADMSG, "load registry " + path + ": checksum mismatch (damaged file)");
  state::Registry reg;
  if (!reg.ParseFromArray(d.data() + kRegistryHeader, static_cast<int>(length)))
    return Status::error(EBADMSG, "load registry " + path + ": cannot parse");
  sequence_ = static_cast<uint32_t>(std::max<uint64_t>(1, reg.sequence()));
  next_take_order_ = std::max<uint64_t>(1, reg.next_take_order());

  std::map<std::string, std::vector<std::shared_ptr<SnapshotPart>>> chains;
  for (const auto& r : reg.snapshots()) {
    auto id = Uuid::from_bytes(r.id());
    if (!id) return Status::error(EBADMSG, "load registry: bad snapshot id");
    std::vector<std::string> vols(r.volumes().begin(), r.volumes().end());
    auto snap = std::make_shared<Snapshot>(*id, r.name(), vols, new_storage(), r.storage_limit(),
                                           options_.params, volumes_bytes(vols));
    std::string ctx = "snapshot " + id->str();
    Status problem;
    for (const auto& sr : r.storage()) {
      Status st = snap->storage().append(StorageRange{sr.path(), sr.offset(), sr.length()});
      if (!st && problem) problem = st.with_context("difference storage unavailable");
    }
    auto state = static_cast<SnapshotState>(r.state());
    Status err = r.error_code() ? Status::error(r.error_code(), r.error()) : Status::ok();
    snap->restore(state, r.sequence(), r.take_order(), err);
    snap->destroyed = r.destroyed();
    Entry entry{snap, {}};
    if (r.take_order() != 0) {
      uint64_t end_unit = 0, used = 0, copied = 0;
      for (const auto& vname : vols) {
        auto v = volume(vname);
        if (!v) {
          if (problem) problem = Status::error(ENOENT, "volume " + vname + " is no longer configured");
          continue;
        }
        auto part = std::make_shared<SnapshotPart>(snap, vname);
        part->hidden = r.destroyed();
        auto count_slot = [&](uint32_t slot, uint32_t length) {
          end_unit = std::max<uint64_t>(end_unit, slot + (length + kStorageUnit - 1) / kStorageUnit);
          used += length;
        };
        std::map<uint32_t, LogRecord> staged;  // chunk -> its open kStaged record
        Status st = part->log.replay(snapshot_dir(*id) + "/" + vname + ".log", [&](const LogRecord& rec) {
          switch (rec.type) {
            case LogType::kChunk:
              part->chunks.insert(rec.key, rec.value);
              staged.erase(rec.key);
              ++copied;
              if (rec.value != kZeroSlot) count_slot(rec.value, rec.length);
              break;
            case LogType::kStaged:
              staged[rec.key] = rec;
              break;
            case LogType::kCbtStamp:
              part->saved_stamps.insert(rec.key, rec.value);
              break;
            case LogType::kCorrupted:
              snap->corrupt(vname, Status::from_errno("copy-before-write (recorded before restart)",
                                                      static_cast<int>(rec.value)));
              break;
          }
        });
        // Copies staged but not stored when the process stopped: their
        // origin writes may have happened, so store them now from the
        // staging file (a corrupted snapshot needs none).
        if (st && snap->healthy())
          for (const auto& [chunk, rec] : staged) {
            count_slot(rec.value, rec.length);
            Status rs = v->restore_staged(*part, ChunkIndex(chunk), rec.value, rec.entry, rec.length);
            if (!rs) {
              st = rs.with_context("volume " + vname);
              break;
            }
            ++copied;
            note(ctx + ": volume " + vname + ": stored the copy of chunk " + std::to_string(chunk) +
                 " staged before the crash");
          }
        if (!st && problem) problem = st;
        entry.parts[vname] = part;
        chains[vname].push_back(part);
      }
      snap->storage().restore_allocation(end_unit, used);
      snap->chunks_copied = copied;
    }
    if (!problem) {
      snap->corrupt("", problem.with_context("restart"));
      note(ctx + ": corrupted at restart: " + problem.message());
    }
    snapshots_.emplace(*id, std::move(entry));
  }
  for (auto& v : volumes_) {
    auto& chain = chains[v->name()];
    std::sort(chain.begin(), chain.end(), [](const auto& a, const auto& b) {
      return a->snapshot->take_order() < b->snapshot->take_order();
    });
    v->restore_chain(chain);
  }
  return Status::ok();
}

// ----------------------------------------------------------------- exports

std::vector<std::shared_ptr<Volume>> Engine::volumes() const {
  std::shared_lock lk(volumes_mu_);
  return volumes_;
}

std::shared_ptr<Volume> Engine::volume(const std::string& name) const {
  std::shared_lock lk(volumes_mu_);
  for (const auto& v : volumes_)
    if (v->name() == name) return v;
  return nullptr;
}

Result<ExportRef> Engine::open_export(const std::string& name) const {
  auto at = name.find('@');
  if (at == std::string::npos) {
    auto v = volume(name);
    if (!v) return Status::error(ENOENT, "open: no export named \"" + name + "\"");
    return ExportRef{v, nullptr};
  }
  std::string vname = name.substr(0, at), label = name.substr(at + 1);
  auto v = volume(vname);
  std::lock_guard lk(mu_);
  for (const auto& [id, e] : snapshots_) {
    const Snapshot& s = *e.snapshot;
    if (s.destroyed || (s.name() != label && s.id().str() != label)) continue;
    auto it = e.parts.find(vname);
    if (v && it != e.parts.end()) return ExportRef{v, it->second};
  }
  return Status::error(ENOENT, "open: no export named \"" + name + "\"");
}

std::vector<std::string> Engine::export_names() const {
  std::vector<std::string> out;
  for (const auto& v : volumes()) out.push_back(v->name());
  std::lock_guard lk(mu_);
  std::vector<const Entry*> taken;
  for (const auto& [id, e] : snapshots_)
    if (!e.snapshot->destroyed && !e.parts.empty()) taken.push_back(&e);
  std::sort(taken.begin(), taken.end(), [](const Entry* a, const Entry* b) {
    return a->snapshot->take_order() < b->snapshot->take_order();
  });
  for (const Entry* e : taken)
    for (const auto& [vol, part] : e->parts) out.push_back(vol + "@" + e->snapshot->label());
  return out;
}

Status Engine::add_volume(const std::string& name, const std::string& path) {
  Status st = check_name("volume", name);
  if (!st) return st.with_context("volume add");
  if (path.empty() || path[0] != '/')
    return Status::error(EINVAL, "volume add " + name + ": path must be absolute");
  std::lock_guard lk(mu_);
  if (volume(name)) return Status::error(EEXIST, "volume add: volume \"" + name + "\" exists");
  auto me = identify(path);
  if (!me) return Status::from_errno("volume add " + name + ": " + path);
  for (const auto& v : volumes()) {
    auto o = identify(v->path());
    if (o && same_file(*o, *me))
      return Status::error(EINVAL, "volume add " + name + ": " + path + " is already volume " + v->name());
  }
  for (const auto& [id, e] : snapshots_)
    for (const auto& used : e.snapshot->storage().ranges()) {
      auto o = identify(used.path);
      if (o && same_file(*o, *me))
        return Status::error(EBUSY, "volume add " + name + ": " + path +
                                        " holds difference storage of snapshot " + e.snapshot->label());
    }
  // A new volume has no history: start its CBT map afresh.
  if (!options_.state_dir.empty()) ::unlink(cbt_path(name).c_str());
  if (!options_.state_dir.empty()) ::unlink(staging_path(name).c_str());
  auto v = Volume::open(name, path, options_.params, cbt_path(name), staging_path(name), &sequence_);
  if (!v) return v.status().with_context("volume add");
  st = (*v)->commit_staging();
  if (!st) return st.with_context("volume add " + name);
  std::unique_lock wl(volumes_mu_);
  volumes_.push_back(std::shared_ptr<Volume>(std::move(*v)));
  return Status::ok();
}

Status Engine::remove_volume(const std::string& name) {
  std::lock_guard lk(mu_);
  auto v = volume(name);
  if (!v) return Status::error(ENOENT, "volume remove: no such volume \"" + name + "\"");
  for (const auto& [id, e] : snapshots_) {
    const auto& vols = e.snapshot->volumes();
    if (std::find(vols.begin(), vols.end(), name) != vols.end())
      return Status::error(EBUSY, "volume remove " + name + ": used by snapshot " + e.snapshot->label() +
                                      (e.snapshot->destroyed ? " (destroyed, kept for an older snapshot)"
                                                             : " (destroy it first)"));
  }
  {
    std::unique_lock wl(volumes_mu_);
    volumes_.erase(std::find(volumes_.begin(), volumes_.end(), v));
  }
  v->retire();
  Status st = v->flush();
  if (!options_.state_dir.empty()) {
    ::unlink(cbt_path(name).c_str());
    ::unlink(staging_path(name).c_str());
  }
  return st.with_context("volume remove " + name);
}

// --------------------------------------------------------------- snapshots

Result<std::shared_ptr<Snapshot>> Engine::find(const std::string& id, const char* op) const {
  auto uuid = Uuid::parse(id);
  for (const auto& [key, e] : snapshots_) {
    if (e.snapshot->destroyed) continue;
    if ((uuid && key == *uuid) || (!e.snapshot->name().empty() && e.snapshot->name() == id))
      return e.snapshot;
  }
  return Status::error(ENOENT, std::string(op) + ": no such snapshot \"" + id + "\"");
}

SnapshotInfo Engine::describe(const Entry& e) const {
  // Copies of the writes acknowledged so far count, stored or not yet: wait
  // for the few still on their way (at most chunk_maximum_in_queue).
  for (const auto& [vname, part] : e.parts)
    if (auto v = volume(vname)) v->drain_stores();
  const Snapshot& s = *e.snapshot;
  SnapshotInfo i;
  i.id = s.id();
  i.name = s.name();
  i.state = s.state();
  i.sequence = s.sequence();
  i.volumes = s.volumes();
  if (s.take_order() != 0)
    for (const auto& v : s.volumes()) i.exports.push_back(v + "@" + s.label());
  i.error = s.error();
  i.storage = s.storage().usage();
  i.storage_limit = s.storage_limit();
  i.chunks_copied = s.chunks_copied.load();
  for (const auto& [volume, part] : e.parts) {
    i.chunk_table_bytes += part->chunks.memory_bytes();
    i.saved_stamps_bytes += part->saved_stamps.memory_bytes();
  }
  return i;
}

Result<Uuid> Engine::create_snapshot(const std::vector<std::string>& vols, const std::string& name,
                                     uint64_t storage_limit) {
  if (vols.empty()) return Status::error(EINVAL, "create: no volume given");
  std::vector<std::string> sorted = vols;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
    return Status::error(EINVAL, "create: a volume is given twice");
  for (const auto& v : sorted)
    if (!volume(v)) return Status::error(ENOENT, "create: no such volume \"" + v + "\"");
  if (!name.empty()) {
    Status st = check_name("snapshot", name);
    if (!st) return st.with_context("create");
    if (Uuid::parse(name)) return Status::error(EINVAL, "create: a snapshot name must not look like a UUID");
  }
  std::lock_guard lk(mu_);
  if (!name.empty() && find(name, "create"))
    return Status::error(EEXIST, "create: snapshot name \"" + name + "\" is in use");
  Uuid id = Uuid::random();
  if (!options_.state_dir.empty()) {
    std::error_code ec;
    fs::create_directories(snapshot_dir(id), ec);
    if (ec) return Status::error(ec.value(), "create: " + snapshot_dir(id) + ": " + ec.message());
  }
  auto snap = std::make_shared<Snapshot>(id, name, sorted, new_storage(), storage_limit, options_.params,
                                         volumes_bytes(sorted));
  snapshots_.emplace(id, Entry{snap, {}});
  Status st = save_registry();
  if (!st) {
    snapshots_.erase(id);
    return st.with_context("create");
  }
  return id;
}

Status Engine::check_storage_range(const StorageRange& r, const Snapshot& s) const {
  std::string ctx = "append-storage " + r.path + " " + std::to_string(r.offset) + ":" + std::to_string(r.length);
  if (r.offset % kStorageUnit || r.length % kStorageUnit || r.length == 0)
    return Status::error(EINVAL, ctx + ": offset and length must be multiples of 4096 (length > 0)");
  // An empty path is memory storage (StorageRange): no file that could be an
  // origin or overlap another range. File storage itself rejects "" (open).
  if (r.path.empty()) return Status::ok();
  auto me = identify(r.path);
  if (!me) return Status::from_errno(ctx + ": stat");
  {
    int fd = ::open(r.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::from_errno(ctx + ": open");
    auto size = file_size(fd);
    ::close(fd);
    if (!size) return size.status().with_context(ctx);
    if (r.offset > *size || r.length > *size - r.offset)
      return Status::error(EINVAL, ctx + ": beyond the end of the file (size " + std::to_string(*size) + ")");
  }
  for (const auto& v : volumes()) {
    auto o = identify(v->path());
    if (o && same_file(*o, *me))
      return Status::error(EINVAL, ctx + ": this is the origin of volume " + v->name());
  }
  for (const auto& [id, e] : snapshots_) {
    for (const auto& used : e.snapshot->storage().ranges()) {
      auto o = identify(used.path);
      if (!o || !same_file(*o, *me)) continue;
      if (r.offset < used.offset + used.length && used.offset < r.offset + r.length)
        return Status::error(EBUSY, ctx + ": overlaps " + std::to_string(used.offset) + ":" +
                                        std::to_string(used.length) + " in use by snapshot " +
                                        (e.snapshot.get() == &s ? "itself" : e.snapshot->label()));
    }
  }
  return Status::ok();
}

Status Engine::append_storage(const std::string& id, const std::vector<StorageRange>& ranges) {
  if (ranges.empty()) return Status::error(EINVAL, "append-storage: no range given");
  std::lock_guard lk(mu_);
  auto s = find(id, "append-storage");
  if (!s) return s.status();
  Snapshot& snap = **s;
  if (snap.state() == SnapshotState::kCorrupted)
    return Status::error(EINVAL, "append-storage: snapshot " + snap.label() + " is corrupted");
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto& r = ranges[i];
    for (size_t j = 0; j < i; ++j)
      if (ranges[j].path == r.path && r.offset < ranges[j].offset + ranges[j].length &&
          ranges[j].offset < r.offset + r.length)
        return Status::error(EBUSY, "append-storage: ranges " + std::to_string(i) + " and " +
                                        std::to_string(j) + " overlap");
  }
  // Check every range before appending any: a request is all or nothing.
  for (const auto& r : ranges) {
    Status st = check_storage_range(r, snap);
    if (!st) return st;
  }
  // Zeros first, while no copy can land in these ranges yet (restart
  // re-appends ranges from the registry without this: they hold slots).
  if (options_.params.diff_storage_zero_fill)
    for (const auto& r : ranges) {
      Status st = snap.storage().zero_fill(r);
      if (!st) return st;
    }
  for (const auto& r : ranges) {
    Status st = snap.storage().append(r);
    if (!st) {
      // Only a failure the checks cannot foresee gets here (open, fallocate):
      // keep what was appended, recorded, rather than lose track of it.
      (void)save_registry();
      return st;
    }
  }
  snap.storage_appended();
  return save_registry().with_context("append-storage");
}

Result<TakeResult> Engine::take(const std::string& id) {
  std::lock_guard lk(mu_);
  auto s = find(id, "take");
  if (!s) return s.status();
  auto snap = *s;
  std::string ctx = "take: snapshot " + snap->label();
  if (snap->state() == SnapshotState::kTaken) return Status::error(EALREADY, ctx + ": already taken");
  if (snap->state() == SnapshotState::kCorrupted)
    return Status::error(EIO, ctx + ": corrupted: " + snap->error().message());
  if (snap->storage().usage().capacity == 0)
    return Status::error(ENOSPC, ctx + ": no difference storage (append-storage first)");
  if (sequence_.load() >= 0xfffffff0u) return Status::error(EOVERFLOW, ctx + ": sequence numbers exhausted");

  std::vector<std::pair<std::shared_ptr<Volume>, std::shared_ptr<SnapshotPart>>> parts;
  for (const auto& vname : snap->volumes()) {  // sorted by name at create
    auto v = volume(vname);
    auto part = std::make_shared<SnapshotPart>(snap, vname);
    std::string log_path = options_.state_dir.empty() ? "" : snapshot_dir(snap->id()) + "/" + vname + ".log";
    Status st = part->log.create(log_path);
    if (!st) return st.with_context(ctx);
    parts.emplace_back(v, part);
  }

  // The registry records the take, durably, before the gates close, so the
  // pause holds no file system work. Restart treats the snapshot as taken
  // from this save on. A crash before the gates close leaves it taken at the
  // crash instead, crash-consistent like the origin after the restart (every
  // write before the crash copied for the older snapshots as usual): still
  // one point in time between the request and the reply, which never came.
  uint32_t closed = sequence_.load();
  PendingTake pending{snap.get(), closed, next_take_order_};
  // A failed save leaves the old file (write_file_atomic fails only up to
  // its rename) and nothing changed in memory: the snapshot stays created.
  if (Status saved = save_registry(&pending); !saved) return saved.with_context(ctx);
  if (options_.test_point) options_.test_point("take: recorded");

  // The pause counts from the first close: new writes wait from then on,
  // while the writes inside drain.
  auto t0 = std::chrono::steady_clock::now();
  for (auto& [v, part] : parts) v->gate().close();
  sequence_.store(closed + 1, std::memory_order_release);
  snap->set_taken(closed, next_take_order_++);
  Entry& entry = snapshots_.at(snap->id());
  for (auto& [v, part] : parts) {
    v->push_part(part);
    entry.parts[v->name()] = part;
  }
  for (auto& [v, part] : parts) v->gate().open();
  auto pause = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
  snap->check_free_space();
  return TakeResult{closed, static_cast<uint64_t>(pause.count())};
}

Result<SnapshotInfo> Engine::info(const std::string& id) const {
  std::lock_guard lk(mu_);
  auto s = find(id, "info");
  if (!s) return s.status();
  return describe(snapshots_.at((*s)->id()));
}

std::vector<SnapshotInfo> Engine::collect(bool include_retained) const {
  std::lock_guard lk(mu_);
  std::vector<SnapshotInfo> out;
  for (const auto& [id, e] : snapshots_) {
    if (!e.snapshot->destroyed) {
      out.push_back(describe(e));
    } else if (include_retained) {
      out.push_back(describe(e));
      out.back().retained = true;
      out.back().exports.clear();
    }
  }
  return out;
}

Result<std::optional<Event>> Engine::wait_event(const std::string& id, uint32_t timeout_ms) {
  std::shared_ptr<Snapshot> snap;
  {
    std::lock_guard lk(mu_);
    auto s = find(id, "wait-event");
    if (!s) return s.status();
    snap = *s;
  }
  auto e = snap->events().wait(timeout_ms);
  if (!e && snap->destroyed)
    return Status::error(ENOENT, "wait-event: snapshot " + snap->label() + " was destroyed");
  return e;
}

void Engine::interrupt_waits() {
  std::lock_guard lk(mu_);
  for (auto& [id, e] : snapshots_) e.snapshot->events().close();
}

void Engine::forget_dropped(const Chain& dropped) {
  for (const auto& part : dropped) {
    auto it = snapshots_.find(part->snapshot->id());
    if (it == snapshots_.end()) continue;
    it->second.parts.erase(part->volume);
    if (it->second.parts.empty() && it->second.snapshot->destroyed) {
      if (!options_.state_dir.empty()) {
        std::error_code ec;
        fs::remove_all(snapshot_dir(it->first), ec);
      }
      snapshots_.erase(it);
    }
  }
}

Status Engine::destroy(const std::string& id) {
  std::lock_guard lk(mu_);
  auto s = find(id, "destroy");
  if (!s) return s.status();
  auto snap = *s;
  snap->destroyed = true;
  snap->events().close();
  Entry& entry = snapshots_.at(snap->id());
  if (entry.parts.empty()) {  // never taken
    if (!options_.state_dir.empty()) {
      std::error_code ec;
      fs::remove_all(snapshot_dir(snap->id()), ec);
    }
    snapshots_.erase(snap->id());
  } else {
    auto parts = entry.parts;  // forget_dropped may erase the entry
    for (auto& [vname, part] : parts) {
      auto v = volume(vname);
      v->gate().close();
      // No copy may land in this snapshot's storage once destroy returns
      // (its ranges may be reused): wait for the staged ones.
      v->drain_stores();
      Chain dropped = v->hide_part(part.get());
      v->gate().open();
      forget_dropped(dropped);
    }
  }
  return save_registry().with_context("destroy");
}

// ----------------------------------------------------------- change tracking

Result<CbtInfo> Engine::cbt_info(const std::string& name) const {
  auto v = volume(name);
  if (!v) return Status::error(ENOENT, "cbt info: no such volume \"" + name + "\"");
  const Geometry& g = v->geometry();
  return CbtInfo{v->cbt().generation(), sequence_.load(), g.cbt_block_size(), g.cbt_block_count(), g.size()};
}

Result<std::vector<uint32_t>> Engine::cbt_map(const std::string& name, const std::string& snapshot,
                                              uint64_t first, uint64_t count) {
  auto v = volume(name);
  if (!v) return Status::error(ENOENT, "cbt map: no such volume \"" + name + "\"");
  std::shared_ptr<SnapshotPart> part;
  if (!snapshot.empty()) {
    auto ref = open_export(name + "@" + snapshot);
    if (!ref) {
      std::lock_guard lk(mu_);
      auto s = find(snapshot, "cbt map");
      if (!s) return s.status();
      return Status::error(EINVAL, "cbt map: snapshot " + snapshot + " is not taken or does not cover " + name);
    }
    part = ref->part;
  }
  return v->cbt_stamps(part.get(), first, count);
}

Result<CbtChanges> Engine::cbt_changes(const std::string& name, const std::string& generation,
                                       uint64_t since, const std::string& snapshot) {
  auto v = volume(name);
  if (!v) return Status::error(ENOENT, "cbt changes: no such volume \"" + name + "\"");
  auto gen = Uuid::parse(generation);
  if (!gen) return Status::error(EINVAL, "cbt changes: \"" + generation + "\" is not a generation UUID");
  if (*gen != v->cbt().generation())
    return Status::error(ESTALE, "cbt changes: generation " + generation + " is not the current one (" +
                                     v->cbt().generation().str() + "): history was reset, take a full backup");
  std::shared_ptr<SnapshotPart> part;
  if (!snapshot.empty()) {
    auto ref = open_export(name + "@" + snapshot);
    if (!ref) return Status::error(ENOENT, "cbt changes: no taken snapshot \"" + snapshot + "\" of " + name);
    part = ref->part;
  }
  auto ranges = v->cbt_changes(part.get(), since);
  if (!ranges) return ranges.status();
  CbtChanges out{v->cbt().generation(), part ? part->snapshot->sequence() : sequence_.load(), std::move(*ranges), 0};
  for (const auto& r : out.ranges) out.changed_bytes += r.length;
  return out;
}

Status Engine::mark_dirty(const std::string& name, const std::vector<ByteRange>& ranges) {
  auto v = volume(name);
  if (!v) return Status::error(ENOENT, "mark-dirty: no such volume \"" + name + "\"");
  for (const auto& r : ranges)
    if (!v->geometry().contains(r.offset, r.length))
      return Status::error(EINVAL, "mark-dirty: range " + std::to_string(r.offset) + ":" +
                                       std::to_string(r.length) + " beyond the end of " + name);
  for (const auto& r : ranges) {
    Status st = v->mark_dirty(r.offset, r.length);
    if (!st) return st;
  }
  return Status::ok();
}

}  // namespace nbdsnap
