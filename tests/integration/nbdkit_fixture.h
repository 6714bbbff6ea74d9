// Shared fixture of the integration tests: a temporary directory with a
// volume file, an nbdkit child process running the nbdsnap plugin on a Unix
// socket (NBD) plus its control link socket, a LinkClient on that link, and
// small helpers for libnbd connections and external commands.
//
// The plugin and the nbdsnap-link tool come from the environment meson sets
// for these tests: NBDSNAP_PLUGIN (plugin .so) and NBDSNAP_LINK. Without
// nbdkit, or outside meson, the tests skip. nbdkit runs in the foreground
// as our child (--exit-with-parent), is waited for until both sockets
// answer, and is stopped with SIGTERM + waitpid (or SIGKILL for crash
// tests). Set NBDSNAP_KEEP_TMP=1 to keep the directory of a run.
// Not thread-safe: one fixture per test; libnbd handles from it may be used
// from other threads, one handle per thread.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <libnbd.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "link.pb.h"
#include "link_client.h"
#include "stamp.h"
#include "status.h"

namespace nbdsnap::it {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;

// ------------------------------------------------------------------ helpers

// Full path of an executable found on PATH (then /usr/bin, /usr/sbin), or "".
inline std::string find_program(const std::string& name) {
  std::string path = std::getenv("PATH") ? std::getenv("PATH") : "";
  path += ":/usr/bin:/usr/sbin";
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string p = dir + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

inline ::testing::AssertionResult IsOk(const Status& s) {
  if (s) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "error " << s.code() << " (" << std::strerror(s.code())
                                       << "): " << s.message();
}
template <typename T>
::testing::AssertionResult IsOk(const Result<T>& r) {
  return IsOk(r.status());
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Creates (or resizes) a sparse file of `size` bytes.
inline void make_sparse_file(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0)
    throw std::runtime_error("create " + path + ": " + std::strerror(errno));
  ::close(fd);
}

struct CommandResult {
  int exit_code = -1;  // -1: killed by a signal or could not run
  std::string out, err;
};

// Runs argv (argv[0] looked up on PATH, /usr/bin first so that tools find
// the system python), collecting stdout and stderr. Kills it after
// timeout_s seconds.
inline CommandResult run_command(const std::vector<std::string>& argv, int timeout_s = 60) {
  CommandResult res;
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return res;
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    return res;
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::string path_env = std::string("/usr/bin:/bin:") + (std::getenv("PATH") ? std::getenv("PATH") : "");
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    ::setenv("PATH", path_env.c_str(), 1);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  if (pid < 0) {
    ::close(out[0]);
    ::close(err[0]);
    return res;
  }
  auto deadline = Clock::now() + std::chrono::seconds(timeout_s);
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  bool killed = false;
  while (open_fds > 0) {
    int r = ::poll(fds, 2, 100);
    if (r < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? res.out : res.err).append(buf, static_cast<size_t>(n));
      } else {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
    if (!killed && Clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      killed = true;
      res.err += "\n[killed after " + std::to_string(timeout_s) + " s]";
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) ::close(f.fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  res.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return res;
}

// Connects a Unix stream socket; -1 on error (errno set).
inline int unix_connect(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    errno = ENAMETOOLONG;
    return -1;
  }
  std::strcpy(addr.sun_path, path.c_str());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int e = errno;
    ::close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

// ------------------------------------------------------------------ libnbd

struct NbdClose {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using NbdPtr = std::unique_ptr<nbd_handle, NbdClose>;

struct NbdOptions {
  bool strict = true;            // false: let the client send what the server refuses
  bool base_allocation = false;  // request the base:allocation meta context
};

// Connects to export `name` on the Unix socket. On failure returns null and
// sets *error (message) and *errnum (nbd_get_errno()).
inline NbdPtr nbd_open(const std::string& socket, const std::string& name, const NbdOptions& o = {},
                       std::string* error = nullptr, int* errnum = nullptr) {
  NbdPtr h(nbd_create());
  auto fail = [&] {
    if (error) *error = nbd_get_error() ? nbd_get_error() : "unknown libnbd error";
    if (errnum) *errnum = nbd_get_errno();
    return NbdPtr();
  };
  if (!h) return fail();
  if (nbd_set_export_name(h.get(), name.c_str()) == -1) return fail();
  if (!o.strict && nbd_set_strict_mode(h.get(), 0) == -1) return fail();
  if (o.base_allocation && nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) return fail();
  if (nbd_connect_unix(h.get(), socket.c_str()) == -1) return fail();
  return h;
}

inline std::string nbd_failure(const char* op, uint64_t offset) {
  return std::string(op) + " at " + std::to_string(offset) + ": " + (nbd_get_error() ? nbd_get_error() : "?") +
         " (errno " + std::to_string(nbd_get_errno()) + ")";
}

constexpr uint64_t kMaxRequest = 4 * MiB;

// Reads/writes [offset, offset+length) in requests of at most 4 MiB.
// Return "" on success, else the libnbd error.
inline std::string nbd_read_all(nbd_handle* h, void* buf, uint64_t length, uint64_t offset) {
  for (uint64_t done = 0; done < length;) {
    uint64_t n = std::min(kMaxRequest, length - done);
    if (nbd_pread(h, static_cast<char*>(buf) + done, n, offset + done, 0) == -1)
      return nbd_failure("pread", offset + done);
    done += n;
  }
  return "";
}
inline std::string nbd_write_all(nbd_handle* h, const void* buf, uint64_t length, uint64_t offset) {
  for (uint64_t done = 0; done < length;) {
    uint64_t n = std::min(kMaxRequest, length - done);
    if (nbd_pwrite(h, static_cast<const char*>(buf) + done, n, offset + done, 0) == -1)
      return nbd_failure("pwrite", offset + done);
    done += n;
  }
  return "";
}

struct NbdExtent {
  uint64_t offset, length;
  uint32_t flags;  // LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO
};

// base:allocation extents covering [offset, offset+length) (the handle must
// have been opened with base_allocation). "" on success.
inline std::string nbd_extents(nbd_handle* h, uint64_t length, uint64_t offset, std::vector<NbdExtent>* out) {
  struct Ctx {
    std::vector<NbdExtent>* out;
    uint64_t at;
  };
  uint64_t end = offset + length;
  uint64_t at = offset;
  while (at < end) {
    Ctx ctx{out, at};
    nbd_extent_callback cb;
    cb.user_data = &ctx;
    cb.free = nullptr;
    cb.callback = [](void* user, const char* metacontext, uint64_t off, uint32_t* entries, size_t n,
                     int* /*error*/) -> int {
      auto* c = static_cast<Ctx*>(user);
      if (std::strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
      c->at = off;
      for (size_t i = 0; i + 1 < n; i += 2) {
        c->out->push_back(NbdExtent{c->at, entries[i], entries[i + 1]});
        c->at += entries[i];
      }
      return 0;
    };
    uint64_t n = std::min<uint64_t>(end - at, 64 * MiB);
    if (nbd_block_status(h, n, at, cb, 0) == -1) return nbd_failure("block_status", at);
    if (ctx.at <= at) return "block_status at " + std::to_string(at) + ": no progress";
    at = ctx.at;
  }
  return "";
}

// ------------------------------------------------------------------ server

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/nbdsnap-it.XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
    path_ = tmpl;
  }
  ~TempDir() {
    const char* keep = std::getenv("NBDSNAP_KEEP_TMP");
    if (keep && *keep && std::string(keep) != "0") {
      std::fprintf(stderr, "keeping %s\n", path_.c_str());
      return;
    }
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// One nbdkit child process serving the plugin.
class NbdkitProcess {
 public:
  NbdkitProcess() = default;
  ~NbdkitProcess() {
    if (pid_ > 0) (void)stop();
  }
  NbdkitProcess(const NbdkitProcess&) = delete;
  NbdkitProcess& operator=(const NbdkitProcess&) = delete;

  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Starts `nbdkit -f -U nbd_socket PLUGIN params...`, stderr to log_path
  // (appended), and waits until the NBD socket serves `probe_export` and the
  // control link answers a version request.
  ::testing::AssertionResult start(const std::string& plugin, const std::string& nbd_socket,
                                   const std::string& control_socket, const std::string& probe_export,
                                   const std::vector<std::string>& params, const std::string& log_path) {
    if (pid_ > 0) return ::testing::AssertionFailure() << "nbdkit already running";
    log_path_ = log_path;
    ::unlink(nbd_socket.c_str());  // nbdkit leaves its socket behind
    std::vector<std::string> argv = {"nbdkit", "-f", "--exit-with-parent", "-U", nbd_socket, plugin};
    argv.insert(argv.end(), params.begin(), params.end());
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log < 0) return ::testing::AssertionFailure() << "open " << log_path << ": " << std::strerror(errno);
    std::string cmdline;
    for (const auto& a : argv) cmdline += a + " ";
    std::string banner = "### " + cmdline + "\n";
    (void)!::write(log, banner.data(), banner.size());
    pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(log, 1);
      ::dup2(log, 2);
      ::execvp("nbdkit", args.data());
      ::_exit(127);
    }
    ::close(log);
    if (pid < 0) return ::testing::AssertionFailure() << "fork: " << std::strerror(errno);
    pid_ = pid;

    auto deadline = Clock::now() + std::chrono::seconds(20);
    bool nbd_ready = false, link_ready = false;
    std::string last;
    while (Clock::now() < deadline) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure() << "nbdkit exited during start-up (status " << status
                                             << "):\n" << read_text(log_path_);
      }
      if (!nbd_ready) {
        NbdPtr h = nbd_open(nbd_socket, probe_export, {}, &last);
        if (h) {
          nbd_shutdown(h.get(), 0);
          nbd_ready = true;
        }
      }
      if (nbd_ready && !link_ready) {
        LinkClient c;
        Status st = c.connect(control_socket);
        if (st) {
          link::Request req;
          req.mutable_version();
          auto r = c.call(req);
          if (r) link_ready = true; else last = r.status().message();
        } else {
          last = st.message();
        }
      }
      if (nbd_ready && link_ready) return ::testing::AssertionSuccess();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return ::testing::AssertionFailure() << "nbdkit did not become ready in 20 s (" << last << "):\n"
                                         << read_text(log_path_);
  }

  // SIGTERM, then waits (up to 30 s, then SIGKILL). Success if it exited 0.
  ::testing::AssertionResult stop() {
    if (pid_ <= 0) return ::testing::AssertionSuccess();
    ::kill(pid_, SIGTERM);
    auto deadline = Clock::now() + std::chrono::seconds(30);
    int status = 0;
    for (;;) {
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (r < 0 && errno != EINTR) {
        pid_ = -1;
        return ::testing::AssertionFailure() << "waitpid: " << std::strerror(errno);
      }
      if (Clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
        return ::testing::AssertionFailure() << "nbdkit did not exit within 30 s of SIGTERM:\n"
                                             << read_text(log_path_);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pid_ = -1;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "nbdkit exited with status " << status << ":\n" << read_text(log_path_);
  }

  // kill -9 and reap.
  void kill9() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  std::string log_path_;
};

// Test fixture: temp dir, volume "vol0", nbdkit with the plugin, link client.
class NbdkitTest : public ::testing::Test {
 protected:
  static constexpr const char* kVolume = "vol0";

  void SetUp() override {
    const char* plugin = std::getenv("NBDSNAP_PLUGIN");
    if (!plugin || !*plugin) GTEST_SKIP() << "NBDSNAP_PLUGIN is not set (run through `meson test`)";
    plugin_ = plugin;
    if (::access(plugin_.c_str(), R_OK) != 0) GTEST_SKIP() << "plugin " << plugin_ << " is not built";
    if (find_program("nbdkit").empty()) GTEST_SKIP() << "nbdkit is not installed (apt-get install nbdkit)";
    const char* link = std::getenv("NBDSNAP_LINK");
    link_tool_ = link ? link : "";
    dir_ = std::make_unique<TempDir>();
    volume_path_ = path("vol0.img");
    nbd_socket_ = path("nbd.sock");
    control_socket_ = path("ctl.sock");
    state_dir_ = path("state");
    log_path_ = path("nbdkit.log");
  }

  void TearDown() override {
    link_.close();
    if (server_.running()) {
      auto stopped = server_.stop();
      if (!HasFailure()) {
        EXPECT_TRUE(stopped);
      }
    }
    if (HasFailure() && dir_) std::fprintf(stderr, "---- nbdkit log ----\n%s----\n", read_text(log_path_).c_str());
    dir_.reset();
  }

  std::string path(const std::string& name) const { return *dir_ / name; }

  void make_volume(uint64_t size) { make_sparse_file(volume_path_, size); }

  // Makes a volume of `size` bytes, serves it with 64 KiB chunks and stamps
  // every 4 KiB block with `sequence` (flushed). Use with
  // ASSERT_NO_FATAL_FAILURE.
  void start_stamped(uint64_t size, uint64_t sequence) {
    make_volume(size);
    ASSERT_TRUE(start({"chunk_minimum_shift=16"}));
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    ASSERT_TRUE(h) << err;
    std::vector<char> buf(size);
    stamp_range(buf.data(), 0, size, sequence);
    ASSERT_EQ(nbd_write_all(h.get(), buf.data(), size, 0), "");
    ASSERT_NE(nbd_flush(h.get(), 0), -1);
  }

  // Starts nbdkit with the volume, the state dir and the control link, plus
  // `extra` plugin parameters (KEY=VALUE); remembered for restart().
  ::testing::AssertionResult start(std::vector<std::string> extra = {}) {
    extra_ = std::move(extra);
    return restart();
  }
  ::testing::AssertionResult restart() {
    std::vector<std::string> params = {"volume=" + std::string(kVolume) + "=" + volume_path_,
                                       "state=" + state_dir_, "control=" + control_socket_};
    params.insert(params.end(), extra_.begin(), extra_.end());
    auto r = server_.start(plugin_, nbd_socket_, control_socket_, kVolume, params, log_path_);
    if (!r) return r;
    Status st = link_.connect(control_socket_);
    if (!st) return IsOk(st);
    return ::testing::AssertionSuccess();
  }
  ::testing::AssertionResult stop() {
    link_.close();
    return server_.stop();
  }
  void kill_server() {  // kill -9
    link_.close();
    server_.kill9();
  }

  // ---- control link
  Result<link::Response> call(link::Request req) { return link_.call(std::move(req)); }

  Result<link::Response> create(const std::string& name) {
    link::Request q;
    q.mutable_create()->add_volumes(kVolume);
    q.mutable_create()->set_name(name);
    return call(q);
  }
  Result<link::Response> append_storage(const std::string& id, const std::string& file, uint64_t offset,
                                        uint64_t length) {
    link::Request q;
    auto* a = q.mutable_append_storage();
    a->set_id(id);
    a->set_path(file);
    auto* r = a->add_ranges();
    r->set_offset(offset);
    r->set_length(length);
    return call(q);
  }
  Result<link::Response> take(const std::string& id) {
    link::Request q;
    q.mutable_take()->set_id(id);
    return call(q);
  }
  Result<link::Response> info(const std::string& id) {
    link::Request q;
    q.mutable_info()->set_id(id);
    return call(q);
  }
  Result<link::Response> destroy(const std::string& id) {
    link::Request q;
    q.mutable_destroy()->set_id(id);
    return call(q);
  }
  Result<link::Response> cbt_info() {
    link::Request q;
    q.mutable_cbt_info()->set_volume(kVolume);
    return call(q);
  }
  Result<link::Response> cbt_changes(const std::string& generation, uint64_t since) {
    link::Request q;
    q.mutable_cbt_changes()->set_volume(kVolume);
    q.mutable_cbt_changes()->set_generation(generation);
    q.mutable_cbt_changes()->set_since_sequence(since);
    return call(q);
  }
  Result<link::Response> wait_event(const std::string& id, uint32_t timeout_ms) {
    link::Request q;
    q.mutable_wait_event()->set_id(id);
    q.mutable_wait_event()->set_timeout_ms(timeout_ms);
    return call(q);
  }

  // create NAME on vol0 + a fresh sparse diff storage file of
  // `storage_bytes` (all of it appended) + take. Returns the take reply.
  Result<link::Response> snapshot(const std::string& name, uint64_t storage_bytes) {
    auto c = create(name);
    if (!c) return c;
    std::string file = path(name + ".diff");
    make_sparse_file(file, storage_bytes);
    auto a = append_storage(c->create().id(), file, 0, storage_bytes);
    if (!a) return a;
    return take(name);
  }

  // ---- NBD
  NbdPtr open(const std::string& export_name, const NbdOptions& o = {}, std::string* error = nullptr,
              int* errnum = nullptr) {
    return nbd_open(nbd_socket_, export_name, o, error, errnum);
  }
  std::string uri(const std::string& export_name) const {
    return "nbd+unix:///" + export_name + "?socket=" + nbd_socket_;
  }

  std::string plugin_, link_tool_;
  std::unique_ptr<TempDir> dir_;
  std::string volume_path_, nbd_socket_, control_socket_, state_dir_, log_path_;
  std::vector<std::string> extra_;
  NbdkitProcess server_;
  LinkClient link_;
};

}  // namespace nbdsnap::it
