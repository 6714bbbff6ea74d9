#include "service.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "engine.h"

namespace nbdsnap::daemon {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::atomic<bool> g_timestamps{false};

uint64_t round_up(uint64_t v, uint64_t unit) { return unit == 0 ? v : (v + unit - 1) / unit * unit; }

std::string uri_escape(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '/') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string bytes_text(uint64_t n) { return std::to_string(n) + " bytes"; }

// Reserves [offset, offset+length) of an open file (blocks allocated now,
// so that a full file system fails here and not in a copy later).
Status allocate_range(int fd, const std::string& path, uint64_t offset, uint64_t length) {
  if (::fallocate(fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return Status::ok();
  int e = errno;
  if (e == EOPNOTSUPP) {  // file system without fallocate: extend only
    struct stat st;
    if (::fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) >= offset + length) return Status::ok();
    if (::ftruncate(fd, static_cast<off_t>(offset + length)) == 0) return Status::ok();
    e = errno;
  }
  return Status::error(e, "allocate " + bytes_text(length) + " at offset " + std::to_string(offset) + " of " + path +
                              ": " + std::strerror(e));
}

bool same_file(const std::string& a, const struct stat& b) {
  struct stat sa;
  return ::stat(a.c_str(), &sa) == 0 && sa.st_dev == b.st_dev && sa.st_ino == b.st_ino;
}

void block_signals() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
}

const char* event_name(link::EventCode c) {
  switch (c) {
    case link::LOW_FREE_SPACE: return "low-free-space";
    case link::NO_SPACE: return "no-space";
    case link::CORRUPTED_EVENT: return "corrupted";
    default: return "unknown";
  }
}

}  // namespace

// ------------------------------------------------------------------ misc

Paths::Paths(const std::string& dir)
    : state_dir(dir),
      data_dir(dir + "/data"),
      link_socket(dir + "/link.sock"),
      storage_dir(dir + "/storage"),
      registry(dir + "/nbdsnapd.registry"),
      log(dir + "/nbdsnapd.log"),
      lock(dir + "/nbdsnapd.lock") {}

void set_log_timestamps(bool on) { g_timestamps = on; }

void log_raw(const std::string& text) {
  std::string line;
  if (g_timestamps) {
    std::time_t t = std::time(nullptr);
    std::tm tm;
    localtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S ", &tm);
    line = buf;
  }
  line += text + "\n";
  (void)!::write(2, line.data(), line.size());
}

void log_line(const std::string& message) { log_raw("nbdsnapd: " + message); }

// ------------------------------------------------------------------ EventHub

void EventHub::set_notify(std::function<void(const std::string&)> fn) {
  std::lock_guard lk(mu_);
  notify_ = std::move(fn);
}

void EventHub::notify(const std::string& id) {
  std::function<void(const std::string&)> fn;
  {
    std::lock_guard lk(mu_);
    fn = notify_;
  }
  if (fn) fn(id);
}

bool EventHub::add(const std::string& id, const std::string& name) {
  std::lock_guard lk(mu_);
  auto [it, inserted] = histories_.try_emplace(id);
  it->second.name = name;
  return inserted;
}

void EventHub::remove(const std::string& id) {
  bool erased;
  {
    std::lock_guard lk(mu_);
    erased = histories_.erase(id) > 0;
  }
  if (erased) notify(id);
}

void EventHub::append(const std::string& id, const link::Event& event) {
  {
    std::lock_guard lk(mu_);
    auto it = histories_.find(id);
    if (it == histories_.end()) return;
    auto& h = it->second;
    h.events.push_back(event);
    if (h.events.size() > kMaxEvents) {
      h.events.pop_front();
      ++h.base;
    }
  }
  notify(id);
}

std::optional<std::string> EventHub::resolve(const std::string& key) const {
  std::lock_guard lk(mu_);
  if (histories_.count(key)) return key;
  for (const auto& [id, h] : histories_)
    if (!h.name.empty() && h.name == key) return id;
  return std::nullopt;
}

EventHub::Next EventHub::next(const std::string& id, uint64_t* cursor, link::Event* out) const {
  std::lock_guard lk(mu_);
  auto it = histories_.find(id);
  if (it == histories_.end()) return Next::kGone;
  const auto& h = it->second;
  if (*cursor < h.base) *cursor = h.base;  // older events were dropped
  if (*cursor >= h.base + h.events.size()) return Next::kNone;
  *out = h.events[*cursor - h.base];
  ++*cursor;
  return Next::kEvent;
}

std::vector<std::string> EventHub::ids() const {
  std::lock_guard lk(mu_);
  std::vector<std::string> out;
  for (const auto& [id, h] : histories_) out.push_back(id);
  return out;
}

// ------------------------------------------------------------------ Service

Service::Service(const Options& options, const Paths& paths, Registry* registry)
    : options_(options), paths_(paths), registry_(registry), pump_sets_(kPumps) {}

Service::~Service() { stop_pumps(); }

