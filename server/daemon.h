// The daemon proper: one Asio io_context on the main thread serving the API
// socket, the signals and the nbdkit child; a small worker pool for the
// blocking link calls (Service). Asio lives in daemon.cc only.
#pragma once

#include "options.h"

namespace nbdsnap::daemon {

// Runs until SIGTERM or SIGINT. ready_fd: -1 in the foreground; else a pipe
// to the starting process, which gets "OK\n" once the API socket is ready or
// the startup error message. Returns the exit code (0, or 1 if start-up
// failed).
int run_daemon(const Options& options, int ready_fd);

}  // namespace nbdsnap::daemon
