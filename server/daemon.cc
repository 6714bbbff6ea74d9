// nbdsnapd's I/O: the API socket (one Session per connection), wait-event
// timers, signals, and the nbdkit child (spawn with socket activation,
// readiness, restart with backoff, stop). Everything here runs on the main
// thread's io_context; blocking work goes to the worker pool.
#include <utility>  // before Boost (g++ 12, C++20)

#include <boost/asio.hpp>

#include "daemon.h"

#include <fcntl.h>
#include <grp.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "api.pb.h"
#include "frame.h"
#include "link_client.h"
#include "registry.h"
#include "service.h"

extern char** environ;

namespace nbdsnap::daemon {
namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using local = asio::local::stream_protocol;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr size_t kWorkers = 8;
constexpr size_t kMaxSessions = 256;
constexpr size_t kQueuedBytes = 64 * 1024;
constexpr auto kReadyTimeout = 60s;
constexpr auto kStopTimeout = 30s;
constexpr auto kBackoffFirst = 200ms;
constexpr auto kBackoffMax = 5s;
constexpr auto kStableUptime = 30s;

std::string errno_text(int e) { return std::strerror(e); }

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int s = WTERMSIG(status);
    return std::string("was killed by signal ") + std::to_string(s) + " (" + strsignal(s) + ")";
  }
  return "stopped (status " + std::to_string(status) + ")";
}

// A program name resolved like execvp does; "" if not found.
std::string find_on_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* env = std::getenv("PATH");
  std::string path = env ? env : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    if (dir.empty()) dir = ".";
    std::string p = dir + "/" + name;
    std::error_code ec;
    if (::access(p.c_str(), X_OK) == 0) return fs::absolute(p, ec).lexically_normal().string();
    start = end + 1;
  }
  return "";
}

// Unix socket path helpers.
Status fill_sockaddr(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof addr->sun_path)
    return Status::error(ENAMETOOLONG, "socket " + path + ": path too long (at most 107 bytes)");
  std::memcpy(addr->sun_path, path.c_str(), path.size());
  return Status::ok();
}

// A socket file left behind is removed; one that answers is in use.
Status clear_stale_socket(const std::string& path, const std::string& what) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return Status::ok();
  if (!S_ISSOCK(st.st_mode))
    return Status::error(EEXIST, what + " " + path + ": exists and is not a socket");
  sockaddr_un addr;
  Status s = fill_sockaddr(path, &addr);
  if (!s) return s;
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    int r = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::close(fd);
    if (r == 0) return Status::error(EADDRINUSE, what + " " + path + ": in use by another process");
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Status::from_errno(what + " " + path + ": remove stale");
  return Status::ok();
}

// sd_notify(3) without libsystemd.
void sd_notify(const std::string& text) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (!path || (path[0] != '/' && path[0] != '@')) return;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  size_t len = std::strlen(path);
  if (len >= sizeof addr.sun_path) return;
  std::memcpy(addr.sun_path, path, len);
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  (void)::sendto(fd, text.data(), text.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&addr),
                 static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len));
  ::close(fd);
}

std::string varint_prefix(size_t n) {
  std::string out;
  uint64_t v = n;
  do {
    char b = static_cast<char>(v & 0x7f);
    v >>= 7;
    if (v) b = static_cast<char>(b | 0x80);
    out += b;
  } while (v);
  return out;
}

class Daemon;

// One API connection. Requests are answered one at a time, in order. Reading
// goes on while a request is answered (so a client that goes away is noticed)
// but stops at 64 KiB of queued requests, and a reply is written before the
// next request starts: a client that does not read its replies stalls only
// itself.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Daemon& d, local::socket sock) : d_(d), sock_(std::move(sock)), timer_(sock_.get_executor()) {}
  void start() { maybe_read(); }
  void close();
  void wake() { timer_.cancel(); }

 private:
  void maybe_read();
  void on_eof();
  void process();
  void dispatch(api::Request req);
  void send(api::Response resp, bool close_after = false);
  void send_error(uint64_t tag, const Status& st, bool close_after = false);
  void start_wait(const api::Request& req);
  void begin_wait(const std::string& id, uint32_t timeout_ms);
  void check_wait();
  void finish_wait();

  Daemon& d_;
  local::socket sock_;
  asio::steady_timer timer_;
  std::vector<uint8_t> in_;
  std::array<uint8_t, 65536> rbuf_;
  std::string out_;
  size_t needed_ = 0;     // bytes of the frame being assembled, once known
  bool reading_ = false;  // a read is outstanding
  bool eof_ = false;      // the client sends no more
  bool busy_ = false;     // a request is being answered
  bool closing_ = false;
  // wait-event
  bool waiting_ = false;
  uint64_t wait_tag_ = 0;
  std::string wait_id_;
  Clock::time_point wait_deadline_;
  std::map<std::string, uint64_t> cursors_;  // per snapshot: next event index

  friend class Daemon;
};

