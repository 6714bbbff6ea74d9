// Shared fixture of the daemon tests: a temporary directory with a volume
// file and a real nbdsnapd process (--foreground, our child) with its own
// state directory, API socket and NBD socket; ApiClient helpers for the
// public API; raw-socket helpers for malformed input.
//
// The binaries come from the environment meson sets for these tests:
// NBDSNAPD (the daemon) and NBDSNAP_PLUGIN (the plugin .so). Without them,
// or without nbdkit, the tests skip. Generic helpers (TempDir, run_command,
// libnbd, stamps) are the integration tests' (nbdkit_fixture.h, stamp.h).
// Set NBDSNAP_KEEP_TMP=1 to keep the directory of a run.
// Not thread-safe: one fixture per test; ApiClients it returns may be used
// from other threads, one client per thread.
#pragma once

#include <dirent.h>
#include <sys/socket.h>

#include <chrono>
#include <map>
#include <optional>

#include "api.pb.h"
#include "api_client.h"
#include "frame.h"
#include "nbdkit_fixture.h"
#include "stamp.h"

namespace nbdsnap::dt {

using namespace nbdsnap::it;  // NOLINT: shared test helpers

// Descriptors of a process by kind ("socket", "file", "pipe", "anon"),
// from /proc/PID/fd.
inline std::map<std::string, int> fd_kinds(pid_t pid) {
  std::map<std::string, int> out;
  std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char target[4096];
    ssize_t n = ::readlink((dir + "/" + e->d_name).c_str(), target, sizeof target - 1);
    if (n < 0) continue;
    target[n] = '\0';
    std::string t = target;
    std::string kind = t.rfind("socket:", 0) == 0 ? "socket"
                       : t.rfind("pipe:", 0) == 0 ? "pipe"
                       : t.rfind("anon_inode:", 0) == 0 ? "anon"
                                                        : "file";
    ++out[kind];
  }
  ::closedir(d);
  return out;
}

inline std::vector<std::string> fd_targets(pid_t pid) {
  std::vector<std::string> out;
  std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char target[4096];
    ssize_t n = ::readlink((dir + "/" + e->d_name).c_str(), target, sizeof target - 1);
    if (n >= 0) out.emplace_back(target, static_cast<size_t>(n));
  }
  ::closedir(d);
  return out;
}

// Children of `pid` (its main thread's).
inline std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::string text = read_text("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::stringstream ss(text);
  pid_t c;
  while (ss >> c) out.push_back(c);
  return out;
}

// True if `pid` has exited (gone, or a zombie nobody reaped yet).
inline bool process_gone(pid_t pid) {
  std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  if (stat.empty()) return true;
  auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'Z';
}

// Waits up to `seconds` for process_gone(pid).
inline bool wait_gone(pid_t pid, int seconds = 30) {
  auto deadline = Clock::now() + std::chrono::seconds(seconds);
  while (!process_gone(pid)) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

inline std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename().string());
  return out;
}

// One nbdsnapd process, --foreground, stdout+stderr appended to a log file.
class DaemonProcess {
 public:
  DaemonProcess() = default;
  ~DaemonProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int st;
      ::waitpid(pid_, &st, 0);
    }
  }
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }

  // Starts `binary args...` and waits (20 s) until `api_socket` answers a
  // version request.
  ::testing::AssertionResult start(const std::string& binary, const std::vector<std::string>& args,
                                   const std::string& api_socket, const std::string& log_path) {
    log_path_ = log_path;
    std::vector<std::string> argv = {binary};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargs;
    for (auto& a : argv) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log < 0) return ::testing::AssertionFailure() << "open " << log_path;
    std::string banner = "###";
    for (const auto& a : argv) banner += " " + a;
    banner += "\n";
    (void)!::write(log, banner.data(), banner.size());
    pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(log, 1);
      ::dup2(log, 2);
      ::execv(cargs[0], cargs.data());
      ::_exit(127);
    }
    ::close(log);
    if (pid < 0) return ::testing::AssertionFailure() << "fork failed";
    pid_ = pid;
    auto deadline = Clock::now() + std::chrono::seconds(20);
    std::string last;
    while (Clock::now() < deadline) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        exit_status_ = status;
        return ::testing::AssertionFailure() << "nbdsnapd exited during start-up (status " << status << "):\n"
                                             << read_text(log_path_);
      }
      ApiClient c;
      Status st = c.connect(api_socket);
      if (st) {
        api::Request q;
        q.mutable_version();
        auto r = c.call(q);
        if (r) return ::testing::AssertionSuccess();
        last = r.status().message();
      } else {
        last = st.message();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return ::testing::AssertionFailure() << "nbdsnapd did not answer in 20 s (" << last << "):\n"
                                         << read_text(log_path_);
  }

  // SIGTERM and wait (30 s). Success if it exited 0.
  ::testing::AssertionResult stop() {
    if (pid_ <= 0) return ::testing::AssertionSuccess();
    ::kill(pid_, SIGTERM);
    auto deadline = Clock::now() + std::chrono::seconds(30);
    int status = 0;
    for (;;) {
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (Clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
        return ::testing::AssertionFailure() << "nbdsnapd did not exit within 30 s of SIGTERM:\n"
                                             << read_text(log_path_);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pid_ = -1;
    exit_status_ = status;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "nbdsnapd exited with status " << status << ":\n" << read_text(log_path_);
  }

  // kill -9 and reap.
  void kill9() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &exit_status_, 0);
    pid_ = -1;
  }

  // True if the process is still alive (not exited).
  bool alive() {
    if (pid_ <= 0) return false;
    int status;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      exit_status_ = status;
      return false;
    }
    return true;
  }

  // The nbdkit child (0 if none right now).
  pid_t nbdkit_pid() const {
    auto c = children_of(pid_);
    return c.empty() ? 0 : c.front();
  }

 private:
  pid_t pid_ = -1;
  int exit_status_ = 0;
  std::string log_path_;
};

