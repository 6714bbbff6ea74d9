// Framing of protobuf messages on a stream socket: each message is preceded
// by its size as a varint ("length-delimited"). Frames above kMaxFrame are
// refused. Blocking I/O on a file descriptor; stateless and thread-safe
// (one reader and one writer per descriptor at a time).
#pragma once

#include <google/protobuf/message_lite.h>

#include <cstdint>
#include <string>

namespace nbdsnap {

constexpr uint32_t kMaxFrame = 4u << 20;  // 4 MiB
constexpr uint32_t kLinkProtocol = 1;
constexpr uint32_t kApiProtocol = 1;  // proto/api.proto

enum class FrameResult { kOk, kEof, kTooLarge, kMalformed, kIoError };

// Reads one frame into *msg. kEof: the peer closed before a new frame began.
FrameResult read_frame(int fd, google::protobuf::MessageLite* msg, uint32_t max = kMaxFrame);
// Writes one frame; false with errno set on error.
bool write_frame(int fd, const google::protobuf::MessageLite& msg);
const char* frame_error(FrameResult r);

}  // namespace nbdsnap