class Daemon {
 public:
  Daemon(const Options& o, int ready_fd)
      : options_(o),
        paths_(o.state_dir),
        registry_(paths_.registry),
        ready_fd_(ready_fd),
        signals_(io_),
        acceptor_(io_),
        restart_timer_(io_),
        kill_timer_(io_),
        failure_timer_(io_) {}

  ~Daemon() {
    if (lock_fd_ >= 0) ::close(lock_fd_);
    for (int fd : listen_fds_) ::close(fd);
  }

  int run();

  // Used by sessions.
  asio::io_context io_;
  std::optional<asio::thread_pool> pool_;
  std::unique_ptr<Service> service_;
  std::set<std::shared_ptr<Session>> sessions_;
  std::map<std::string, std::set<Session*>> waiters_;
  uint32_t restarts_ = 0;

 private:
  Status prepare();
  Status make_nbd_sockets();
  void spawn_child();
  void check_ready(uint64_t epoch);
  void on_ready(uint64_t epoch);
  void on_ready_timeout(uint64_t epoch, const std::string& why);
  void reap();
  void schedule_restart();
  void start_relay(int fd);
  void relay_read();
  void finish_startup();
  void startup_failed(const std::string& message);
  void report_failure_now();
  void shutdown(const std::string& why);
  void finish_shutdown();
  void do_accept();
  void wait_signals();
  void notify_waiters(const std::string& id);
  void tell_parent(const std::string& text);

  const Options& options_;
  Paths paths_;
  Registry registry_;
  int ready_fd_;
  int lock_fd_ = -1;
  bool volumes_added_ = false;
  bool logging_to_file_ = false;
  std::string plugin_;
  std::string nbdkit_path_;  // resolved like execvp would
  std::string tcp_uri_host_, tcp_port_;
  std::vector<int> listen_fds_;
  gid_t api_gid_ = static_cast<gid_t>(-1);

  asio::signal_set signals_;
  local::acceptor acceptor_;
  bool api_socket_created_ = false;
  asio::steady_timer restart_timer_, kill_timer_, failure_timer_;

  // The nbdkit child.
  pid_t child_ = -1;
  uint64_t spawn_epoch_ = 0;
  std::atomic<uint64_t> exited_epoch_{0};
  std::atomic<bool> stopping_{false};
  Clock::time_point child_started_;
  Clock::duration backoff_ = kBackoffFirst;
  bool ready_once_ = false;
  std::string ready_failure_;  // why the child was killed before it was ready

  // nbdkit's stderr, relayed to ours; the last lines go into error messages.
  std::shared_ptr<asio::posix::stream_descriptor> relay_;
  std::array<char, 4096> relay_buf_;
  std::string relay_partial_;
  std::deque<std::string> tail_;

  // Start-up failure waiting for the relay to drain.
  std::optional<std::string> pending_failure_;

  bool shutting_down_ = false;
  int exit_code_ = 0;
};

// ------------------------------------------------------------------ Session

void Session::close() {
  if (closing_) return;
  closing_ = true;
  if (waiting_) finish_wait();
  timer_.cancel();
  boost::system::error_code ec;
  sock_.close(ec);
  d_.sessions_.erase(shared_from_this());
}

void Session::maybe_read() {
  if (closing_ || reading_ || eof_) return;
  // Back-pressure: buffer the frame being assembled, or up to 64 KiB of
  // requests queued behind the one being answered; no more.
  if (in_.size() >= std::max<size_t>(kQueuedBytes, needed_)) return;
  reading_ = true;
  auto self = shared_from_this();
  sock_.async_read_some(asio::buffer(rbuf_), [self](const boost::system::error_code& ec, size_t n) {
    self->reading_ = false;
    if (ec) {
      self->on_eof();
      return;
    }
    self->in_.insert(self->in_.end(), self->rbuf_.begin(), self->rbuf_.begin() + static_cast<long>(n));
    self->process();
    self->maybe_read();
  });
}

void Session::on_eof() {
  eof_ = true;
  if (closing_) return;
  if (!busy_) {  // nothing in flight; a partial frame is dropped
    close();
    return;
  }
  // A request is in flight. If the client only shut down its sending side
  // it still gets the reply; if it is gone, a wait-event need not go on.
  pollfd p{sock_.native_handle(), POLLOUT, 0};
  if (waiting_ && ::poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR))) close();
}