void Service::set_endpoints(const std::string& tcp_host, const std::string& tcp_port) {
  tcp_host_ = tcp_host;
  tcp_port_ = tcp_port;
}

void Service::set_data_plane_up(bool up) {
  {
    std::lock_guard lk(pool_mu_);
    ++epoch_;
    up_ = up;
    idle_.clear();
  }
  pump_cv_.notify_all();
}

bool Service::is_transport_error(const Status& st) const {
  const std::string& m = st.message();
  const std::string& p = paths_.link_socket;
  return m.rfind("request to " + p, 0) == 0 || m.rfind("reply from " + p, 0) == 0 ||
         m.rfind("connect " + p, 0) == 0 || m.rfind("request: not connected", 0) == 0;
}

Status Service::transport_error(const std::string& op, const Status& st) const {
  return Status::error(EAGAIN, op + ": data plane restarting (" + st.message() + "); retry shortly");
}

Result<link::Response> Service::call(const std::string& op, const link::Request& req, LinkClient* own) {
  if (own) {
    auto r = own->call(req);
    if (!r && is_transport_error(r.status())) return transport_error(op, r.status());
    return r;
  }
  if (!up_) return Status::error(EAGAIN, op + ": data plane restarting; retry shortly");
  uint64_t epoch = epoch_;
  std::unique_ptr<LinkClient> client;
  {
    std::lock_guard lk(pool_mu_);
    while (!idle_.empty() && !client) {
      Pooled p = std::move(idle_.back());
      idle_.pop_back();
      if (p.epoch == epoch) client = std::move(p.client);
    }
  }
  if (!client) {
    client = std::make_unique<LinkClient>();
    Status st = client->connect(paths_.link_socket);
    if (!st) return transport_error(op, st);
  }
  auto r = client->call(req);
  if (!r && is_transport_error(r.status())) return transport_error(op, r.status());
  {
    std::lock_guard lk(pool_mu_);
    if (epoch == epoch_ && idle_.size() < 8) idle_.push_back(Pooled{std::move(client), epoch});
  }
  return r;
}

std::vector<std::string> Service::volume_args() const {
  std::lock_guard lk(reg_mu_);
  std::vector<std::string> out;
  for (const auto& [name, path] : registry_->volumes) out.push_back("volume=" + name + "=" + path);
  return out;
}

Status Service::save_registry() { return registry_->save(); }

Status Service::persist() {
  std::lock_guard lk(reg_mu_);
  return save_registry();
}

std::vector<std::string> Service::uris(const std::string& export_name) const {
  std::string scheme = options_.tls_psk.empty() ? "nbd" : "nbds";
  std::vector<std::string> out;
  out.push_back(scheme + "+unix:///" + export_name + "?socket=" + uri_escape(options_.nbd_socket));
  if (!tcp_port_.empty()) out.push_back(scheme + "://" + tcp_host_ + ":" + tcp_port_ + "/" + export_name);
  return out;
}

void Service::fill_volume(api::Volume* out, const link::VolumeInfo& v) const {
  out->set_name(v.name());
  out->set_path(v.path());
  out->set_size(v.size());
  out->set_chunk_size(v.chunk_size());
  out->set_cbt_block_size(v.cbt_block_size());
  for (const auto& u : uris(v.name())) out->add_uris(u);
}

void Service::fill_snapshot(api::Snapshot* out, const link::SnapshotInfo& s) const {
  out->set_id(s.id());
  out->set_name(s.name());
  out->set_state(static_cast<api::SnapshotState>(s.state()));
  out->set_sequence(s.sequence());
  for (const auto& v : s.volumes()) out->add_volumes(v);
  for (const auto& e : s.exports()) {
    out->add_exports(e);
    for (const auto& u : uris(e)) out->add_uris(u);
  }
  out->set_error_code(s.error_code());
  out->set_error(s.error());
  out->set_storage_capacity(s.storage_capacity());
  out->set_storage_used(s.storage_used());
  out->set_storage_limit(s.storage_limit());
  out->set_chunks_copied(s.chunks_copied());
  std::lock_guard lk(reg_mu_);
  if (const ManagedFile* m = registry_->managed(s.id())) out->set_storage_path(m->path);
}

// ------------------------------------------------------------------ requests

