#include "link_client.h"

#include <unistd.h>

#include "frame.h"
#include "unix_socket.h"

namespace nbdsnap {

LinkClient::~LinkClient() { close(); }

void LinkClient::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Status LinkClient::connect(const std::string& path) {
  close();
  path_ = path;
  auto fd = connect_unix(path);
  if (!fd) return fd.status();
  fd_ = *fd;
  return Status::ok();
}

Result<link::Response> LinkClient::call(link::Request request) {
  if (fd_ < 0) return Status::error(ENOTCONN, "request: not connected");
  request.set_tag(next_tag_++);
  if (!write_frame(fd_, request)) return Status::from_errno("request to " + path_);
  link::Response resp;
  FrameResult r = read_frame(fd_, &resp);
  if (r != FrameResult::kOk)
    return Status::error(r == FrameResult::kEof ? ECONNRESET : EPROTO,
                         "reply from " + path_ + ": " + frame_error(r));
  if (resp.error_code() != 0) return Status::error(resp.error_code(), resp.error());
  if (resp.tag() != request.tag()) return Status::error(EPROTO, "reply from " + path_ + ": tag mismatch");
  return resp;
}

}  // namespace nbdsnap