class DaemonTest : public ::testing::Test {
 protected:
  static constexpr const char* kVolume = "vol0";

  void SetUp() override {
    const char* d = std::getenv("NBDSNAPD");
    const char* p = std::getenv("NBDSNAP_PLUGIN");
    if (!d || !*d || !p || !*p) GTEST_SKIP() << "NBDSNAPD or NBDSNAP_PLUGIN is not set (run through `meson test`)";
    daemon_bin_ = d;
    plugin_ = p;
    if (::access(daemon_bin_.c_str(), X_OK) != 0) GTEST_SKIP() << daemon_bin_ << " is not built";
    if (find_program("nbdkit").empty()) GTEST_SKIP() << "nbdkit is not installed";
    dir_ = std::make_unique<TempDir>();
    volume_path_ = path("vol0.img");
    state_dir_ = path("state");
    api_socket_ = path("api.sock");
    nbd_socket_ = path("nbd.sock");
    log_path_ = path("nbdsnapd.log");
  }

  void TearDown() override {
    if (daemon_.running()) {
      auto stopped = daemon_.stop();
      if (!HasFailure()) {
        EXPECT_TRUE(stopped);
      }
    }
    if (HasFailure() && dir_) std::fprintf(stderr, "---- nbdsnapd log ----\n%s----\n", read_text(log_path_).c_str());
    dir_.reset();
  }

  std::string path(const std::string& name) const { return *dir_ / name; }

  std::vector<std::string> base_args() const {
    return {"--foreground",  "--state-dir", state_dir_,   "--api-socket", api_socket_,
            "--nbd-socket",  nbd_socket_,   "--plugin",   plugin_};
  }

  // Starts nbdsnapd with vol0 and `extra` arguments (remembered for restart).
  ::testing::AssertionResult start_daemon(std::vector<std::string> extra = {}, bool with_volume = true) {
    extra_ = std::move(extra);
    with_volume_ = with_volume;
    return restart_daemon();
  }
  ::testing::AssertionResult restart_daemon() {
    auto args = base_args();
    if (with_volume_) {
      args.push_back("--volume");
      args.push_back(std::string(kVolume) + "=" + volume_path_);
    }
    args.insert(args.end(), extra_.begin(), extra_.end());
    return daemon_.start(daemon_bin_, args, api_socket_, log_path_);
  }