api::Response Service::handle(const api::Request& req) {
  api::Response resp;
  resp.set_tag(req.tag());
  Status st;
  try {
    switch (req.op_case()) {
      case api::Request::kVolumeAdd: st = volume_add(req.volume_add(), resp.mutable_volume_add()); break;
      case api::Request::kVolumeList: st = volume_list(resp.mutable_volume_list()); break;
      case api::Request::kVolumeRemove:
        st = volume_remove(req.volume_remove());
        if (st) resp.mutable_volume_remove();
        break;
      case api::Request::kSnapshotCreate:
        st = snapshot_create(req.snapshot_create(), resp.mutable_snapshot_create());
        break;
      case api::Request::kAppendStorage:
        st = append_storage(req.append_storage());
        if (st) resp.mutable_append_storage();
        break;
      case api::Request::kTake: st = take(req.take(), resp.mutable_take()); break;
      case api::Request::kSnapshotList: st = snapshot_list(resp.mutable_snapshot_list()); break;
      case api::Request::kSnapshotInfo:
        st = snapshot_info("snapshot info", req.snapshot_info().id(),
                           resp.mutable_snapshot_info()->mutable_snapshot());
        break;
      case api::Request::kDestroy:
        st = destroy(req.destroy());
        if (st) resp.mutable_destroy();
        break;
      case api::Request::kCbtInfo: st = cbt_info(req.cbt_info(), resp.mutable_cbt_info()); break;
      case api::Request::kCbtMap: st = cbt_map(req.cbt_map(), resp.mutable_cbt_map()); break;
      case api::Request::kCbtChanges: st = cbt_changes(req.cbt_changes(), resp.mutable_cbt_changes()); break;
      case api::Request::kCbtMarkDirty:
        st = cbt_mark_dirty(req.cbt_mark_dirty());
        if (st) resp.mutable_cbt_mark_dirty();
        break;
      default:
        st = Status::error(ENOTSUP, "request: unknown request type (client newer than nbdsnapd " NBDSNAP_VERSION "?)");
        break;
    }
  } catch (const std::bad_alloc&) {
    st = Status::error(ENOMEM, "request: out of memory");
  } catch (const std::exception& e) {
    st = Status::error(EIO, std::string("request: ") + e.what());
  }
  if (!st) {
    resp.clear_reply();
    resp.set_error_code(st.code());
    resp.set_error(st.message());
  }
  return resp;
}

Status Service::volume_add(const api::VolumeAddRequest& q, api::VolumeAddReply* r) {
  const std::string op = "volume add";
  Status st = check_name("volume", q.name());
  if (!st) return st.with_context(op);
  if (q.path().empty() || q.path()[0] != '/')
    return Status::error(EINVAL, op + " " + q.name() + ": path \"" + q.path() + "\" must be absolute");
  {
    std::lock_guard lk(reg_mu_);
    if (registry_->volume_path(q.name()))
      return Status::error(EEXIST, op + ": volume \"" + q.name() + "\" exists");
    struct stat st_new;
    if (::stat(q.path().c_str(), &st_new) == 0)
      for (const auto& [id, m] : registry_->storage)
        if (same_file(m.path, st_new))
          return Status::error(EBUSY, op + " " + q.name() + ": " + q.path() +
                                          " is managed difference storage of snapshot " + id);
  }
  link::Request lq;
  lq.mutable_add_volume()->set_name(q.name());
  lq.mutable_add_volume()->set_path(q.path());
  auto lr = call(op, lq);
  if (!lr) return lr.status();
  {
    std::lock_guard lk(reg_mu_);
    registry_->volumes.emplace_back(q.name(), q.path());
    st = save_registry();
    if (!st) registry_->volumes.pop_back();
  }
  if (!st) {
    link::Request undo;
    undo.mutable_remove_volume()->set_name(q.name());
    (void)call(op + " (undo)", undo);
    return st.with_context(op + " " + q.name());
  }
  log_line("volume " + q.name() + " added: " + q.path());
  fill_volume(r->mutable_volume(), lr->add_volume().volume());
  return Status::ok();
}

Status Service::volume_list(api::VolumeListReply* r) {
  link::Request lq;
  lq.mutable_list_volumes();
  auto lr = call("volume list", lq);
  if (!lr) return lr.status();
  for (const auto& v : lr->list_volumes().volumes()) fill_volume(r->add_volumes(), v);
  return Status::ok();
}

Status Service::volume_remove(const api::VolumeRemoveRequest& q) {
  const std::string op = "volume remove";
  link::Request lq;
  lq.mutable_remove_volume()->set_name(q.name());
  auto lr = call(op, lq);
  if (!lr) return lr.status();
  std::lock_guard lk(reg_mu_);
  auto& vols = registry_->volumes;
  auto it = std::find_if(vols.begin(), vols.end(), [&](const auto& v) { return v.first == q.name(); });
  if (it == vols.end()) return Status::ok();
  auto saved = *it;
  size_t pos = static_cast<size_t>(it - vols.begin());
  vols.erase(it);
  Status st = save_registry();
  if (!st) {
    vols.insert(vols.begin() + static_cast<long>(pos), saved);
    return st.with_context(op + " " + q.name() + " (the volume is no longer served, but the registry still has it)");
  }
  log_line("volume " + q.name() + " removed");
  return Status::ok();
}