void Session::process() {
  if (closing_ || busy_) return;
  uint64_t len = 0;
  size_t header = 0;
  for (size_t i = 0; i < in_.size() && i < 5; ++i) {
    len |= static_cast<uint64_t>(in_[i] & 0x7f) << (7 * i);
    if ((in_[i] & 0x80) == 0) {
      header = i + 1;
      break;
    }
  }
  if (header == 0) {
    if (in_.size() >= 5) {
      busy_ = true;
      send_error(0, Status::error(EBADMSG, "request: frame length prefix longer than 5 bytes"), true);
      return;
    }
    needed_ = 0;
    if (eof_) close();  // truncated
    return;
  }
  if (len > kMaxFrame) {
    busy_ = true;
    send_error(0, Status::error(EMSGSIZE, "request: frame of " + std::to_string(len) +
                                              " bytes is larger than the 4 MiB maximum"), true);
    return;
  }
  if (in_.size() < header + len) {
    needed_ = header + len;
    if (eof_) close();  // truncated
    return;
  }
  needed_ = 0;
  api::Request req;
  bool ok = req.ParseFromArray(in_.data() + header, static_cast<int>(len));
  in_.erase(in_.begin(), in_.begin() + static_cast<long>(header + len));
  busy_ = true;
  if (!ok) {
    send_error(0, Status::error(EBADMSG, "request: malformed frame (not an nbdsnap API request)"), true);
    return;
  }
  dispatch(std::move(req));
}

void Session::dispatch(api::Request req) {
  const uint64_t tag = req.tag();
  if (req.protocol() != kApiProtocol) {
    send_error(tag, Status::error(EPROTONOSUPPORT,
                                  "request: API protocol " + std::to_string(req.protocol()) +
                                      " is not supported: nbdsnapd " NBDSNAP_VERSION " speaks protocol " +
                                      std::to_string(kApiProtocol)));
    return;
  }
  switch (req.op_case()) {
    case api::Request::OP_NOT_SET:
      send_error(tag, Status::error(ENOTSUP, "request: unknown or missing request type (client newer than "
                                             "nbdsnapd " NBDSNAP_VERSION "?)"));
      return;
    case api::Request::kVersion: {
      api::Response resp;
      resp.set_tag(tag);
      auto* v = resp.mutable_version();
      v->set_version(NBDSNAP_VERSION);
      v->set_protocol(kApiProtocol);
      v->set_data_plane(d_.service_->data_plane_up() ? "running" : "restarting");
      v->set_data_plane_restarts(d_.restarts_);
      send(std::move(resp));
      return;
    }
    case api::Request::kWaitEvent:
      start_wait(req);
      return;
    default:
      break;
  }
  auto self = shared_from_this();
  asio::post(*d_.pool_, [self, req = std::move(req)] {
    api::Response resp = self->d_.service_->handle(req);
    asio::post(self->d_.io_, [self, resp = std::move(resp)]() mutable { self->send(std::move(resp)); });
  });
}

void Session::send(api::Response resp, bool close_after) {
  if (closing_) return;
  std::string body;
  if (!resp.SerializeToString(&body) || body.size() > kMaxFrame) {
    api::Response e;
    e.set_tag(resp.tag());
    e.set_error_code(EMSGSIZE);
    e.set_error("reply: larger than the 4 MiB frame maximum (ask for less, e.g. fewer CBT blocks)");
    body = e.SerializeAsString();
  }
  out_ = varint_prefix(body.size()) + body;
  auto self = shared_from_this();
  asio::async_write(sock_, asio::buffer(out_), [self, close_after](const boost::system::error_code& ec, size_t) {
    if (ec || close_after) {
      self->close();
      return;
    }
    self->busy_ = false;
    self->process();
    self->maybe_read();
  });
}

void Session::send_error(uint64_t tag, const Status& st, bool close_after) {
  api::Response resp;
  resp.set_tag(tag);
  resp.set_error_code(st.code());
  resp.set_error(st.message());
  send(std::move(resp), close_after);
}

void Session::start_wait(const api::Request& req) {
  wait_tag_ = req.tag();
  const auto& w = req.wait_event();
  if (w.id().empty()) {
    send_error(wait_tag_, Status::error(EINVAL, "wait-event: no snapshot given"));
    return;
  }
  if (auto id = d_.service_->events().resolve(w.id())) {
    begin_wait(*id, w.timeout_ms());
    return;
  }
  // Not known yet (or a name): ask the data plane, off the I/O thread.
  auto self = shared_from_this();
  asio::post(*d_.pool_, [self, key = w.id(), timeout = w.timeout_ms()] {
    auto r = self->d_.service_->resolve_snapshot(key);
    asio::post(self->d_.io_, [self, r, timeout] {
      if (!r)
        self->send_error(self->wait_tag_, r.status());
      else
        self->begin_wait(r.value(), timeout);
    });
  });
}

