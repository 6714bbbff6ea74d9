// FramedClient: a blocking client of one protobuf request/response protocol
// over a Unix stream socket (length-delimited frames, proto/frame.h): one
// connection, one request at a time. It sets `tag` (and `protocol`, where the
// request has one); a reply with error_code != 0 becomes an error Status
// carrying the peer's errno and message. Not thread-safe: one per thread.
#pragma once

#include <unistd.h>

#include <string>

#include "frame.h"
#include "status.h"
#include "unix_socket.h"

namespace nbdsnap {

template <typename Request, typename Response>
class FramedClient {
 public:
  FramedClient() = default;
  ~FramedClient() { close(); }
  FramedClient(const FramedClient&) = delete;
  FramedClient& operator=(const FramedClient&) = delete;

  Status connect(const std::string& socket_path) {
    close();
    path_ = socket_path;
    auto fd = connect_unix(socket_path);
    if (!fd) return fd.status();
    fd_ = *fd;
    return Status::ok();
  }

  Result<Response> call(Request request) {
    if (fd_ < 0) return Status::error(ENOTCONN, "request: not connected");
    request.set_tag(next_tag_++);
    if constexpr (requires { request.set_protocol(kApiProtocol); }) request.set_protocol(kApiProtocol);
    if (!write_frame(fd_, request)) return Status::from_errno("request to " + path_);
    Response resp;
    FrameResult r = read_frame(fd_, &resp);
    if (r != FrameResult::kOk)
      return Status::error(r == FrameResult::kEof ? ECONNRESET : EPROTO,
                           "reply from " + path_ + ": " + frame_error(r));
    if (resp.error_code() != 0) return Status::error(resp.error_code(), resp.error());
    if (resp.tag() != request.tag()) return Status::error(EPROTO, "reply from " + path_ + ": tag mismatch");
    return resp;
  }

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool connected() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
  uint64_t next_tag_ = 1;
  std::string path_;
};

}  // namespace nbdsnap