Status Service::snapshot_create(const api::SnapshotCreateRequest& q, api::SnapshotCreateReply* r) {
  const std::string op = "snapshot create";
  if (q.volumes().empty()) return Status::error(EINVAL, op + ": no volume given");
  std::string path = q.storage_path();
  const bool user_path = !path.empty();
  if (user_path) {
    if (path[0] != '/') return Status::error(EINVAL, op + ": storage path \"" + path + "\" must be absolute");
    if (path.back() == '/')
      return Status::error(EINVAL, op + ": storage path " + path + " names a directory; give a new file's name");
    path = fs::path(path).lexically_normal().string();
    std::string parent = fs::path(path).parent_path().string();
    struct stat st;
    if (::stat(parent.c_str(), &st) != 0) {
      int e = errno;
      if (e == ENOENT) return Status::error(ENOENT, op + ": storage directory " + parent + " does not exist");
      return Status::error(e, op + ": storage directory " + parent + ": " + std::strerror(e));
    }
    if (!S_ISDIR(st.st_mode)) return Status::error(ENOTDIR, op + ": " + parent + " is not a directory");
    if (::lstat(path.c_str(), &st) == 0) {
      std::lock_guard lk(reg_mu_);
      for (const auto& [name, vpath] : registry_->volumes)
        if (same_file(vpath, st))
          return Status::error(EINVAL, op + ": storage path " + path + " is the origin of volume " + name);
      for (const auto& [id, m] : registry_->storage)
        if (same_file(m.path, st))
          return Status::error(EBUSY, op + ": storage path " + path + " is difference storage of snapshot " + id);
      return Status::error(EEXIST, op + ": storage file " + path +
                                       " exists (managed storage must be a new file; use append-storage for existing files)");
    }
  }

  // Sizes of the volumes: the default limit and the growth step.
  link::Request lv;
  lv.mutable_list_volumes();
  auto vols = call(op, lv);
  if (!vols) return vols.status();
  uint64_t total = 0, chunk_max = 4096;
  std::set<uint64_t> chunk_sizes;
  for (const auto& name : q.volumes()) {
    const link::VolumeInfo* found = nullptr;
    for (const auto& v : vols->list_volumes().volumes())
      if (v.name() == name) found = &v;
    if (!found) return Status::error(ENOENT, op + ": no such volume \"" + name + "\"");
    total += round_up(found->size(), std::max<uint64_t>(found->chunk_size(), 4096));
    chunk_max = std::max<uint64_t>(chunk_max, found->chunk_size());
    chunk_sizes.insert(found->chunk_size());
  }
  // Steps are whole chunks, so no slot is lost at a range's end.
  const uint64_t step = round_up(std::max<uint64_t>(options_.diff_storage_minimum_bytes, 4096), chunk_max);
  uint64_t limit;
  if (q.storage_limit() != 0) {
    limit = q.storage_limit() / 4096 * 4096;
    if (limit == 0)
      return Status::error(EINVAL, op + ": storage limit " + std::to_string(q.storage_limit()) + " is below 4 KiB");
  } else {
    limit = total;
    // Chunks of different sizes may leave a gap at the end of each step.
    if (chunk_sizes.size() > 1) limit += (total + step - 1) / step * chunk_max;
  }
  const uint64_t initial = std::min(step, limit);

  link::Request lc;
  for (const auto& v : q.volumes()) lc.mutable_create()->add_volumes(v);
  lc.mutable_create()->set_name(q.name());
  lc.mutable_create()->set_storage_limit(limit);
  auto created = call(op, lc);
  if (!created) return created.status();
  const std::string id = created->create().id();
  if (!user_path) path = paths_.storage_dir + "/" + id + ".diff";

  // Undo the data plane's snapshot (and our file) after a failure.
  auto undo = [&](bool file_created, const Status& why) {
    link::Request d;
    d.mutable_destroy()->set_id(id);
    auto dr = call(op + " (undo)", d);
    if (dr || dr.status().code() == ENOENT) {
      if (file_created) ::unlink(path.c_str());
      std::lock_guard lk(reg_mu_);
      if (registry_->storage.erase(id)) {
        Status s = save_registry();
        if (!s) log_line(s.message());
      }
    } else {
      log_line(op + ": could not undo snapshot " + id + " (" + dr.status().message() +
               "); it is destroyed when the data plane is back");
    }
    return why;
  };

  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    int e = errno;
    return undo(false, Status::error(e, op + ": create storage file " + path + ": " + std::strerror(e)));
  }
  {
    std::lock_guard lk(reg_mu_);
    ManagedFile m;
    m.id = id;
    m.path = path;
    m.limit = limit;
    m.size = initial;
    m.step = step;
    m.state = PENDING;
    registry_->storage[id] = m;
    Status s = save_registry();
    if (!s) {
      ::close(fd);
      registry_->storage.erase(id);
      ::unlink(path.c_str());
      // (registry lock held: undo the data plane only)
      link::Request d;
      d.mutable_destroy()->set_id(id);
      (void)call(op + " (undo)", d);
      return s.with_context(op);
    }
  }
  Status st = allocate_range(fd, path, 0, initial);
  ::close(fd);
  if (!st) return undo(true, st.with_context(op + ": difference storage"));

  link::Request la;
  la.mutable_append_storage()->set_id(id);
  la.mutable_append_storage()->set_path(path);
  auto* range = la.mutable_append_storage()->add_ranges();
  range->set_offset(0);
  range->set_length(initial);
  auto appended = call(op, la);
  if (!appended) return undo(true, appended.status());
  {
    std::lock_guard lk(reg_mu_);
    registry_->storage[id].state = LIVE;
    Status s = save_registry();
    if (!s) {
      registry_->storage[id].state = PENDING;
      return s.with_context(op);  // destroyed at the next start
    }
  }
  register_snapshot(id, q.name());
  log_line("snapshot " + id + (q.name().empty() ? "" : " (" + q.name() + ")") + " created: storage " + path + ", " +
           bytes_text(initial) + " of at most " + bytes_text(limit));
  return snapshot_info(op, id, r->mutable_snapshot());
}