void Session::begin_wait(const std::string& id, uint32_t timeout_ms) {
  if (closing_) return;
  if (cursors_.size() > 64) {  // forget the cursors of destroyed snapshots
    link::Event ignore;
    for (auto it = cursors_.begin(); it != cursors_.end();) {
      uint64_t probe = UINT64_MAX;
      if (it->first != id && d_.service_->events().next(it->first, &probe, &ignore) == EventHub::Next::kGone)
        it = cursors_.erase(it);
      else
        ++it;
    }
  }
  wait_id_ = id;
  wait_deadline_ = Clock::now() + std::chrono::milliseconds(timeout_ms);
  waiting_ = true;
  d_.waiters_[id].insert(this);
  check_wait();
}

void Session::check_wait() {
  if (!waiting_ || closing_) return;
  link::Event ev;
  switch (d_.service_->events().next(wait_id_, &cursors_[wait_id_], &ev)) {
    case EventHub::Next::kEvent: {
      finish_wait();
      api::Response resp;
      resp.set_tag(wait_tag_);
      *resp.mutable_wait_event()->mutable_event() = ev;
      send(std::move(resp));
      return;
    }
    case EventHub::Next::kGone: {
      std::string id = wait_id_;
      finish_wait();
      cursors_.erase(id);
      send_error(wait_tag_, Status::error(ENOENT, "wait-event: no such snapshot \"" + id + "\" (destroyed)"));
      return;
    }
    case EventHub::Next::kNone:
      break;
  }
  if (Clock::now() >= wait_deadline_) {
    finish_wait();
    api::Response resp;
    resp.set_tag(wait_tag_);
    resp.mutable_wait_event();  // no event: the timeout passed
    send(std::move(resp));
    return;
  }
  timer_.expires_at(wait_deadline_);
  auto self = shared_from_this();
  timer_.async_wait([self](const boost::system::error_code&) { self->check_wait(); });
}

void Session::finish_wait() {
  waiting_ = false;
  auto it = d_.waiters_.find(wait_id_);
  if (it != d_.waiters_.end()) {
    it->second.erase(this);
    if (it->second.empty()) d_.waiters_.erase(it);
  }
}

// ------------------------------------------------------------------ Daemon

void Daemon::tell_parent(const std::string& text) {
  if (ready_fd_ < 0) return;
  (void)!::write(ready_fd_, text.data(), text.size());
  ::close(ready_fd_);
  ready_fd_ = -1;
}

Status Daemon::prepare() {
  std::error_code ec;
  for (const auto& dir : {paths_.state_dir, paths_.data_dir, paths_.storage_dir}) {
    bool existed = fs::exists(dir, ec);
    fs::create_directories(dir, ec);
    if (ec) return Status::error(ec.value(), "create state directory " + dir + ": " + ec.message());
    if (!existed) ::chmod(dir.c_str(), 0700);
  }
  for (const auto& sock : {options_.api_socket, options_.nbd_socket}) {
    std::string parent = fs::path(sock).parent_path().string();
    if (parent.empty()) continue;
    fs::create_directories(parent, ec);
    if (ec) return Status::error(ec.value(), "create socket directory " + parent + ": " + ec.message());
  }
  lock_fd_ = ::open(paths_.lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd_ < 0) return Status::from_errno("state directory " + paths_.state_dir + ": open lock");
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0)
    return Status::error(EBUSY, "state directory " + paths_.state_dir + ": in use by another nbdsnapd");

  if (ready_fd_ >= 0) {  // daemonized: log to the state directory
    int log = ::open(paths_.log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log < 0) return Status::from_errno("open log " + paths_.log);
    ::dup2(log, 2);
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::close(null);
    }
    ::close(log);
    set_log_timestamps(true);
    logging_to_file_ = true;
  }

  // An nbdkit of a previous nbdsnapd that was killed may still be exiting
  // (it gets SIGTERM when its parent dies): wait for it to let go of the
  // data plane's state rather than fail the first start.
  {
    std::string data_lock = paths_.data_dir + "/lock";
    int fd = ::open(data_lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return Status::from_errno("data plane state " + paths_.data_dir + ": open lock");
    auto deadline = Clock::now() + 15s;
    while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      if (Clock::now() > deadline) {
        ::close(fd);
        return Status::error(EBUSY, "data plane state " + paths_.data_dir +
                                        ": still in use by another process (an nbdkit of a previous nbdsnapd?)");
      }
      std::this_thread::sleep_for(50ms);
    }
    ::close(fd);  // releases the lock
  }

  Status st = registry_.load();
  if (!st) return st;
  for (const auto& [name, path] : options_.volumes) {
    if (const std::string* known = registry_.volume_path(name)) {
      if (*known != path)
        return Status::error(EEXIST, "--volume " + name + "=" + path + ": volume " + name +
                                         " is already registered with path " + *known +
                                         " (remove it first: nbdsnap volume remove " + name + ")");
      continue;
    }
    struct stat s;
    if (::stat(path.c_str(), &s) != 0) return Status::from_errno("--volume " + name + "=" + path);
    for (const auto& [other, opath] : registry_.volumes)
      if (opath == path)
        return Status::error(EINVAL, "--volume " + name + "=" + path + ": already served as volume " + other);
    registry_.volumes.emplace_back(name, path);
    volumes_added_ = true;
  }

  plugin_ = resolve_plugin(options_);
  if (plugin_.find('/') != std::string::npos && ::access(plugin_.c_str(), R_OK) != 0)
    return Status::from_errno("plugin " + plugin_ + " (give --plugin PATH or set NBDSNAP_PLUGIN)");
  nbdkit_path_ = find_on_path(options_.nbdkit);
  if (nbdkit_path_.empty())
    return Status::error(ENOENT, "nbdkit program \"" + options_.nbdkit +
                                     "\": not found (install nbdkit or give --nbdkit PATH)");
  if (!options_.tls_psk.empty() && ::access(options_.tls_psk.c_str(), R_OK) != 0)
    return Status::from_errno("--tls-psk " + options_.tls_psk);
  if (!options_.api_group.empty()) {
    std::vector<char> buf(16384);
    struct group g, *res = nullptr;
    int r = ::getgrnam_r(options_.api_group.c_str(), &g, buf.data(), buf.size(), &res);
    if (r != 0 || !res) {
      bool numeric = options_.api_group.find_first_not_of("0123456789") == std::string::npos;
      if (!numeric) return Status::error(r ? r : ENOENT, "--api-group " + options_.api_group + ": no such group");
      api_gid_ = static_cast<gid_t>(std::stoul(options_.api_group));
    } else {
      api_gid_ = res->gr_gid;
    }
  }
  st = clear_stale_socket(options_.api_socket, "API socket");
  if (!st) return st;
  return make_nbd_sockets();
}

