// The control link survives hostile input: random bytes, oversized and
// overlong length prefixes, truncated frames, unparsable bodies and
// requests without an operation each get an error reply or a closed
// connection (never a hang or a crash), and afterwards a new connection is
// served and NBD keeps serving.
#include <random>

#include "frame.h"
#include "nbdkit_fixture.h"
#include "stamp.h"

namespace nbdsnap::it {
namespace {

class ControlLink : public NbdkitTest {
 protected:
  void SetUp() override {
    NbdkitTest::SetUp();
    if (IsSkipped()) return;
    make_volume(4 * MiB);
    ASSERT_TRUE(start({"chunk_minimum_shift=16"}));
  }

  // A raw connection to the control socket with a 10 s receive timeout.
  int raw_connect() {
    int fd = unix_connect(control_socket_);
    if (fd < 0) return -1;
    timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
  }

  // After the server is done with the connection: the server must still be
  // up, a new connection must get a version reply and NBD must serve.
  void expect_still_serving() {
    LinkClient c;
    ASSERT_TRUE(IsOk(c.connect(control_socket_)));
    link::Request req;
    req.mutable_version();
    auto r = c.call(req);
    ASSERT_TRUE(IsOk(r));
    EXPECT_EQ(r->version().protocol(), kLinkProtocol);
    EXPECT_FALSE(r->version().version().empty());
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    ASSERT_TRUE(h) << err;
    std::vector<char> buf(kBlock);
    EXPECT_EQ(nbd_read_all(h.get(), buf.data(), kBlock, 0), "");
  }
};

bool send_all(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EPIPE || errno == ECONNRESET;  // the server already closed: fine
    done += static_cast<size_t>(n);
  }
  return true;
}

std::string varint(uint64_t v) {
  std::string s;
  do {
    char b = static_cast<char>(v & 0x7f);
    v >>= 7;
    if (v) b = static_cast<char>(b | 0x80);
    s.push_back(b);
  } while (v);
  return s;
}

std::string framed(const link::Request& req) {
  std::string body = req.SerializeAsString();
  return varint(body.size()) + body;
}

struct Outcome {
  int replies = 0;        // well-formed replies read
  int error_replies = 0;  // ... of which with error_code != 0
  int last_error = 0;
  bool closed = false;    // the server closed the connection
  bool timed_out = false;
  std::string detail;
};

// Reads replies until the server closes the connection (or 10 s pass
// without anything: a hang).
Outcome drain(int fd, int max_replies = 1000) {
  Outcome o;
  for (int i = 0; i < max_replies; ++i) {
    link::Response resp;
    errno = 0;
    FrameResult r = read_frame(fd, &resp);
    if (r == FrameResult::kOk) {
      ++o.replies;
      if (resp.error_code() != 0) {
        ++o.error_replies;
        o.last_error = resp.error_code();
        o.detail = resp.error();
      }
      continue;
    }
    if (r == FrameResult::kIoError && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      o.timed_out = true;
    } else {
      o.closed = true;
      o.detail += std::string(" / ") + frame_error(r);
    }
    return o;
  }
  return o;
}

TEST_F(ControlLink, RandomBytesGetErrorRepliesOrAClosedConnection) {
  const char* env = std::getenv("NBDSNAP_SEED");
  uint64_t seed = env && *env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (NBDSNAP_SEED=%llu repeats this run)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 40; ++round) {
    int fd = raw_connect();
    ASSERT_GE(fd, 0) << std::strerror(errno);
    std::string junk(1 + rng() % 3000, '\0');
    for (auto& c : junk) c = static_cast<char>(rng());
    ASSERT_TRUE(send_all(fd, junk));
    ::shutdown(fd, SHUT_WR);  // no more bytes: a partial frame is truncated
    Outcome o = drain(fd);
    ::close(fd);
    EXPECT_FALSE(o.timed_out) << "round " << round << ": no reply and no close within 10 s";
    EXPECT_TRUE(o.closed) << "round " << round;
  }
  expect_still_serving();
}

TEST_F(ControlLink, OversizedLengthPrefixClosesTheConnection) {
  for (uint64_t size : {uint64_t{kMaxFrame} + 1, uint64_t{0xffffffff}}) {
    int fd = raw_connect();
    ASSERT_GE(fd, 0) << std::strerror(errno);
    ASSERT_TRUE(send_all(fd, varint(size)));  // and no body: must not wait for it
    Outcome o = drain(fd);
    ::close(fd);
    EXPECT_FALSE(o.timed_out) << "length " << size << ": server waits for a frame it must refuse";
    EXPECT_TRUE(o.closed) << "length " << size;
  }
  // A varint longer than 32 bits (ten bytes): error reply or close.
  int fd = raw_connect();
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(send_all(fd, std::string(9, '\xff') + '\x01'));
  Outcome o = drain(fd);
  ::close(fd);
  EXPECT_FALSE(o.timed_out);
  EXPECT_TRUE(o.closed);
  if (o.error_replies) {
    EXPECT_EQ(o.last_error, EBADMSG) << o.detail;
  }
  expect_still_serving();
}