Status Service::append_storage(const api::AppendStorageRequest& q) {
  const std::string op = "append-storage";
  if (q.id().empty()) return Status::error(EINVAL, op + ": no snapshot given");
  if (q.path().empty()) return Status::error(EINVAL, op + ": no path given");
  if (q.path()[0] != '/') return Status::error(EINVAL, op + ": path \"" + q.path() + "\" must be absolute");
  if (q.ranges().empty()) return Status::error(EINVAL, op + ": no range given");
  struct stat st;
  if (::stat(q.path().c_str(), &st) != 0) return Status::from_errno(op + ": " + q.path());
  {
    std::lock_guard lk(reg_mu_);
    for (const auto& [id, m] : registry_->storage)
      if (same_file(m.path, st))
        return Status::error(EBUSY, op + ": " + q.path() + " is the managed difference storage of snapshot " + id);
  }
  // Alignment and bounds here, before the data plane sees any range: it
  // appends valid ranges one by one, so a bad range after a good one would
  // leave the good one appended although the request fails.
  for (const auto& r : q.ranges()) {
    std::string what = op + " " + q.path() + ": range " + std::to_string(r.offset()) + ":" + std::to_string(r.length());
    if (r.length() == 0) return Status::error(EINVAL, what + " is empty");
    if (r.offset() % 4096 || r.length() % 4096) return Status::error(EINVAL, what + " is not 4096-aligned");
    if (S_ISREG(st.st_mode) && (r.offset() > static_cast<uint64_t>(st.st_size) ||
                                r.length() > static_cast<uint64_t>(st.st_size) - r.offset()))
      return Status::error(EINVAL, what + " is beyond the end of the file (size " + std::to_string(st.st_size) + ")");
  }
  link::Request lq;
  auto* a = lq.mutable_append_storage();
  a->set_id(q.id());
  a->set_path(q.path());
  for (const auto& r : q.ranges()) *a->add_ranges() = r;
  auto lr = call(op, lq);
  return lr.status();
}

Status Service::take(const api::TakeRequest& q, api::TakeReply* r) {
  if (q.id().empty()) return Status::error(EINVAL, "take: no snapshot given");
  link::Request lq;
  lq.mutable_take()->set_id(q.id());
  auto lr = call("take", lq);
  if (!lr) return lr.status();
  r->set_pause_us(lr->take().pause_us());
  return snapshot_info("take", q.id(), r->mutable_snapshot());
}

Status Service::snapshot_list(api::SnapshotListReply* r) {
  link::Request lq;
  lq.mutable_collect()->set_include_retained(false);
  auto lr = call("snapshot list", lq);
  if (!lr) return lr.status();
  for (const auto& s : lr->collect().snapshots())
    if (!s.retained()) fill_snapshot(r->add_snapshots(), s);
  return Status::ok();
}

Status Service::snapshot_info(const std::string& op, const std::string& id, api::Snapshot* out, LinkClient* own) {
  if (id.empty()) return Status::error(EINVAL, op + ": no snapshot given");
  link::Request lq;
  lq.mutable_info()->set_id(id);
  auto lr = call(op, lq, own);
  if (!lr) {
    if (lr.status().code() == ENOENT) return Status::error(ENOENT, op + ": no such snapshot \"" + id + "\"");
    return lr.status();
  }
  fill_snapshot(out, lr->info().snapshot());
  return Status::ok();
}

Status Service::destroy(const api::DestroyRequest& q) {
  const std::string op = "destroy";
  if (q.id().empty()) return Status::error(EINVAL, op + ": no snapshot given");
  api::Snapshot s;
  Status st = snapshot_info(op, q.id(), &s);
  if (!st) return st;
  link::Request lq;
  lq.mutable_destroy()->set_id(s.id());
  auto lr = call(op, lq);
  if (!lr) {
    if (lr.status().code() == ENOENT) return Status::error(ENOENT, op + ": no such snapshot \"" + q.id() + "\"");
    return lr.status();
  }
  log_line("snapshot " + s.id() + (s.name().empty() ? "" : " (" + s.name() + ")") + " destroyed");
  snapshot_gone(s.id(), nullptr);
  return Status::ok();
}