Status Daemon::make_nbd_sockets() {
  const mode_t mode = options_.api_group.empty() ? 0600 : 0660;
  Status st = clear_stale_socket(options_.nbd_socket, "NBD socket");
  if (!st) return st;
  sockaddr_un addr;
  st = fill_sockaddr(options_.nbd_socket, &addr);
  if (!st) return st.with_context("NBD");
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::from_errno("NBD socket: socket");
  mode_t old = ::umask(0177);
  int r = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  if (r != 0 || ::listen(fd, 128) != 0) {
    st = Status::from_errno("NBD socket " + options_.nbd_socket + ": bind/listen");
    ::close(fd);
    return st;
  }
  listen_fds_.push_back(fd);
  if (::chmod(options_.nbd_socket.c_str(), mode) != 0)
    return Status::from_errno("NBD socket " + options_.nbd_socket + ": chmod");
  if (api_gid_ != static_cast<gid_t>(-1) && ::chown(options_.nbd_socket.c_str(), static_cast<uid_t>(-1), api_gid_) != 0)
    return Status::from_errno("NBD socket " + options_.nbd_socket + ": chown to group " + options_.api_group);

  if (options_.nbd_listen.empty()) return Status::ok();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string& host = options_.listen_host;
  int g = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), options_.listen_port.c_str(), &hints, &res);
  if (g != 0) return Status::error(EINVAL, "--nbd-listen " + options_.nbd_listen + ": " + ::gai_strerror(g));
  Status last = Status::error(EADDRNOTAVAIL, "--nbd-listen " + options_.nbd_listen + ": no address");
  int tcp = -1;
  for (addrinfo* a = res; a && tcp < 0; a = a->ai_next) {
    int s = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (s < 0) {
      last = Status::from_errno("--nbd-listen " + options_.nbd_listen + ": socket");
      continue;
    }
    int one = 1;
    ::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(s, a->ai_addr, a->ai_addrlen) != 0 || ::listen(s, 128) != 0) {
      last = Status::from_errno("--nbd-listen " + options_.nbd_listen + ": bind/listen");
      ::close(s);
      continue;
    }
    tcp = s;
  }
  ::freeaddrinfo(res);
  if (tcp < 0) return last;
  listen_fds_.push_back(tcp);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(tcp, reinterpret_cast<sockaddr*>(&ss), &len);
  char hbuf[NI_MAXHOST], pbuf[NI_MAXSERV];
  ::getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, hbuf, sizeof hbuf, pbuf, sizeof pbuf,
                NI_NUMERICHOST | NI_NUMERICSERV);
  tcp_port_ = pbuf;
  std::string h = host;
  if (h.empty() || h == "0.0.0.0" || h == "::") {
    char name[256] = {};
    ::gethostname(name, sizeof name - 1);
    h = name;
  }
  tcp_uri_host_ = h.find(':') != std::string::npos ? "[" + h + "]" : h;
  return Status::ok();
}

