// nbdkit-nbdsnap-plugin: the nbdkit callbacks, and nothing else. Maps each
// NBD export to Engine I/O; every error becomes nbdkit_error + errno here.
// The only file of the project that includes nbdkit-plugin.h.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "control_link.h"
#include "engine.h"

namespace {

using nbdsnap::Engine;
using nbdsnap::Status;

nbdsnap::EngineOptions g_options;
std::string g_control;
std::unique_ptr<Engine> g_engine;
std::unique_ptr<nbdsnap::ControlLink> g_link;

struct Handle {
  nbdsnap::ExportRef ref;
  std::string name;
};

int report(const Status& st) {
  nbdkit_error("%s", st.message().c_str());
  nbdkit_set_error(st.code());
  return -1;
}

// Runs fn, turning exceptions into errors: none may reach nbdkit.
template <typename Fn>
int guarded(const char* op, Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return report(Status::error(ENOMEM, std::string(op) + ": out of memory"));
  } catch (const std::exception& e) {
    return report(Status::error(EIO, std::string(op) + ": " + e.what()));
  }
}

std::string absolute(const char* path) {
  char* abs = nbdkit_absolute_path(path);
  if (!abs) return "";
  std::string s(abs);
  free(abs);
  return s;
}

void nbdsnap_load() {
  g_options.log = [](const std::string& msg) { std::fprintf(stderr, "nbdkit: nbdsnap: %s\n", msg.c_str()); };
}

void nbdsnap_unload() {
  g_link.reset();
  g_engine.reset();
}

int nbdsnap_config(const char* key, const char* value) {
  return guarded("config", [&] {
    std::string k(key), v(value);
    if (k == "volume") {
      auto eq = v.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == v.size())
        return report(Status::error(EINVAL, "config: volume=" + v + ": expected volume=NAME=PATH"));
      std::string path = absolute(v.c_str() + eq + 1);
      if (path.empty()) return -1;
      g_options.volumes.emplace_back(v.substr(0, eq), path);
      return 0;
    }
    if (k == "state") {
      g_options.state_dir = absolute(value);
      return g_options.state_dir.empty() ? -1 : 0;
    }
    if (k == "control") {
      g_control = absolute(value);
      return g_control.empty() ? -1 : 0;
    }
    Status st = g_options.params.set(k, v);
    if (st.code() == ENOENT)
      return report(Status::error(EINVAL, "config: unknown parameter " + k + " (see nbdkit nbdsnap --help)"));
    return st ? 0 : report(st);
  });
}

int nbdsnap_config_complete() {
  return guarded("config", [&] {
    if (g_options.volumes.empty() && g_control.empty())
      return report(Status::error(EINVAL, "config: give volume=NAME=PATH, or control=SOCKET to add volumes later"));
    Status st = g_options.params.validate();
    return st ? 0 : report(st);
  });
}

int nbdsnap_get_ready() {
  return guarded("start", [&] {
    g_engine = std::make_unique<Engine>(g_options);
    Status st = g_engine->start();
    if (!st) {
      g_engine.reset();
      return report(st);
    }
    return 0;
  });
}

int nbdsnap_after_fork() {
  return guarded("control link", [&] {
    if (g_control.empty()) return 0;
    g_link = std::make_unique<nbdsnap::ControlLink>(*g_engine, g_control);
    Status st = g_link->start();
    return st ? 0 : report(st);
  });
}

void nbdsnap_cleanup() {
  if (g_link) g_link->stop();
  g_link.reset();
  if (g_engine) {
    Status st = g_engine->stop();
    if (!st) nbdkit_error("stop: %s", st.message().c_str());
  }
  g_engine.reset();
}

int nbdsnap_list_exports(int /*readonly*/, int /*is_tls*/, struct nbdkit_exports* exports) {
  return guarded("list exports", [&] {
    for (const auto& name : g_engine->export_names()) {
      auto at = name.find('@');
      std::string d = at == std::string::npos
                          ? "volume " + name + " (read-write)"
                          : "snapshot " + name.substr(at + 1) + " of volume " + name.substr(0, at) + " (read-only)";
      if (nbdkit_add_export(exports, name.c_str(), d.c_str()) == -1) return -1;
    }
    return 0;
  });
}