Status Service::cbt_info(const api::CbtInfoRequest& q, api::CbtInfoReply* r) {
  link::Request lq;
  lq.mutable_cbt_info()->set_volume(q.volume());
  auto lr = call("cbt info", lq);
  if (!lr) return lr.status();
  const auto& i = lr->cbt_info();
  r->set_generation(i.generation());
  r->set_sequence(i.sequence());
  r->set_block_size(i.block_size());
  r->set_block_count(i.block_count());
  r->set_capacity(i.capacity());
  return Status::ok();
}

Status Service::cbt_map(const api::CbtMapRequest& q, api::CbtMapReply* r) {
  constexpr uint32_t kMaxBlocks = 1u << 20;
  link::Request lq;
  auto* m = lq.mutable_cbt_map();
  m->set_volume(q.volume());
  m->set_snapshot(q.snapshot());
  m->set_first_block(q.first_block());
  m->set_block_count(q.block_count() == 0 || q.block_count() > kMaxBlocks ? kMaxBlocks : q.block_count());
  auto lr = call("cbt map", lq);
  if (!lr) return lr.status();
  r->set_generation(lr->cbt_map().generation());
  *r->mutable_stamps() = lr->cbt_map().stamps();
  return Status::ok();
}

Status Service::cbt_changes(const api::CbtChangesRequest& q, api::CbtChangesReply* r) {
  link::Request lq;
  auto* c = lq.mutable_cbt_changes();
  c->set_volume(q.volume());
  c->set_generation(q.generation());
  c->set_since_sequence(q.since_sequence());
  c->set_snapshot(q.snapshot());
  auto lr = call("cbt changes", lq);
  if (!lr) return lr.status();
  const auto& a = lr->cbt_changes();
  r->set_generation(a.generation());
  r->set_sequence(a.sequence());
  *r->mutable_ranges() = a.ranges();
  r->set_changed_bytes(a.changed_bytes());
  return Status::ok();
}

Status Service::cbt_mark_dirty(const api::CbtMarkDirtyRequest& q) {
  link::Request lq;
  auto* d = lq.mutable_cbt_mark_dirty();
  d->set_volume(q.volume());
  *d->mutable_ranges() = q.ranges();
  return call("cbt mark-dirty", lq).status();
}

Result<std::string> Service::resolve_snapshot(const std::string& key) {
  if (auto id = hub_.resolve(key)) return *id;
  if (key.empty()) return Status::error(EINVAL, "wait-event: no snapshot given");
  link::Request lq;
  lq.mutable_info()->set_id(key);
  auto lr = call("wait-event", lq);
  if (!lr) {
    if (lr.status().code() == ENOENT) return Status::error(ENOENT, "wait-event: no such snapshot \"" + key + "\"");
    return lr.status();
  }
  const auto& s = lr->info().snapshot();
  register_snapshot(s.id(), s.name());
  return s.id();
}

// ------------------------------------------------------------------ storage policy

void Service::register_snapshot(const std::string& id, const std::string& name) {
  hub_.add(id, name);
  pump_add(id);
}

void Service::snapshot_gone(const std::string& id, LinkClient* own) {
  hub_.remove(id);
  pump_remove(id);
  {
    std::lock_guard lk(reg_mu_);
    auto it = registry_->storage.find(id);
    if (it != registry_->storage.end() && it->second.state == LIVE) {
      it->second.state = DESTROYED;
      Status st = save_registry();
      if (!st) log_line(st.message());
    }
  }
  cleanup(own);
}

void Service::cleanup(LinkClient* own) {
  std::lock_guard cl(cleanup_mu_);
  std::vector<std::string> candidates;
  {
    std::lock_guard lk(reg_mu_);
    for (const auto& [id, m] : registry_->storage)
      if (m.state != PENDING) candidates.push_back(id);
  }
  if (candidates.empty()) return;
  link::Request lq;
  lq.mutable_collect()->set_include_retained(true);
  auto lr = call("delete managed storage", lq, own);
  if (!lr) return;  // next time
  std::map<std::string, bool> present;  // id -> retained
  for (const auto& s : lr->collect().snapshots()) present[s.id()] = s.retained();
  std::lock_guard lk(reg_mu_);
  bool changed = false;
  for (const auto& id : candidates) {
    auto it = registry_->storage.find(id);
    if (it == registry_->storage.end() || it->second.state == PENDING) continue;
    auto p = present.find(id);
    if (p != present.end()) {
      if (p->second && it->second.state == LIVE) {
        it->second.state = DESTROYED;
        changed = true;
      }
      continue;
    }
    if (::unlink(it->second.path.c_str()) != 0 && errno != ENOENT)
      log_line("delete managed storage " + it->second.path + ": " + std::strerror(errno));
    else
      log_line("deleted managed storage " + it->second.path + " of destroyed snapshot " + id);
    registry_->storage.erase(it);
    changed = true;
  }
  if (changed) {
    Status st = save_registry();
    if (!st) log_line(st.message());
  }
}