void Daemon::spawn_child() {
  ++spawn_epoch_;
  tail_.clear();
  ready_failure_.clear();
  std::vector<std::string> argv = {options_.nbdkit, "-f"};
  if (!options_.tls_psk.empty()) {
    argv.push_back("--tls=require");
    argv.push_back("--tls-psk=" + options_.tls_psk);
  }
  argv.push_back(plugin_);
  argv.push_back("state=" + paths_.data_dir);
  argv.push_back("control=" + paths_.link_socket);
  for (const auto& v : service_->volume_args()) argv.push_back(v);
  for (const auto& [k, v] : options_.params) argv.push_back(k + "=" + v);

  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    std::string s = *e;
    if (s.rfind("LISTEN_", 0) == 0 || s.rfind("NOTIFY_SOCKET=", 0) == 0) continue;
    env.push_back(s);
  }
  env.push_back("LISTEN_FDS=" + std::to_string(listen_fds_.size()));
  env.push_back("LISTEN_PID=" + std::string(24, '\0'));
  std::vector<char*> args, envp;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  char* pid_slot = env.back().data() + std::strlen("LISTEN_PID=");
  const char* program = nbdkit_path_.c_str();

  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) {
    log_line("start nbdkit: pipe: " + errno_text(errno));
    schedule_restart();
    return;
  }
  int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = ::getpid();
  const int nfds = static_cast<int>(listen_fds_.size());
  int listen[2] = {listen_fds_.size() > 0 ? listen_fds_[0] : -1, listen_fds_.size() > 1 ? listen_fds_[1] : -1};

  pid_t pid = ::fork();
  if (pid == 0) {
    // Child: async-signal-safe calls only.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive the daemon
    if (::getppid() != parent) ::_exit(1);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGPIPE, &dfl, nullptr);
    int high[2] = {-1, -1};
    for (int i = 0; i < nfds; ++i) high[i] = ::fcntl(listen[i], F_DUPFD_CLOEXEC, 64);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(pipefd[1], 1);
    ::dup2(pipefd[1], 2);
    for (int i = 0; i < nfds; ++i) ::dup2(high[i], 3 + i);  // systemd socket activation: fds 3...
    ::close_range(static_cast<unsigned>(3 + nfds), ~0u, 0);
    // LISTEN_PID=<our pid>
    char digits[24];
    int n = 0;
    for (pid_t p = ::getpid(); p > 0; p /= 10) digits[n++] = static_cast<char>('0' + p % 10);
    for (int i = 0; i < n; ++i) pid_slot[i] = digits[n - 1 - i];
    pid_slot[n] = '\0';
    ::execve(program, args.data(), envp.data());
    const char msg[] = "nbdsnapd: exec nbdkit failed\n";
    (void)!::write(2, msg, sizeof msg - 1);
    ::_exit(127);
  }
  int fork_errno = errno;
  ::close(pipefd[1]);
  if (devnull >= 0) ::close(devnull);
  if (pid < 0) {
    ::close(pipefd[0]);
    log_line("start nbdkit: fork: " + errno_text(fork_errno));
    if (!ready_once_) {
      startup_failed("start data plane: fork: " + errno_text(fork_errno));
      return;
    }
    schedule_restart();
    return;
  }
  child_ = pid;
  child_started_ = Clock::now();
  std::string cmd;
  for (const auto& a : argv) cmd += (cmd.empty() ? "" : " ") + a;
  log_line("data plane: started nbdkit (pid " + std::to_string(pid) + "): " + cmd);
  start_relay(pipefd[0]);
  const uint64_t epoch = spawn_epoch_;
  asio::post(*pool_, [this, epoch] { check_ready(epoch); });
}

// Worker thread: waits until the new nbdkit answers on the control link,
// then reconciles the daemon's view with it.
void Daemon::check_ready(uint64_t epoch) {
  const auto deadline = Clock::now() + kReadyTimeout;
  LinkClient client;
  Status last = Status::error(ETIMEDOUT, "no answer");
  while (!stopping_ && exited_epoch_.load() < epoch) {
    if (Clock::now() > deadline) {
      std::string why = "did not become ready within " + std::to_string(kReadyTimeout.count()) + " s (" +
                        last.message() + ")";
      asio::post(io_, [this, epoch, why] { on_ready_timeout(epoch, why); });
      return;
    }
    last = client.connect(paths_.link_socket);
    if (last) {
      link::Request q;
      q.mutable_version();
      auto r = client.call(q);
      last = r.status();
      if (r) {
        last = service_->reconcile(client);
        if (last) {
          asio::post(io_, [this, epoch] { on_ready(epoch); });
          return;
        }
        log_line("data plane: " + last.message());
      }
    }
    client.close();
    std::this_thread::sleep_for(20ms);
  }
}

void Daemon::on_ready(uint64_t epoch) {
  if (epoch != spawn_epoch_ || child_ <= 0 || shutting_down_) return;
  service_->set_data_plane_up(true);
  log_line("data plane: ready (nbdkit pid " + std::to_string(child_) + ")");
  if (!ready_once_) finish_startup();
}