// The first volume; volumes may be added and removed at run time.
const char* nbdsnap_default_export(int /*readonly*/, int /*is_tls*/) {
  auto vols = g_engine->volumes();
  return nbdkit_strdup_intern(vols.empty() ? "" : vols.front()->name().c_str());
}

void* nbdsnap_open(int /*readonly*/) {
  Handle* h = nullptr;
  guarded("open", [&] {
    std::string name = nbdkit_export_name() ? nbdkit_export_name() : "";
    if (name.empty()) name = nbdsnap_default_export(0, 0);
    auto ref = g_engine->open_export(name);
    if (!ref) return report(ref.status());
    h = new Handle{*ref, name};
    return 0;
  });
  return h;
}

void nbdsnap_close(void* handle) { delete static_cast<Handle*>(handle); }

const char* nbdsnap_export_description(void* handle) {
  auto* h = static_cast<Handle*>(handle);
  std::string d = h->ref.part ? "snapshot " + h->ref.part->snapshot->label() + " of volume " +
                                    h->ref.volume->name() + " (read-only)"
                              : "volume " + h->ref.volume->name() + " (read-write)";
  return nbdkit_strdup_intern(d.c_str());
}

int64_t nbdsnap_get_size(void* handle) {
  return static_cast<int64_t>(static_cast<Handle*>(handle)->ref.volume->size());
}

int nbdsnap_block_size(void* /*handle*/, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  *minimum = 1;
  *preferred = 4096;
  *maximum = 0xffffffff;
  return 0;
}

int is_origin(void* handle) { return static_cast<Handle*>(handle)->ref.part ? 0 : 1; }
int nbdsnap_can_write(void* handle) { return is_origin(handle); }
int nbdsnap_can_flush(void*) { return 1; }
int nbdsnap_can_trim(void* handle) { return is_origin(handle); }
int nbdsnap_can_zero(void* handle) { return is_origin(handle); }
int nbdsnap_can_fua(void*) { return NBDKIT_FUA_NATIVE; }
int nbdsnap_can_multi_conn(void*) { return 1; }
int nbdsnap_can_extents(void*) { return 1; }

// Server-side guard: a snapshot export never changes, even if nbdkit's own
// read-only check were bypassed.
int refuse_snapshot_write(Handle* h, const char* op) {
  return report(Status::error(EPERM, std::string(op) + ": export " + h->name + " is a read-only snapshot"));
}

int nbdsnap_pread(void* handle, void* buf, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("read", [&] {
    Status st = h->ref.part ? h->ref.volume->read_snapshot(*h->ref.part, buf, count, offset)
                            : h->ref.volume->read(buf, count, offset);
    return st ? 0 : report(st);
  });
}

int nbdsnap_pwrite(void* handle, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  auto* h = static_cast<Handle*>(handle);
  if (h->ref.part) return refuse_snapshot_write(h, "write");
  return guarded("write", [&] {
    Status st = h->ref.volume->write(buf, count, offset, flags & NBDKIT_FLAG_FUA);
    return st ? 0 : report(st);
  });
}

int nbdsnap_flush(void* handle, uint32_t /*flags*/) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("flush", [&] {
    Status st = h->ref.volume->flush();
    return st ? 0 : report(st);
  });
}

int nbdsnap_trim(void* handle, uint32_t count, uint64_t offset, uint32_t flags) {
  auto* h = static_cast<Handle*>(handle);
  if (h->ref.part) return refuse_snapshot_write(h, "trim");
  return guarded("trim", [&] {
    Status st = h->ref.volume->trim(count, offset, flags & NBDKIT_FLAG_FUA);
    return st ? 0 : report(st);
  });
}

