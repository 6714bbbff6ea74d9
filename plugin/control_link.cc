#include "control_link.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "frame.h"
#include "link.pb.h"
#include "link_service.h"

namespace nbdsnap {
namespace {

constexpr size_t kMaxConnections = 64;

void block_signals() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
}

}  // namespace

ControlLink::ControlLink(Engine& engine, std::string socket_path)
    : engine_(engine), path_(std::move(socket_path)) {}

ControlLink::~ControlLink() { stop(); }

Status ControlLink::start() {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.size() >= sizeof addr.sun_path)
    return Status::error(ENAMETOOLONG, "control socket " + path_ + ": path too long");
  std::strcpy(addr.sun_path, path_.c_str());
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::from_errno("control socket: socket");
  struct stat st;
  if (::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path_.c_str());  // stale
  mode_t old = ::umask(0077);
  int r = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  if (r != 0 || ::listen(listen_fd_, 16) != 0) {
    Status s = Status::from_errno("control socket " + path_ + ": bind/listen");
    ::close(listen_fd_);
    listen_fd_ = -1;
    return s;
  }
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    Status s = Status::from_errno("control socket: eventfd");
    ::close(listen_fd_);
    listen_fd_ = -1;
    return s;
  }
  acceptor_ = std::thread([this] {
    block_signals();
    accept_loop();
  });
  return Status::ok();
}

void ControlLink::accept_loop() {
  while (!stopping_) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    int r = ::poll(p, 2, -1);
    if (r <= 0 || (p[1].revents & POLLIN)) continue;  // stop() wakes us
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::lock_guard lk(mu_);
    reap_finished();
    if (conns_.size() >= kMaxConnections || stopping_) {
      ::close(fd);  // over the limit: the client sees the connection closed
      continue;
    }
    Conn& c = conns_.emplace_back();
    c.fd = fd;
    c.thread = std::thread([this, &c] {
      block_signals();
      serve(&c);
    });
  }
}

void ControlLink::serve(Conn* conn) {
  for (;;) {
    link::Request req;
    FrameResult fr = read_frame(conn->fd, &req);
    if (fr != FrameResult::kOk) {
      if (fr == FrameResult::kMalformed) {  // tell the client why, then close
        link::Response resp;
        resp.set_error_code(EBADMSG);
        resp.set_error(std::string("request: ") + frame_error(fr));
        (void)write_frame(conn->fd, resp);
      }
      break;
    }
    link::Response resp;
    try {
      resp = handle_request(engine_, req);
    } catch (const std::exception& e) {
      resp.Clear();
      resp.set_tag(req.tag());
      resp.set_error_code(ENOMEM);
      resp.set_error(std::string("request: ") + e.what());
    }
    if (!write_frame(conn->fd, resp)) break;
  }
  ::shutdown(conn->fd, SHUT_RDWR);
  conn->done = true;
}

void ControlLink::reap_finished() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if (it->done) {
      it->thread.join();
      ::close(it->fd);
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void ControlLink::stop() {
  if (listen_fd_ < 0) return;
  stopping_ = true;
  uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
  if (acceptor_.joinable()) acceptor_.join();
  ::close(wake_fd_);
  wake_fd_ = -1;
  {
    std::lock_guard lk(mu_);
    for (auto& c : conns_) ::shutdown(c.fd, SHUT_RDWR);
  }
  engine_.interrupt_waits();
  std::lock_guard lk(mu_);
  for (auto& c : conns_) {
    c.thread.join();
    ::close(c.fd);
  }
  conns_.clear();
  ::close(listen_fd_);
  listen_fd_ = -1;
  ::unlink(path_.c_str());
}

}  // namespace nbdsnap