void Daemon::on_ready_timeout(uint64_t epoch, const std::string& why) {
  if (epoch != spawn_epoch_ || child_ <= 0 || shutting_down_) return;
  ready_failure_ = why;
  log_line("data plane: nbdkit (pid " + std::to_string(child_) + ") " + why + "; killing it");
  ::kill(child_, SIGKILL);
}

void Daemon::reap() {
  if (child_ <= 0) return;
  int status = 0;
  pid_t r = ::waitpid(child_, &status, WNOHANG);
  if (r != child_) return;
  const pid_t pid = child_;
  child_ = -1;
  exited_epoch_ = spawn_epoch_;
  service_->set_data_plane_up(false);
  kill_timer_.cancel();
  std::string what = "nbdkit (pid " + std::to_string(pid) + ") " + describe_exit(status);
  if (!ready_failure_.empty()) what += " after it " + ready_failure_;
  if (shutting_down_) {
    log_line("data plane: " + what);
    finish_shutdown();
    return;
  }
  if (!ready_once_) {
    startup_failed("start data plane: " + what);
    return;
  }
  log_line("data plane: " + what + "; API calls get EAGAIN until it is back");
  schedule_restart();
}

void Daemon::schedule_restart() {
  if (Clock::now() - child_started_ >= kStableUptime) backoff_ = kBackoffFirst;
  auto delay = backoff_;
  backoff_ = std::min<Clock::duration>(backoff_ * 2, kBackoffMax);
  log_line("data plane: restarting nbdkit in " +
           std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(delay).count()) + " ms");
  restart_timer_.expires_after(delay);
  restart_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || shutting_down_) return;
    ++restarts_;
    spawn_child();
  });
}

void Daemon::start_relay(int fd) {
  relay_ = std::make_shared<asio::posix::stream_descriptor>(io_, fd);
  relay_partial_.clear();
  relay_read();
}

void Daemon::relay_read() {
  auto relay = relay_;
  relay->async_read_some(asio::buffer(relay_buf_), [this, relay](const boost::system::error_code& ec, size_t n) {
    if (relay != relay_) return;  // a newer child's relay replaced this one
    auto emit = [this](const std::string& line) {
      log_raw(line);
      tail_.push_back(line);
      if (tail_.size() > 12) tail_.pop_front();
    };
    if (ec) {
      if (!relay_partial_.empty()) emit(relay_partial_);
      relay_partial_.clear();
      boost::system::error_code ignore;
      relay->close(ignore);
      relay_.reset();
      if (pending_failure_) report_failure_now();
      return;
    }
    relay_partial_.append(relay_buf_.data(), n);
    size_t nl;
    while ((nl = relay_partial_.find('\n')) != std::string::npos) {
      emit(relay_partial_.substr(0, nl));
      relay_partial_.erase(0, nl + 1);
    }
    relay_read();
  });
}

void Daemon::finish_startup() {
  // The API socket: created now, so that it answers as soon as it exists.
  const std::string& path = options_.api_socket;
  boost::system::error_code ec;
  Status st = clear_stale_socket(path, "API socket");
  if (!st) {
    startup_failed(st.message());
    return;
  }
  acceptor_.open(local(), ec);
  if (!ec) {
    mode_t old = ::umask(0177);
    acceptor_.bind(local::endpoint(path), ec);
    ::umask(old);
  }
  if (!ec) api_socket_created_ = true;
  if (!ec) acceptor_.listen(128, ec);
  if (ec) {
    startup_failed("API socket " + path + ": bind/listen: " + ec.message());
    return;
  }
  ::fcntl(acceptor_.native_handle(), F_SETFD, FD_CLOEXEC);
  const mode_t mode = options_.api_group.empty() ? 0600 : 0660;
  if (::chmod(path.c_str(), mode) != 0) {
    startup_failed("API socket " + path + ": chmod: " + errno_text(errno));
    return;
  }
  if (api_gid_ != static_cast<gid_t>(-1) && ::chown(path.c_str(), static_cast<uid_t>(-1), api_gid_) != 0) {
    startup_failed("API socket " + path + ": chown to group " + options_.api_group + ": " + errno_text(errno));
    return;
  }
  if (volumes_added_) {
    st = service_->persist();
    if (!st) log_line(st.message());
  }
  ready_once_ = true;
  do_accept();
  std::string where = "API " + path + ", NBD " + options_.nbd_socket;
  if (!tcp_port_.empty()) where += " and " + tcp_uri_host_ + ":" + tcp_port_;
  log_line("ready: " + where);
  tell_parent("OK\n");
  sd_notify("READY=1\nMAINPID=" + std::to_string(::getpid()) + "\n");
}