int nbdsnap_zero(void* handle, uint32_t count, uint64_t offset, uint32_t flags) {
  auto* h = static_cast<Handle*>(handle);
  if (h->ref.part) return refuse_snapshot_write(h, "zero");
  return guarded("zero", [&] {
    Status st = h->ref.volume->zero(count, offset, flags & NBDKIT_FLAG_MAY_TRIM, flags & NBDKIT_FLAG_FUA);
    return st ? 0 : report(st);
  });
}

int nbdsnap_extents(void* handle, uint32_t count, uint64_t offset, uint32_t flags,
                    struct nbdkit_extents* extents) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("extents", [&] {
    std::vector<nbdsnap::Extent> out;
    // With REQ_ONE the client wants only the first extent: one chunk is enough.
    uint64_t len = count;
    if (flags & NBDKIT_FLAG_REQ_ONE) len = std::min<uint64_t>(len, h->ref.volume->geometry().chunk_size());
    Status st = h->ref.part ? h->ref.volume->snapshot_extents(*h->ref.part, len, offset, &out)
                            : h->ref.volume->extents(len, offset, &out);
    if (!st) return report(st);
    for (const auto& e : out) {
      uint32_t type = e.hole ? (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) : 0;
      if (nbdkit_add_extent(extents, e.offset, e.length, type) == -1) return -1;
    }
    return 0;
  });
}

struct nbdkit_plugin make_plugin() {
  struct nbdkit_plugin p = {};
  p.name = "nbdsnap";
  p.longname = "nbdsnap copy-before-write snapshot plugin";
  p.version = NBDSNAP_VERSION;
  p.description =
      "Serves volumes read-write with copy-before-write snapshots published as read-only exports.";
  p.load = nbdsnap_load;
  p.unload = nbdsnap_unload;
  p.config = nbdsnap_config;
  p.config_complete = nbdsnap_config_complete;
  p.config_help =
      "volume=NAME=PATH              (repeatable) origin file or block device\n"
      "state=DIR                     metadata directory (CBT maps, snapshot tables)\n"
      "control=SOCKET                Unix socket of the internal control link\n"
      "tracking_block_minimum_shift  (16) smallest CBT block, 2^N bytes\n"
      "tracking_block_maximum_count  (2097152) CBT block grows until the count fits\n"
      "tracking_block_maximum_shift  (26) largest CBT block, 2^N bytes\n"
      "chunk_minimum_shift           (18) smallest chunk, 2^N bytes\n"
      "chunk_maximum_count           (2097152) chunk grows until the count fits\n"
      "chunk_maximum_shift           (26) largest chunk, 2^N bytes\n"
      "chunk_maximum_in_queue        (16) copies on their way to storage before writers wait\n"
      "free_diff_buffer_pool_size    (128) accepted (blksnap's), no effect\n"
      "diff_storage_minimum          (2097152) sectors: growth step, low-space threshold x2\n"
      "diff_storage_zero_fill        (0) 1: write zeros over appended storage ranges first";
  p.magic_config_key = nullptr;
  p.get_ready = nbdsnap_get_ready;
  p.after_fork = nbdsnap_after_fork;
  p.cleanup = nbdsnap_cleanup;
  p.list_exports = nbdsnap_list_exports;
  p.default_export = nbdsnap_default_export;
  p.open = nbdsnap_open;
  p.close = nbdsnap_close;
  p.export_description = nbdsnap_export_description;
  p.get_size = nbdsnap_get_size;
  p.block_size = nbdsnap_block_size;
  p.can_write = nbdsnap_can_write;
  p.can_flush = nbdsnap_can_flush;
  p.can_trim = nbdsnap_can_trim;
  p.can_zero = nbdsnap_can_zero;
  p.can_fua = nbdsnap_can_fua;
  p.can_multi_conn = nbdsnap_can_multi_conn;
  p.can_extents = nbdsnap_can_extents;
  p.pread = nbdsnap_pread;
  p.pwrite = nbdsnap_pwrite;
  p.flush = nbdsnap_flush;
  p.trim = nbdsnap_trim;
  p.zero = nbdsnap_zero;
  p.extents = nbdsnap_extents;
  return p;
}

struct nbdkit_plugin plugin = make_plugin();

}  // namespace

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN(plugin)
