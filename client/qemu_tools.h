// The qemu tools a backup chain is written and read with: `qemu-img` creates
// the qcow2 files (an incremental is an overlay backed by the previous
// backup), `qemu-nbd` serves one of them on a private Unix socket so that
// BlockMover reads and writes it as an NBD export. Errors carry the tool's
// own stderr. QemuNbd owns its child process and its socket directory.
// Not thread-safe; a QemuNbd may be used from one thread at a time.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "nbd_io.h"
#include "status.h"

namespace nbdsnap {

// Runs PROGRAM ARGS... (looked up in PATH) and waits. Fails with the exit
// status and the last lines of its stderr.
Status run_tool(const std::string& program, const std::vector<std::string>& args, std::string* out = nullptr);

// qemu-img create -f qcow2 [-b BACKING -F BACKING_FORMAT] PATH SIZE.
// BACKING is a file name relative to PATH's directory (so the chain can be
// moved).
Status qcow2_create(const std::string& path, uint64_t size, const std::string& backing,
                    const std::string& backing_format = "qcow2");

class QemuNbd {
 public:
  // Serves the qcow2 image PATH (read-only or writable) on a socket in a new
  // private directory, for up to CONNECTIONS clients; returns once it
  // accepts connections.
  static Result<QemuNbd> serve(const std::string& path, bool read_only, int connections);

  QemuNbd(QemuNbd&& o) noexcept;
  QemuNbd& operator=(QemuNbd&&) = delete;
  ~QemuNbd();  // stop(), errors ignored

  // Its URI, labelled with the image path for messages.
  NbdEndpoint endpoint() const { return {"nbd+unix:///?socket=" + socket_, "", "", image_ + " (through qemu-nbd)"}; }
  // SIGTERM, then waits: qemu-nbd flushes and closes the image. Fails if it
  // exits with a non-zero status.
  Status stop();

 private:
  QemuNbd() = default;
  std::string image_, dir_, socket_, log_;
  pid_t pid_ = -1;
};

}  // namespace nbdsnap