void Daemon::startup_failed(const std::string& message) {
  if (pending_failure_ || shutting_down_) return;
  exit_code_ = 1;
  pending_failure_ = message;
  if (!relay_) {
    report_failure_now();
    return;
  }
  // Let nbdkit's last words arrive first (they explain the failure).
  failure_timer_.expires_after(1s);
  failure_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec && pending_failure_) report_failure_now();
  });
}

void Daemon::report_failure_now() {
  if (!pending_failure_) return;
  std::string msg = *pending_failure_;
  pending_failure_.reset();
  failure_timer_.cancel();
  if (!tail_.empty()) {
    msg += "; its last messages:";
    for (const auto& l : tail_) msg += "\n  " + l;
  }
  log_line(msg);
  if (ready_fd_ >= 0) tell_parent("nbdsnapd: " + msg + "\n");
  shutdown("start-up failed");
}

void Daemon::shutdown(const std::string& why) {
  if (shutting_down_) return;
  shutting_down_ = true;
  stopping_ = true;
  log_line("stopping (" + why + ")");
  if (!ready_once_) tell_parent("nbdsnapd: start-up interrupted (" + why + ")\n");
  sd_notify("STOPPING=1\n");
  boost::system::error_code ec;
  acceptor_.close(ec);
  if (api_socket_created_) ::unlink(options_.api_socket.c_str());
  auto sessions = sessions_;
  for (auto& s : sessions) s->close();
  restart_timer_.cancel();
  failure_timer_.cancel();
  if (service_) service_->set_data_plane_up(false);
  if (child_ > 0) {
    ::kill(child_, SIGTERM);
    kill_timer_.expires_after(kStopTimeout);
    kill_timer_.async_wait([this](const boost::system::error_code& e) {
      if (e || child_ <= 0) return;
      log_line("data plane: nbdkit did not stop within 30 s of SIGTERM; killing it");
      ::kill(child_, SIGKILL);
    });
    return;
  }
  finish_shutdown();
}

void Daemon::finish_shutdown() {
  for (int fd : listen_fds_) ::close(fd);
  listen_fds_.clear();
  ::unlink(options_.nbd_socket.c_str());
  boost::system::error_code ec;
  signals_.cancel(ec);
  kill_timer_.cancel();
  if (exit_code_ == 0) log_line("stopped");
  io_.stop();
}

void Daemon::do_accept() {
  acceptor_.async_accept([this](const boost::system::error_code& ec, local::socket sock) {
    if (shutting_down_) return;
    if (ec) {
      log_line("API socket: accept: " + ec.message());
      // Out of descriptors: try again a little later rather than spin.
      auto t = std::make_shared<asio::steady_timer>(io_, 100ms);
      t->async_wait([this, t](const boost::system::error_code&) {
        if (!shutting_down_) do_accept();
      });
      return;
    }
    ::fcntl(sock.native_handle(), F_SETFD, FD_CLOEXEC);
    if (sessions_.size() >= kMaxSessions) {
      boost::system::error_code ignore;
      sock.close(ignore);  // over the limit: the client sees the connection closed
    } else {
      auto s = std::make_shared<Session>(*this, std::move(sock));
      sessions_.insert(s);
      s->start();
    }
    do_accept();
  });
}

void Daemon::wait_signals() {
  signals_.async_wait([this](const boost::system::error_code& ec, int signo) {
    if (ec) return;
    if (signo == SIGCHLD) {
      reap();
    } else {
      shutdown(signo == SIGTERM ? "SIGTERM" : "SIGINT");
    }
    wait_signals();
  });
}

void Daemon::notify_waiters(const std::string& id) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return;
  for (Session* s : std::vector<Session*>(it->second.begin(), it->second.end())) s->wake();
}

int Daemon::run() {
  Status st = prepare();
  if (!st) {
    if (ready_fd_ < 0 || logging_to_file_) log_line(st.message());
    tell_parent("nbdsnapd: " + st.message() + "\n");
    if (!listen_fds_.empty()) ::unlink(options_.nbd_socket.c_str());
    return 1;
  }
  service_ = std::make_unique<Service>(options_, paths_, &registry_);
  service_->set_endpoints(tcp_uri_host_, tcp_port_);
  service_->events().set_notify([this](const std::string& id) {
    asio::post(io_, [this, id] { notify_waiters(id); });
  });
  signals_.add(SIGTERM);
  signals_.add(SIGINT);
  signals_.add(SIGCHLD);
  wait_signals();
  pool_.emplace(kWorkers);
  service_->start_pumps();
  spawn_child();
  io_.run();

  // Stopped: nbdkit has exited, so blocked link calls have returned.
  stopping_ = true;
  service_->stop_pumps();
  pool_->join();
  sessions_.clear();
  waiters_.clear();
  return exit_code_;
}

}  // namespace

int run_daemon(const Options& options, int ready_fd) {
  Daemon d(options, ready_fd);
  return d.run();
}

}  // namespace nbdsnap::daemon