  // ---- API
  std::unique_ptr<ApiClient> api() {
    auto c = std::make_unique<ApiClient>();
    Status st = c->connect(api_socket_);
    if (!st) ADD_FAILURE() << "connect " << api_socket_ << ": " << st.message();
    return c;
  }
  Result<api::Response> call(api::Request q) {
    if (!client_ || !client_->connected()) client_ = api();
    auto r = client_->call(std::move(q));
    if (!r && (r.status().code() == ECONNRESET || r.status().code() == EPROTO)) client_.reset();
    return r;
  }
  Result<api::Response> version() {
    api::Request q;
    q.mutable_version();
    return call(q);
  }
  Result<api::Response> create(const std::vector<std::string>& volumes, const std::string& name = "",
                               const std::string& storage = "", uint64_t limit = 0) {
    api::Request q;
    auto* c = q.mutable_snapshot_create();
    for (const auto& v : volumes) c->add_volumes(v);
    c->set_name(name);
    c->set_storage_path(storage);
    c->set_storage_limit(limit);
    return call(q);
  }
  Result<api::Response> take(const std::string& id) {
    api::Request q;
    q.mutable_take()->set_id(id);
    return call(q);
  }
  Result<api::Response> info(const std::string& id) {
    api::Request q;
    q.mutable_snapshot_info()->set_id(id);
    return call(q);
  }
  Result<api::Response> list() {
    api::Request q;
    q.mutable_snapshot_list();
    return call(q);
  }
  Result<api::Response> destroy(const std::string& id) {
    api::Request q;
    q.mutable_destroy()->set_id(id);
    return call(q);
  }
  Result<api::Response> append_storage(const std::string& id, const std::string& file, uint64_t offset,
                                       uint64_t length) {
    api::Request q;
    auto* a = q.mutable_append_storage();
    a->set_id(id);
    a->set_path(file);
    auto* r = a->add_ranges();
    r->set_offset(offset);
    r->set_length(length);
    return call(q);
  }
  Result<api::Response> cbt_info(const std::string& volume = kVolume) {
    api::Request q;
    q.mutable_cbt_info()->set_volume(volume);
    return call(q);
  }
  Result<api::Response> volume_list() {
    api::Request q;
    q.mutable_volume_list();
    return call(q);
  }

  // ---- NBD
  NbdPtr open(const std::string& export_name, const NbdOptions& o = {}, std::string* error = nullptr,
              int* errnum = nullptr) {
    return nbd_open(nbd_socket_, export_name, o, error, errnum);
  }

  std::string daemon_bin_, plugin_;
  std::unique_ptr<TempDir> dir_;
  std::string volume_path_, state_dir_, api_socket_, nbd_socket_, log_path_;
  std::vector<std::string> extra_;
  bool with_volume_ = true;
  DaemonProcess daemon_;
  std::unique_ptr<ApiClient> client_;
};

inline ::testing::AssertionResult HasError(const Result<api::Response>& r, int code) {
  if (r) return ::testing::AssertionFailure() << "succeeded; expected error " << code << " (" << std::strerror(code) << ")";
  if (r.status().code() != code)
    return ::testing::AssertionFailure() << "error " << r.status().code() << " (" << std::strerror(r.status().code())
                                         << "): " << r.status().message() << "; expected " << code << " ("
                                         << std::strerror(code) << ")";
  if (r.status().message().empty()) return ::testing::AssertionFailure() << "error without a message";
  return ::testing::AssertionSuccess();
}

// ---- raw API socket (malformed input)

struct RawOutcome {
  std::vector<api::Response> replies;
  bool closed = false;     // the daemon closed the connection
  bool timed_out = false;  // neither a reply nor a close within the time
  std::string junk;        // reply bytes that did not parse
};

// Sends `bytes` on a new connection (then shuts down our write side if
// `half_close`), and collects replies until the daemon closes the
// connection or `timeout_ms` passes.
inline RawOutcome raw_exchange(const std::string& socket, const std::string& bytes, bool half_close,
                               int timeout_ms = 5000) {
  RawOutcome out;
  int fd = unix_connect(socket);
  if (fd < 0) {
    out.closed = true;
    out.junk = "connect failed";
    return out;
  }
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the daemon may close before reading it all
    sent += static_cast<size_t>(n);
  }
  if (half_close) ::shutdown(fd, SHUT_WR);
  std::string in;
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left <= 0) {
      out.timed_out = true;
      break;
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, left) <= 0) continue;
    char buf[65536];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) {
      out.closed = true;
      break;
    }
    in.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  // Split replies.
  size_t at = 0;
  while (at < in.size()) {
    uint64_t len = 0;
    size_t i = 0;
    bool done = false;
    for (; at + i < in.size() && i < 5; ++i) {
      len |= static_cast<uint64_t>(static_cast<unsigned char>(in[at + i]) & 0x7f) << (7 * i);
      if (!(static_cast<unsigned char>(in[at + i]) & 0x80)) {
        done = true;
        ++i;
        break;
      }
    }
    if (!done || at + i + len > in.size()) {
      out.junk = in.substr(at);
      break;
    }
    api::Response r;
    if (!r.ParseFromArray(in.data() + at + i, static_cast<int>(len))) {
      out.junk = in.substr(at);
      break;
    }
    out.replies.push_back(r);
    at += i + len;
  }
  return out;
}

inline std::string frame_of(const google::protobuf::MessageLite& m) {
  std::string body = m.SerializeAsString();
  std::string out;
  uint64_t v = body.size();
  do {
    char b = static_cast<char>(v & 0x7f);
    v >>= 7;
    if (v) b = static_cast<char>(b | 0x80);
    out += b;
  } while (v);
  return out + body;
}

}  // namespace nbdsnap::dt
