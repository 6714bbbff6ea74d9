// Bad input on the public API: random bytes, truncated frames, a huge
// length prefix, unknown request types, protocol mismatch, invalid ids,
// unknown volumes, bad storage. Each gets an error reply or a closed
// connection, never a crash, and the next well-formed request on a new
// connection succeeds.
#include <random>

#include "daemon_fixture.h"

namespace nbdsnap::dt {
namespace {

class BadInput : public DaemonTest {
 protected:
  void SetUp() override {
    DaemonTest::SetUp();
    if (IsSkipped()) return;
    make_sparse_file(volume_path_, 16 * MiB);
    ASSERT_TRUE(start_daemon({"--param", "chunk_minimum_shift=16"}));
  }

  // The daemon is alive and a new connection is served.
  void expect_serving(const std::string& after) {
    ASSERT_TRUE(daemon_.alive()) << "nbdsnapd died after " << after;
    ApiClient c;
    ASSERT_TRUE(IsOk(c.connect(api_socket_))) << "after " << after;
    api::Request q;
    q.mutable_version();
    auto r = c.call(q);
    ASSERT_TRUE(IsOk(r)) << "after " << after;
    EXPECT_EQ(r->version().protocol(), kApiProtocol);
  }

  // Every reply is an error, and the exchange ended (reply or close).
  void expect_rejected(const RawOutcome& o, const std::string& what, bool want_close) {
    EXPECT_TRUE(o.junk.empty()) << what << ": reply bytes that do not parse";
    for (const auto& r : o.replies) {
      EXPECT_NE(r.error_code(), 0) << what << ": a reply without error";
      EXPECT_FALSE(r.error().empty()) << what;
    }
    if (want_close) {
      EXPECT_TRUE(o.closed) << what << ": connection not closed";
    }
    EXPECT_TRUE(o.closed || !o.replies.empty()) << what << ": neither a reply nor a close";
  }
};

TEST_F(BadInput, RandomBytes) {
  std::mt19937_64 rng(20261124);
  for (int round = 0; round < 40; ++round) {
    size_t n = 1 + rng() % (round < 20 ? 64 : 4096);
    std::string bytes(n, '\0');
    for (auto& c : bytes) c = static_cast<char>(rng());
    // Half-close: a frame announced but never completed ends in EOF.
    RawOutcome o = raw_exchange(api_socket_, bytes, true);
    expect_rejected(o, "random bytes (round " + std::to_string(round) + ")", true);
    ASSERT_NO_FATAL_FAILURE(expect_serving("random bytes"));
  }
}

TEST_F(BadInput, TruncatedFrames) {
  api::Request q;
  q.set_protocol(kApiProtocol);
  q.set_tag(7);
  q.mutable_snapshot_create()->add_volumes(kVolume);
  q.mutable_snapshot_create()->set_name("never");
  std::string frame = frame_of(q);
  for (size_t cut : {size_t{1}, size_t{2}, frame.size() / 2, frame.size() - 1}) {
    RawOutcome o = raw_exchange(api_socket_, frame.substr(0, cut), true);
    EXPECT_TRUE(o.replies.empty()) << "a reply to a truncated frame (cut at " << cut << ")";
    EXPECT_TRUE(o.closed) << "cut at " << cut;
    ASSERT_NO_FATAL_FAILURE(expect_serving("a truncated frame"));
  }
  // A truncated frame whose client just goes away (no half-close).
  {
    int fd = unix_connect(api_socket_);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::send(fd, frame.data(), frame.size() / 2, MSG_NOSIGNAL), static_cast<ssize_t>(frame.size() / 2));
    ::close(fd);
  }
  ASSERT_NO_FATAL_FAILURE(expect_serving("an abandoned frame"));
  // Nothing was created by any of that.
  auto l = list();
  ASSERT_TRUE(IsOk(l));
  EXPECT_EQ(l->snapshot_list().snapshots_size(), 0);
}

TEST_F(BadInput, HugeAndOverlongLengthPrefix) {
  // 0xffffffff: far above the 4 MiB maximum.
  RawOutcome huge = raw_exchange(api_socket_, std::string("\xff\xff\xff\xff\x0f", 5), false);
  expect_rejected(huge, "huge length prefix", true);
  ASSERT_EQ(huge.replies.size(), 1u);
  EXPECT_EQ(huge.replies[0].error_code(), EMSGSIZE) << huge.replies[0].error();
  ASSERT_NO_FATAL_FAILURE(expect_serving("a huge length prefix"));

  // Just above the maximum.
  std::string above;
  uint64_t v = kMaxFrame + 1;
  do {
    char b = static_cast<char>(v & 0x7f);
    v >>= 7;
    if (v) b = static_cast<char>(b | 0x80);
    above += b;
  } while (v);
  RawOutcome o = raw_exchange(api_socket_, above, false);
  expect_rejected(o, "4 MiB + 1 length prefix", true);
  ASSERT_NO_FATAL_FAILURE(expect_serving("a 4 MiB + 1 prefix"));

  // A varint longer than 5 bytes.
  RawOutcome overlong = raw_exchange(api_socket_, std::string(6, '\x80'), false);
  expect_rejected(overlong, "overlong varint", true);
  ASSERT_NO_FATAL_FAILURE(expect_serving("an overlong varint"));

  // A complete frame of the maximum size that is not a Request.
  std::string body(kMaxFrame, '\xff');
  std::string frame = std::string("\x80\x80\x80\x02", 4) + body;  // 4 MiB
  RawOutcome big = raw_exchange(api_socket_, frame, false, 10000);
  expect_rejected(big, "4 MiB of garbage", true);
  ASSERT_EQ(big.replies.size(), 1u);
  EXPECT_EQ(big.replies[0].error_code(), EBADMSG) << big.replies[0].error();
  ASSERT_NO_FATAL_FAILURE(expect_serving("4 MiB of garbage"));

  // A frame that does not parse.
  RawOutcome bad = raw_exchange(api_socket_, std::string("\x03\xff\xff\xff", 4), false);
  expect_rejected(bad, "unparsable frame", true);
  ASSERT_EQ(bad.replies.size(), 1u);
  EXPECT_EQ(bad.replies[0].error_code(), EBADMSG);
  ASSERT_NO_FATAL_FAILURE(expect_serving("an unparsable frame"));
}

TEST_F(BadInput, UnknownRequestTypesAndProtocolMismatch) {
  // No operation at all, then an operation from the future (field 99): the
  // connection stays usable after each.
  api::Request none;
  none.set_protocol(kApiProtocol);
  none.set_tag(11);
  std::string future = frame_of(none);
  std::string body = none.SerializeAsString() + std::string("\x9a\x06\x02\x08\x01", 5);  // field 99, {1: 1}
  std::string future_frame = std::string(1, static_cast<char>(body.size())) + body;
  api::Request ver;
  ver.set_protocol(kApiProtocol);
  ver.set_tag(12);
  ver.mutable_version();
  RawOutcome o = raw_exchange(api_socket_, future + future_frame + frame_of(ver), true);
  ASSERT_EQ(o.replies.size(), 3u) << "closed=" << o.closed;
  EXPECT_EQ(o.replies[0].tag(), 11u);
  EXPECT_EQ(o.replies[0].error_code(), ENOTSUP) << o.replies[0].error();
  EXPECT_EQ(o.replies[1].error_code(), ENOTSUP) << o.replies[1].error();
  EXPECT_EQ(o.replies[2].tag(), 12u);
  EXPECT_EQ(o.replies[2].error_code(), 0);
  EXPECT_TRUE(o.replies[2].has_version());

  // Protocol mismatch: 0 (unset) and 2; the message names both versions.
  for (uint32_t proto : {0u, 2u, 1000u}) {
    api::Request q;
    q.set_protocol(proto);
    q.set_tag(13);
    q.mutable_snapshot_list();
    RawOutcome m = raw_exchange(api_socket_, frame_of(q), true);
    ASSERT_EQ(m.replies.size(), 1u);
    EXPECT_EQ(m.replies[0].error_code(), EPROTONOSUPPORT);
    EXPECT_EQ(m.replies[0].tag(), 13u);
    EXPECT_NE(m.replies[0].error().find("protocol " + std::to_string(proto)), std::string::npos)
        << m.replies[0].error();
    EXPECT_NE(m.replies[0].error().find("protocol 1"), std::string::npos) << m.replies[0].error();
  }
  ASSERT_NO_FATAL_FAILURE(expect_serving("protocol mismatch"));
}

TEST_F(BadInput, InvalidIdsAndUnknownVolumes) {
  for (const std::string& id : std::vector<std::string>{"not-a-uuid", "00000000-0000-0000-0000-000000000000",
                               "3f0c8d6e-1111-4222-8333-944455556666", "", std::string(5000, 'x')}) {
    EXPECT_TRUE(HasError(info(id), id.empty() ? EINVAL : ENOENT)) << "info " << id.substr(0, 40);
    EXPECT_TRUE(HasError(take(id), id.empty() ? EINVAL : ENOENT)) << "take " << id.substr(0, 40);
    EXPECT_TRUE(HasError(destroy(id), id.empty() ? EINVAL : ENOENT)) << "destroy " << id.substr(0, 40);
    api::Request w;
    w.mutable_wait_event()->set_id(id);
    w.mutable_wait_event()->set_timeout_ms(10);
    EXPECT_TRUE(HasError(call(w), id.empty() ? EINVAL : ENOENT)) << "wait-event " << id.substr(0, 40);
  }
  EXPECT_TRUE(HasError(create({"nope"}), ENOENT));
  EXPECT_TRUE(HasError(create({}), EINVAL));
  EXPECT_TRUE(HasError(create({kVolume}, "bad/name"), EINVAL));
  EXPECT_TRUE(HasError(cbt_info("nope"), ENOENT));
  api::Request rm;
  rm.mutable_volume_remove()->set_name("nope");
  EXPECT_TRUE(HasError(call(rm), ENOENT));
  api::Request add;
  add.mutable_volume_add()->set_name("bad/name");
  add.mutable_volume_add()->set_path(volume_path_);
  EXPECT_TRUE(HasError(call(add), EINVAL));
  add.mutable_volume_add()->set_name("vol1");
  add.mutable_volume_add()->set_path("relative.img");
  EXPECT_TRUE(HasError(call(add), EINVAL));
  add.mutable_volume_add()->set_path(path("missing.img"));
  EXPECT_TRUE(HasError(call(add), ENOENT));
  add.mutable_volume_add()->set_name(kVolume);
  add.mutable_volume_add()->set_path(path("other.img"));
  EXPECT_TRUE(HasError(call(add), EEXIST));
  api::Request changes;
  changes.mutable_cbt_changes()->set_volume(kVolume);
  changes.mutable_cbt_changes()->set_generation("00000000-0000-0000-0000-000000000000");
  EXPECT_TRUE(HasError(call(changes), ESTALE));
  ASSERT_NO_FATAL_FAILURE(expect_serving("invalid ids"));
  auto l = list();
  ASSERT_TRUE(IsOk(l));
  EXPECT_EQ(l->snapshot_list().snapshots_size(), 0);
}

TEST_F(BadInput, BadStorage) {
  // Managed storage paths.
  EXPECT_TRUE(HasError(create({kVolume}, "", path("no-such-dir/s.diff")), ENOENT));
  make_sparse_file(path("exists.diff"), MiB);
  EXPECT_TRUE(HasError(create({kVolume}, "", path("exists.diff")), EEXIST));
  EXPECT_TRUE(HasError(create({kVolume}, "", volume_path_), EINVAL));
  EXPECT_TRUE(HasError(create({kVolume}, "", "relative.diff"), EINVAL));
  EXPECT_TRUE(HasError(create({kVolume}, "", path("dir/")), EINVAL));
  EXPECT_TRUE(HasError(create({kVolume}, "", "", 100), EINVAL));  // limit below 4 KiB
  auto l = list();
  ASSERT_TRUE(IsOk(l));
  EXPECT_EQ(l->snapshot_list().snapshots_size(), 0) << "a failed create left a snapshot behind";
  EXPECT_TRUE(list_dir(state_dir_ + "/storage").empty()) << "a failed create left a storage file behind";

  // Ranges given with append-storage.
  auto c = create({kVolume}, "s1");
  ASSERT_TRUE(IsOk(c));
  const std::string id = c->snapshot_create().snapshot().id();
  const std::string managed = c->snapshot_create().snapshot().storage_path();
  EXPECT_EQ(managed, state_dir_ + "/storage/" + id + ".diff");
  std::string file = path("extra.diff");
  make_sparse_file(file, MiB);
  EXPECT_TRUE(HasError(append_storage(id, file, 0, 2 * MiB), EINVAL)) << "beyond the end of the file";
  EXPECT_TRUE(HasError(append_storage(id, file, MiB, 4096), EINVAL)) << "at the end of the file";
  EXPECT_TRUE(HasError(append_storage(id, file, 100, 4096), EINVAL)) << "unaligned offset";
  EXPECT_TRUE(HasError(append_storage(id, file, 0, 1000), EINVAL)) << "unaligned length";
  EXPECT_TRUE(HasError(append_storage(id, file, 0, 0), EINVAL)) << "empty range";
  EXPECT_TRUE(HasError(append_storage(id, volume_path_, 0, 64 * KiB), EINVAL)) << "the origin";
  EXPECT_TRUE(HasError(append_storage(id, managed, 0, 4096), EBUSY)) << "the managed file";
  EXPECT_TRUE(HasError(append_storage(id, "relative.diff", 0, 4096), EINVAL));
  EXPECT_TRUE(HasError(append_storage(id, path("missing.diff"), 0, 4096), ENOENT));
  EXPECT_TRUE(HasError(append_storage("nope", file, 0, 4096), ENOENT));
  // A request whose second range is bad appends nothing.
  {
    api::Request q;
    auto* a = q.mutable_append_storage();
    a->set_id(id);
    a->set_path(file);
    auto* r1 = a->add_ranges();
    r1->set_offset(0);
    r1->set_length(64 * KiB);
    auto* r2 = a->add_ranges();
    r2->set_offset(2 * MiB);
    r2->set_length(64 * KiB);
    auto before = info(id);
    ASSERT_TRUE(IsOk(before));
    EXPECT_TRUE(HasError(call(q), EINVAL));
    auto after = info(id);
    ASSERT_TRUE(IsOk(after));
    EXPECT_EQ(after->snapshot_info().snapshot().storage_capacity(),
              before->snapshot_info().snapshot().storage_capacity());
  }
  EXPECT_TRUE(IsOk(append_storage(id, file, 0, 256 * KiB)));
  EXPECT_TRUE(HasError(append_storage(id, file, 128 * KiB, 256 * KiB), EBUSY)) << "overlapping a range in use";
  // A second snapshot may not reuse the range either.
  auto c2 = create({kVolume}, "s2");
  ASSERT_TRUE(IsOk(c2));
  EXPECT_TRUE(HasError(append_storage("s2", file, 0, 64 * KiB), EBUSY));
  EXPECT_TRUE(IsOk(append_storage("s2", file, 256 * KiB, 256 * KiB)));
  // The volume that holds storage cannot be added as a volume.
  api::Request add;
  add.mutable_volume_add()->set_name("vol1");
  add.mutable_volume_add()->set_path(file);
  EXPECT_TRUE(HasError(call(add), EBUSY));
  add.mutable_volume_add()->set_path(managed);
  EXPECT_TRUE(HasError(call(add), EBUSY));
  // The snapshot still works.
  auto t = take("s1");
  ASSERT_TRUE(IsOk(t));
  EXPECT_EQ(t->take().snapshot().state(), api::TAKEN);
  EXPECT_GE(t->take().snapshot().storage_capacity(), 256 * KiB);
  ASSERT_TRUE(IsOk(destroy("s1")));
  ASSERT_TRUE(IsOk(destroy("s2")));
  ASSERT_NO_FATAL_FAILURE(expect_serving("bad storage"));
  EXPECT_TRUE(list_dir(state_dir_ + "/storage").empty()) << "managed file not deleted after destroy";
}

// A client that waits for events and goes away is forgotten at once (its
// connection does not linger until the timeout); one that only shuts down
// its sending side still gets its answer.
TEST_F(BadInput, WaitersThatGoAwayAreDropped) {
  ASSERT_TRUE(IsOk(create({kVolume}, "s1")));
  client_.reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const int before = fd_kinds(daemon_.pid())["socket"];
  api::Request q;
  q.set_protocol(kApiProtocol);
  q.set_tag(3);
  q.mutable_wait_event()->set_id("s1");
  q.mutable_wait_event()->set_timeout_ms(600000);
  std::vector<int> fds;
  for (int i = 0; i < 10; ++i) {
    int fd = unix_connect(api_socket_);
    ASSERT_GE(fd, 0);
    std::string f = frame_of(q);
    ASSERT_EQ(::send(fd, f.data(), f.size(), MSG_NOSIGNAL), static_cast<ssize_t>(f.size()));
    fds.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_GE(fd_kinds(daemon_.pid())["socket"], before + 10);
  for (int fd : fds) ::close(fd);
  auto deadline = Clock::now() + std::chrono::seconds(3);
  while (fd_kinds(daemon_.pid())["socket"] > before && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_LE(fd_kinds(daemon_.pid())["socket"], before) << "sessions of departed waiters linger";

  q.mutable_wait_event()->set_timeout_ms(300);
  auto t0 = Clock::now();
  RawOutcome o = raw_exchange(api_socket_, frame_of(q), true);
  ASSERT_EQ(o.replies.size(), 1u);
  EXPECT_EQ(o.replies[0].error_code(), 0) << o.replies[0].error();
  EXPECT_EQ(o.replies[0].tag(), 3u);
  EXPECT_TRUE(o.replies[0].has_wait_event());
  EXPECT_TRUE(o.closed);
  EXPECT_GE(Clock::now() - t0, std::chrono::milliseconds(250));
  ASSERT_TRUE(IsOk(destroy("s1")));
}

// Clients that connect and never send, or never read, do not block others.
TEST_F(BadInput, SlowAndDeadClientsDoNotBlockOthers) {
  std::vector<int> idle;
  for (int i = 0; i < 20; ++i) {
    int fd = unix_connect(api_socket_);
    ASSERT_GE(fd, 0);
    idle.push_back(fd);
  }
  // One that sends many requests and never reads the replies.
  int greedy = unix_connect(api_socket_);
  ASSERT_GE(greedy, 0);
  api::Request q;
  q.set_protocol(kApiProtocol);
  q.mutable_volume_list();
  std::string frames;
  for (int i = 0; i < 2000; ++i) frames += frame_of(q);
  ::fcntl(greedy, F_SETFL, O_NONBLOCK);
  (void)::send(greedy, frames.data(), frames.size(), MSG_NOSIGNAL);
  // One half-way through a frame.
  int partial = unix_connect(api_socket_);
  ASSERT_GE(partial, 0);
  ASSERT_EQ(::send(partial, "\x20\x10", 2, MSG_NOSIGNAL), 2);
  auto t0 = Clock::now();
  ASSERT_NO_FATAL_FAILURE(expect_serving("idle clients"));
  auto c = create({kVolume}, "s1");
  ASSERT_TRUE(IsOk(c));
  ASSERT_TRUE(IsOk(take("s1")));
  ASSERT_TRUE(IsOk(destroy("s1")));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  for (int fd : idle) ::close(fd);
  ::close(greedy);
  ::close(partial);
  ASSERT_NO_FATAL_FAILURE(expect_serving("closing the idle clients"));
}

}  // namespace
}  // namespace nbdsnap::dt
