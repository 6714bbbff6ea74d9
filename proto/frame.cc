#include "frame.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace nbdsnap {
namespace {

// 1: all read, 0: EOF before any byte, -1: error or EOF inside.
int read_exact(int fd, char* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, buf + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) return got == 0 ? 0 : -1;
    got += static_cast<size_t>(r);
  }
  return 1;
}

bool write_exact(int fd, const char* buf, size_t n) {
  while (n > 0) {
    ssize_t r = ::send(fd, buf, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return false;
    buf += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace

FrameResult read_frame(int fd, google::protobuf::MessageLite* msg, uint32_t max) {
  uint64_t size = 0;
  for (int i = 0;; ++i) {
    char byte;
    int r = read_exact(fd, &byte, 1);
    if (r == 0 && i == 0) return FrameResult::kEof;
    if (r <= 0) return FrameResult::kIoError;
    size |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
    if ((byte & 0x80) == 0) break;
    if (i == 4) return FrameResult::kMalformed;  // more than 32 bits
  }
  if (size > max) return FrameResult::kTooLarge;
  std::string body(size, '\0');
  if (size > 0 && read_exact(fd, body.data(), size) != 1) return FrameResult::kIoError;
  if (!msg->ParseFromString(body)) return FrameResult::kMalformed;
  return FrameResult::kOk;
}

bool write_frame(int fd, const google::protobuf::MessageLite& msg) {
  std::string body;
  if (!msg.SerializeToString(&body)) {
    errno = EINVAL;
    return false;
  }
  if (body.size() > kMaxFrame) {
    errno = EMSGSIZE;
    return false;
  }
  char head[5];
  size_t n = 0;
  uint32_t v = static_cast<uint32_t>(body.size());
  do {
    head[n] = static_cast<char>(v & 0x7f);
    v >>= 7;
    if (v) head[n] = static_cast<char>(head[n] | 0x80);
    ++n;
  } while (v);
  return write_exact(fd, head, n) && write_exact(fd, body.data(), body.size());
}

const char* frame_error(FrameResult r) {
  switch (r) {
    case FrameResult::kOk: return "ok";
    case FrameResult::kEof: return "connection closed";
    case FrameResult::kTooLarge: return "frame larger than 4 MiB";
    case FrameResult::kMalformed: return "malformed frame";
    case FrameResult::kIoError: return "I/O error or truncated frame";
  }
  return "unknown";
}

}  // namespace nbdsnap
