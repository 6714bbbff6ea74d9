// nbdsnapd: the nbdsnap control-plane daemon. See docs/nbdsnapd.md.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "daemon.h"
#include "options.h"

int main(int argc, char** argv) {
  using namespace nbdsnap::daemon;
  Options options;
  std::string error;
  switch (parse_options(argc, argv, &options, &error)) {
    case ParseOutcome::kExit: return 0;
    case ParseOutcome::kUsage:
      std::fprintf(stderr, "nbdsnapd: %s\n", error.c_str());
      return 2;
    case ParseOutcome::kRun: break;
  }
  ::signal(SIGPIPE, SIG_IGN);

  int ready_fd = -1;
  if (!options.foreground) {
    // Daemonize before any thread exists. The starting process waits for
    // the daemon's word: "OK" once the API socket is ready, or the error.
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) {
      std::fprintf(stderr, "nbdsnapd: daemonize: pipe: %s\n", std::strerror(errno));
      return 1;
    }
    pid_t pid = ::fork();
    if (pid < 0) {
      std::fprintf(stderr, "nbdsnapd: daemonize: fork: %s\n", std::strerror(errno));
      return 1;
    }
    if (pid > 0) {
      ::close(p[1]);
      std::string msg;
      char buf[4096];
      for (;;) {
        ssize_t n = ::read(p[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        msg.append(buf, static_cast<size_t>(n));
      }
      if (msg == "OK\n") return 0;
      if (msg.empty())
        msg = "nbdsnapd: start-up failed: the daemon exited without a reason (see " + options.state_dir +
              "/nbdsnapd.log)\n";
      std::fputs(msg.c_str(), stderr);
      return 1;
    }
    ::close(p[0]);
    ::setsid();
    if (::chdir("/") != 0) {
      // paths are absolute already; nothing depends on the directory
    }
    ready_fd = p[1];
  }
  return run_daemon(options, ready_fd);
}