Status Service::grow(const std::string& id, LinkClient* own, const char* why) {
  std::lock_guard gl(grow_mu_);
  ManagedFile m;
  {
    std::lock_guard lk(reg_mu_);
    const ManagedFile* p = registry_->managed(id);
    if (!p || p->state != LIVE) return Status::ok();
    m = *p;
  }
  if (m.size >= m.limit) return Status::ok();  // at the limit: the plugin reports no-space
  const uint64_t length = std::min(m.step, m.limit - m.size);
  const std::string op = "grow storage of snapshot " + id + " (" + why + ")";
  int fd = ::open(m.path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    Status st = Status::from_errno(op + ": open " + m.path);
    log_line(st.message());
    return st;
  }
  Status st = allocate_range(fd, m.path, m.size, length);
  ::close(fd);
  if (!st) {
    st = st.with_context(op);
    log_line(st.message());
    return st;
  }
  {
    std::lock_guard lk(reg_mu_);
    auto it = registry_->storage.find(id);
    if (it == registry_->storage.end()) return Status::ok();
    it->second.size = m.size + length;
    st = save_registry();
    if (!st) {
      it->second.size = m.size;
      log_line(st.with_context(op).message());
      return st;
    }
  }
  link::Request lq;
  auto* a = lq.mutable_append_storage();
  a->set_id(id);
  a->set_path(m.path);
  auto* r = a->add_ranges();
  r->set_offset(m.size);
  r->set_length(length);
  auto lr = call(op, lq, own);
  if (!lr) {
    log_line(lr.status().message());
    if (lr.status().code() != EAGAIN) {  // refused: the range is not in use
      std::lock_guard lk(reg_mu_);
      auto it = registry_->storage.find(id);
      if (it != registry_->storage.end() && it->second.size == m.size + length) {
        it->second.size = m.size;
        Status s = save_registry();
        if (!s) log_line(s.message());
      }
    }
    return lr.status();
  }
  log_line("snapshot " + id + ": managed storage " + m.path + " grown to " + bytes_text(m.size + length) +
           " (limit " + bytes_text(m.limit) + ")");
  return Status::ok();
}

Status Service::reconcile(LinkClient& c) {
  // 1. Creates interrupted by a crash: undo them.
  std::vector<std::string> pending;
  {
    std::lock_guard lk(reg_mu_);
    for (const auto& [id, m] : registry_->storage)
      if (m.state == PENDING) pending.push_back(id);
  }
  for (const auto& id : pending) {
    link::Request d;
    d.mutable_destroy()->set_id(id);
    auto dr = call("restart", d, &c);
    if (!dr && dr.status().code() == EAGAIN) return dr.status();
    log_line("snapshot " + id + ": its create was interrupted; destroyed");
    std::lock_guard lk(reg_mu_);
    auto it = registry_->storage.find(id);
    if (it != registry_->storage.end()) it->second.state = DESTROYED;
  }

  // 2. What the data plane has.
  link::Request lq;
  lq.mutable_collect()->set_include_retained(true);
  auto lr = call("restart", lq, &c);
  if (!lr) return lr.status();
  std::map<std::string, const link::SnapshotInfo*> live, retained;
  for (const auto& s : lr->collect().snapshots()) (s.retained() ? retained : live)[s.id()] = &s;

  // 3. Managed files no longer needed.
  {
    std::lock_guard lk(reg_mu_);
    bool changed = !pending.empty();
    for (auto it = registry_->storage.begin(); it != registry_->storage.end();) {
      auto& m = it->second;
      if (live.count(m.id)) {
        ++it;
        continue;
      }
      if (retained.count(m.id)) {
        if (m.state != DESTROYED) {
          m.state = DESTROYED;
          changed = true;
        }
        ++it;
        continue;
      }
      if (::unlink(m.path.c_str()) != 0 && errno != ENOENT)
        log_line("delete managed storage " + m.path + ": " + std::strerror(errno));
      else
        log_line("deleted managed storage " + m.path + " of destroyed snapshot " + m.id);
      it = registry_->storage.erase(it);
      changed = true;
    }
    if (changed) {
      Status st = save_registry();
      if (!st) log_line(st.message());
    }
    // Files in STATE/storage that no entry names (a create interrupted
    // before its first registry save), left alone while recent.
    std::error_code ec;
    for (const auto& de : fs::directory_iterator(paths_.storage_dir, ec)) {
      std::string p = de.path().string();
      std::string stem = de.path().stem().string();
      if (de.path().extension() != ".diff") continue;
      bool known = false;
      for (const auto& [id, m] : registry_->storage) known = known || m.path == p;
      if (known || live.count(stem) || retained.count(stem)) continue;
      struct stat st;
      if (::stat(p.c_str(), &st) != 0 || std::time(nullptr) - st.st_mtime < 60) continue;
      if (::unlink(p.c_str()) == 0) log_line("deleted orphaned storage file " + p);
    }
  }

  // 4. Events: a history and a pump for every live snapshot.
  for (const auto& id : hub_.ids())
    if (!live.count(id)) {
      hub_.remove(id);
      pump_remove(id);
    }
  for (const auto& [id, s] : live) register_snapshot(id, s->name());

  // 5. Storage that ran low while events could not be handled.
  const uint64_t threshold = options_.diff_storage_minimum_bytes / 2;
  for (const auto& [id, s] : live) {
    bool managed;
    {
      std::lock_guard lk(reg_mu_);
      const ManagedFile* m = registry_->managed(id);
      managed = m && m->state == LIVE && m->size < m->limit;
    }
    if (!managed || s->state() == link::CORRUPTED) continue;
    uint64_t free = s->storage_capacity() > s->storage_used() ? s->storage_capacity() - s->storage_used() : 0;
    if (free < threshold) {
      Status st = grow(id, &c, "restart");
      if (!st && st.code() == EAGAIN) return st;
    }
  }
  return Status::ok();
}