TEST_F(ControlLink, TruncatedFrameClosesTheConnection) {
  link::Request req;
  req.set_tag(7);
  req.mutable_info()->set_id("some-snapshot-name-long-enough-to-cut");
  std::string frame = framed(req);
  for (size_t keep : {size_t{1}, frame.size() / 2, frame.size() - 1}) {
    int fd = raw_connect();
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(send_all(fd, frame.substr(0, keep)));
    ::shutdown(fd, SHUT_WR);
    Outcome o = drain(fd);
    ::close(fd);
    EXPECT_FALSE(o.timed_out) << "kept " << keep << " of " << frame.size() << " bytes";
    EXPECT_TRUE(o.closed);
    EXPECT_EQ(o.replies, 0) << "a truncated frame was answered: " << o.detail;
  }
  expect_still_serving();
}

TEST_F(ControlLink, UnparsableBodyGetsBadMessageReply) {
  int fd = raw_connect();
  ASSERT_GE(fd, 0);
  std::string body(16, '\xff');  // wire type 7: invalid protobuf
  ASSERT_TRUE(send_all(fd, varint(body.size()) + body));
  Outcome o = drain(fd);
  ::close(fd);
  EXPECT_FALSE(o.timed_out);
  EXPECT_TRUE(o.closed);
  EXPECT_EQ(o.error_replies, 1);
  EXPECT_EQ(o.last_error, EBADMSG) << o.detail;
  expect_still_serving();
}

TEST_F(ControlLink, RequestWithoutOperationGetsAnErrorAndTheConnectionGoesOn) {
  int fd = raw_connect();
  ASSERT_GE(fd, 0);
  link::Request empty;
  empty.set_tag(77);
  ASSERT_TRUE(send_all(fd, framed(empty)));
  link::Response resp;
  ASSERT_EQ(read_frame(fd, &resp), FrameResult::kOk) << std::strerror(errno);
  EXPECT_EQ(resp.tag(), 77u);
  EXPECT_EQ(resp.error_code(), ENOTSUP) << resp.error();
  EXPECT_FALSE(resp.error().empty());
  EXPECT_EQ(resp.reply_case(), link::Response::REPLY_NOT_SET);

  // An empty frame (length 0) is a request without operation too.
  ASSERT_TRUE(send_all(fd, varint(0)));
  ASSERT_EQ(read_frame(fd, &resp), FrameResult::kOk);
  EXPECT_EQ(resp.error_code(), ENOTSUP) << resp.error();

  // Same connection, well-formed request: served.
  link::Request version;
  version.set_tag(78);
  version.mutable_version();
  ASSERT_TRUE(send_all(fd, framed(version)));
  ASSERT_EQ(read_frame(fd, &resp), FrameResult::kOk);
  EXPECT_EQ(resp.tag(), 78u);
  EXPECT_EQ(resp.error_code(), 0) << resp.error();
  EXPECT_TRUE(resp.has_version());
  ::close(fd);
  expect_still_serving();
}

TEST_F(ControlLink, HalfSentFramesBeyondTheConnectionLimitDoNotStopTheService) {
  // 80 connections (the link serves at most 64) each stuck in the middle of
  // a frame. A further connection is either served or closed, never hung.
  std::vector<int> stuck;
  for (int i = 0; i < 80; ++i) {
    int fd = raw_connect();
    ASSERT_GE(fd, 0) << "connection " << i << ": " << std::strerror(errno);
    ASSERT_TRUE(send_all(fd, varint(100) + "abc"));
    stuck.push_back(fd);
  }
  int fd = raw_connect();
  ASSERT_GE(fd, 0);
  link::Request version;
  version.set_tag(1);
  version.mutable_version();
  ASSERT_TRUE(send_all(fd, framed(version)));
  Outcome o = drain(fd, 1);
  ::close(fd);
  EXPECT_FALSE(o.timed_out) << "a connection over the limit hangs";
  for (int s : stuck) ::close(s);

  // Once the server has seen those connections close, it serves again.
  auto deadline = Clock::now() + std::chrono::seconds(10);
  for (;;) {
    LinkClient c;
    link::Request req;
    req.mutable_version();
    if (c.connect(control_socket_) && c.call(req)) break;
    ASSERT_LT(Clock::now(), deadline) << "control link does not serve after abandoned connections closed";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  expect_still_serving();
}

}  // namespace
}  // namespace nbdsnap::it
