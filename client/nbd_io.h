// NbdConnection: one libnbd handle connected to one export, with the
// export's facts read once (size, multi-conn, read-only, zero support), and
// the allocation map of a range (base:allocation). NbdEndpoint says where
// and how to connect: an NBD URI plus an optional TLS PSK file and username,
// so that the daemon's URIs and a user's URI are handled alike.
// Not thread-safe: one connection per thread (libnbd handles are not shared).
#pragma once

#include <libnbd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "status.h"

namespace nbdsnap {

struct NbdEndpoint {
  std::string uri;            // nbd://, nbds://, nbd+unix://, nbds+unix://
  std::string tls_psk_file;   // "" : no TLS unless the URI asks for it
  std::string tls_username;   // "" : the first identity in tls_psk_file
  std::string label;          // names it in messages instead of the URI, if set

  // The label, else the URI without its query string (no key file names in
  // messages) but with its socket.
  std::string display() const;
};

// The message of libnbd's last error on this thread, or "unknown error".
std::string nbd_last_error();
// libnbd's errno of the last error (EIO when it has none).
int nbd_last_errno();

// A piece of an export: data, or reads as zero (hole or zero flag).
struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool zero = false;
};

class NbdConnection {
 public:
  // Connects to the export. Errors name the endpoint and libnbd's cause.
  static Result<NbdConnection> open(const NbdEndpoint& endpoint);

  NbdConnection(NbdConnection&&) noexcept = default;
  NbdConnection& operator=(NbdConnection&&) noexcept = default;
  ~NbdConnection();

  nbd_handle* get() const { return h_.get(); }
  uint64_t size() const { return size_; }
  bool multi_conn() const { return multi_conn_; }
  bool read_only() const { return read_only_; }
  bool can_zero() const { return can_zero_; }
  bool can_flush() const { return can_flush_; }
  bool has_allocation() const { return allocation_; }

  // The allocation of [offset, offset + length), merged into alternating
  // runs and covering the range exactly. Without base:allocation the whole
  // range is data.
  Result<std::vector<Extent>> allocation(uint64_t offset, uint64_t length);

  Status flush();
  // Sends NBD_CMD_DISC and closes (the destructor does it too, quietly).
  Status close();

 private:
  struct Deleter {
    void operator()(nbd_handle* h) const;
  };
  NbdConnection() = default;
  std::unique_ptr<nbd_handle, Deleter> h_;
  uint64_t size_ = 0;
  bool multi_conn_ = false, read_only_ = false, can_zero_ = false, can_flush_ = false, allocation_ = false;
};

}  // namespace nbdsnap
