// ControlLink: the plugin's end of the internal control link. Listens on a
// Unix socket (mode 0600), serves each connection in its own thread (at most
// 64), reads length-delimited Requests and answers through handle_request().
// A malformed or oversized frame closes that connection only.
//
// start() from nbdkit's .after_fork (threads do not survive the daemonizing
// fork); stop() from .cleanup joins every thread. Its threads block all
// signals. start/stop are not thread-safe; the rest is internal.
#pragma once

#include <atomic>
#include <list>
#include <mutex>
#include <string>
#include <thread>

#include "engine.h"

namespace nbdsnap {

class ControlLink {
 public:
  ControlLink(Engine& engine, std::string socket_path);
  ~ControlLink();
  Status start();
  void stop();

 private:
  struct Conn {
    int fd;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  void accept_loop();
  void serve(Conn* conn);
  void reap_finished();  // requires mu_

  Engine& engine_;
  const std::string path_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: stop() wakes the accept loop
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<Conn> conns_;  // guarded by mu_
};

}  // namespace nbdsnap