// ------------------------------------------------------------------ pumps

void Service::start_pumps() {
  std::lock_guard lk(pump_mu_);
  if (!pump_threads_.empty()) return;
  pump_stop_ = false;
  for (size_t i = 0; i < kPumps; ++i) pump_threads_.emplace_back([this, i] { pump_loop(i); });
}

void Service::stop_pumps() {
  {
    std::lock_guard lk(pump_mu_);
    pump_stop_ = true;
  }
  pump_cv_.notify_all();
  for (auto& t : pump_threads_) t.join();
  pump_threads_.clear();
}

void Service::pump_add(const std::string& id) {
  {
    std::lock_guard lk(pump_mu_);
    for (const auto& s : pump_sets_)
      if (s.count(id)) return;
    auto least = std::min_element(pump_sets_.begin(), pump_sets_.end(),
                                  [](const auto& a, const auto& b) { return a.size() < b.size(); });
    least->insert(id);
  }
  pump_cv_.notify_all();
}

void Service::pump_remove(const std::string& id) {
  std::lock_guard lk(pump_mu_);
  for (auto& s : pump_sets_) s.erase(id);
}

void Service::pump_loop(size_t index) {
  block_signals();
  LinkClient client;
  bool connected = false;
  uint64_t conn_epoch = 0;
  std::unique_lock lk(pump_mu_);
  while (!pump_stop_) {
    if (pump_sets_[index].empty() || !up_) {
      if (connected) {  // idle: give the plugin its connection back
        client.close();
        connected = false;
      }
      pump_cv_.wait_for(lk, 200ms);
      continue;
    }
    std::vector<std::string> ids(pump_sets_[index].begin(), pump_sets_[index].end());
    lk.unlock();
    if (!connected || conn_epoch != epoch_) {
      client.close();
      conn_epoch = epoch_;
      connected = client.connect(paths_.link_socket).is_ok();
    }
    if (connected) {
      // One short wait per snapshot: a pass takes about 100 ms when idle.
      const uint32_t per = std::max<uint32_t>(2, 100 / static_cast<uint32_t>(ids.size()));
      for (const auto& id : ids) {
        {
          std::lock_guard g(pump_mu_);
          if (pump_stop_) break;
          if (!pump_sets_[index].count(id)) continue;
        }
        link::Request q;
        q.mutable_wait_event()->set_id(id);
        q.mutable_wait_event()->set_timeout_ms(per);
        auto r = client.call(q);
        if (!r) {
          if (is_transport_error(r.status())) {
            connected = false;
            break;
          }
          if (r.status().code() == ENOENT) {
            snapshot_gone(id, &client);
            continue;
          }
          log_line("events of snapshot " + id + ": " + r.status().message());
          continue;
        }
        if (r->wait_event().has_event()) handle_event(client, id, r->wait_event().event());
      }
    }
    lk.lock();
    if (!connected && !pump_stop_) pump_cv_.wait_for(lk, 100ms);
  }
}

void Service::handle_event(LinkClient& client, const std::string& id, const link::Event& ev) {
  hub_.append(id, ev);
  switch (ev.code()) {
    case link::LOW_FREE_SPACE:
      log_line("snapshot " + id + ": event " + event_name(ev.code()) + " (" + bytes_text(ev.requested()) +
               " requested)");
      (void)grow(id, &client, "low-free-space");
      break;
    case link::NO_SPACE:
      log_line("snapshot " + id + ": event no-space: difference storage is at its limit");
      break;
    case link::CORRUPTED_EVENT:
      log_line("snapshot " + id + ": event corrupted: volume " + ev.volume() + ": " + ev.error());
      break;
    default:
      log_line("snapshot " + id + ": event " + std::to_string(ev.code()));
      break;
  }
}

}  // namespace nbdsnap::daemon
