// Managed difference storage: nbdsnapd grows the file by one
// diff_storage_minimum step on each low-free-space event, up to the limit;
// at the limit the plugin reports no-space; then exhaustion corrupts the
// snapshot (ENOSPC) while the origin keeps accepting writes, a corrupted
// event reaches every waiting connection, and the export's reads fail with
// EIO. Destroy deletes the managed file.
#include <sys/stat.h>

#include <atomic>
#include <mutex>

#include "daemon_fixture.h"

namespace nbdsnap::dt {
namespace {

constexpr uint64_t kSize = 8 * MiB, kChunk = 64 * KiB;
constexpr uint64_t kStep = 256 * KiB;  // diff_storage_minimum=512 sectors
constexpr uint64_t kLimit = 1 * MiB;

class Storage : public DaemonTest {
 protected:
  void SetUp() override {
    DaemonTest::SetUp();
    if (IsSkipped()) return;
    make_sparse_file(volume_path_, kSize);
    ASSERT_TRUE(start_daemon({"--param", "chunk_minimum_shift=16", "--param", "diff_storage_minimum=512"}));
  }

  // Collects every event of `id` on its own connection until a corrupted
  // event (or `seconds` pass).
  struct Waiter {
    std::vector<link::EventCode> codes;
    std::string error;
    std::thread thread;
  };
  // Writes buf[offset, offset+length) one chunk at a time, each time waiting
  // until the daemon has grown the newest snapshot's storage (`id`) back
  // above the low-space threshold, as a slow writer would.
  void write_paced(nbd_handle* h, const std::vector<char>& buf, uint64_t offset, uint64_t length,
                   const std::string& id) {
    for (uint64_t off = offset; off < offset + length; off += kChunk) {
      ASSERT_NE(nbd_pwrite(h, buf.data() + off, kChunk, off, 0), -1) << nbd_failure("pwrite", off);
      auto deadline = Clock::now() + std::chrono::seconds(10);
      for (;;) {
        auto i = info(id);
        ASSERT_TRUE(IsOk(i));
        const auto& s = i->snapshot_info().snapshot();
        ASSERT_NE(s.state(), api::CORRUPTED) << s.error();
        if (s.storage_capacity() >= s.storage_limit() || s.storage_capacity() - s.storage_used() >= kStep / 2) break;
        ASSERT_LT(Clock::now(), deadline) << "storage not grown";
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
  }

  void start_waiter(Waiter* w, const std::string& id, int seconds = 60) {
    w->thread = std::thread([this, w, id, seconds] {
      ApiClient a;
      Status st = a.connect(api_socket_);
      if (!st) {
        w->error = st.message();
        return;
      }
      auto deadline = Clock::now() + std::chrono::seconds(seconds);
      while (Clock::now() < deadline) {
        api::Request q;
        q.mutable_wait_event()->set_id(id);
        q.mutable_wait_event()->set_timeout_ms(1000);
        auto r = a.call(q);
        if (!r) {
          w->error = r.status().message();
          return;
        }
        if (!r->wait_event().has_event()) continue;
        w->codes.push_back(r->wait_event().event().code());
        if (r->wait_event().event().code() == link::CORRUPTED_EVENT) {
          if (r->wait_event().event().error_code() != ENOSPC) w->error = "corrupted with " + r->wait_event().event().error();
          return;
        }
      }
      w->error = "no corrupted event within the time";
    });
  }
};

int count(const std::vector<link::EventCode>& v, link::EventCode c) {
  return static_cast<int>(std::count(v.begin(), v.end(), c));
}

TEST_F(Storage, GrowsOnLowSpaceThenNoSpaceThenCorrupted) {
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> buf(kSize);
  stamp_range(buf.data(), 0, kSize, 1);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), kSize, 0), "");
  ASSERT_NE(nbd_flush(h.get(), 0), -1);

  std::string file = path("managed.diff");
  auto c = create({kVolume}, "s1", file, kLimit);
  ASSERT_TRUE(IsOk(c));
  const auto& created = c->snapshot_create().snapshot();
  const std::string id = created.id();
  EXPECT_EQ(created.storage_path(), file);
  EXPECT_EQ(created.storage_limit(), kLimit);
  EXPECT_EQ(created.storage_capacity(), kStep) << "initial step";
  struct stat st;
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kStep);
  EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, kStep) << "the step is not preallocated";
  ASSERT_TRUE(IsOk(take("s1")));

  // Two connections wait for events meanwhile; each must see each event.
  Waiter w1, w2;
  start_waiter(&w1, id);
  start_waiter(&w2, "s1");  // by name

  // One chunk at a time, letting the daemon grow the file: capacity goes
  // 256K -> 512K -> 768K -> 1M (the limit).
  stamp_range(buf.data(), 0, kSize, 2);
  uint64_t chunk = 0, last_capacity = kStep;
  int growths = 0;
  auto snapshot_info = [&] {
    auto i = info(id);
    EXPECT_TRUE(IsOk(i));
    return i ? i->snapshot_info().snapshot() : api::Snapshot();
  };
  for (; chunk < kSize / kChunk; ++chunk) {
    uint64_t off = chunk * kChunk;
    ASSERT_NE(nbd_pwrite(h.get(), buf.data() + off, kChunk, off, 0), -1) << nbd_failure("pwrite", off);
    // Wait until the free space is back above the threshold, or the limit.
    api::Snapshot s;
    auto deadline = Clock::now() + std::chrono::seconds(10);
    do {
      s = snapshot_info();
      if (s.storage_capacity() >= kLimit || s.storage_capacity() - s.storage_used() >= kStep / 2) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    } while (Clock::now() < deadline);
    ASSERT_EQ(s.state(), api::TAKEN) << "corrupted before the limit: " << s.error();
    if (s.storage_capacity() > last_capacity) {
      ++growths;
      EXPECT_EQ(s.storage_capacity(), std::min(last_capacity + kStep, kLimit));
      last_capacity = s.storage_capacity();
      ASSERT_EQ(::stat(file.c_str(), &st), 0);
      EXPECT_EQ(static_cast<uint64_t>(st.st_size), last_capacity) << "file size follows the capacity";
    }
    if (s.storage_capacity() >= kLimit) break;
  }
  EXPECT_EQ(growths, 3) << "256K grown in 256K steps to 1M";
  EXPECT_EQ(last_capacity, kLimit);

  // Beyond the limit: the origin keeps accepting writes; the snapshot
  // runs out and becomes corrupted with ENOSPC.
  for (++chunk; chunk < kSize / kChunk; ++chunk) {
    uint64_t off = chunk * kChunk;
    ASSERT_NE(nbd_pwrite(h.get(), buf.data() + off, kChunk, off, 0), -1)
        << "origin write failed because of the snapshot: " << nbd_failure("pwrite", off);
  }
  ASSERT_NE(nbd_flush(h.get(), 0), -1);
  auto s = snapshot_info();
  EXPECT_EQ(s.state(), api::CORRUPTED);
  EXPECT_EQ(s.error_code(), ENOSPC) << s.error();
  EXPECT_FALSE(s.error().empty());
  EXPECT_EQ(s.storage_capacity(), kLimit) << "grown beyond the limit";
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kLimit);

  // Both waiters saw the same events: low-free-space (3 growths), no-space,
  // corrupted.
  w1.thread.join();
  w2.thread.join();
  EXPECT_EQ(w1.error, "");
  EXPECT_EQ(w2.error, "");
  EXPECT_EQ(w1.codes, w2.codes);
  EXPECT_GE(count(w1.codes, link::LOW_FREE_SPACE), 3);
  EXPECT_EQ(count(w1.codes, link::NO_SPACE), 1);
  EXPECT_EQ(count(w1.codes, link::CORRUPTED_EVENT), 1);
  ASSERT_FALSE(w1.codes.empty());
  EXPECT_EQ(w1.codes.back(), link::CORRUPTED_EVENT);
  // A third connection arriving late still gets the whole history.
  {
    ApiClient a;
    ASSERT_TRUE(IsOk(a.connect(api_socket_)));
    std::vector<link::EventCode> late;
    for (;;) {
      api::Request q;
      q.mutable_wait_event()->set_id(id);
      q.mutable_wait_event()->set_timeout_ms(0);
      auto r = a.call(q);
      ASSERT_TRUE(IsOk(r));
      if (!r->wait_event().has_event()) break;
      late.push_back(r->wait_event().event().code());
    }
    EXPECT_EQ(late, w1.codes);
  }

  // Reads of the corrupted snapshot fail with EIO; the origin has every write.
  NbdPtr snap = open("vol0@s1", {}, &err);
  ASSERT_TRUE(snap) << "the export of a corrupted snapshot stays listed: " << err;
  std::vector<char> scratch(kChunk);
  EXPECT_EQ(nbd_pread(snap.get(), scratch.data(), kChunk, 0, 0), -1) << "read of a corrupted snapshot succeeded";
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  EXPECT_EQ(nbd_pread(snap.get(), scratch.data(), kChunk, kSize - kChunk, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  snap.reset();
  std::vector<char> got(kSize);
  ASSERT_EQ(nbd_read_all(h.get(), got.data(), kSize, 0), "");
  EXPECT_TRUE(got == buf) << "origin content differs from what was written";

  // Destroy: the managed file goes away; waiters get ENOENT.
  ApiClient waiter;
  ASSERT_TRUE(IsOk(waiter.connect(api_socket_)));
  std::atomic<int> wait_code{-1};
  std::thread wait_thread([&] {
    api::Request q;
    q.mutable_wait_event()->set_id(id);
    q.mutable_wait_event()->set_timeout_ms(0);
    // Drain the history first, then wait.
    for (;;) {
      auto r = waiter.call(q);
      if (!r) {
        wait_code = r.status().code();
        return;
      }
      if (!r->wait_event().has_event()) break;
    }
    q.mutable_wait_event()->set_timeout_ms(20000);
    auto r = waiter.call(q);
    wait_code = r ? 0 : r.status().code();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto t0 = Clock::now();
  ASSERT_TRUE(IsOk(destroy("s1")));
  wait_thread.join();
  EXPECT_EQ(wait_code.load(), ENOENT) << "a waiter was not told that the snapshot is gone";
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  EXPECT_NE(::access(file.c_str(), F_OK), 0) << "managed file not deleted";
  api::Request q;
  q.mutable_wait_event()->set_id(id);
  q.mutable_wait_event()->set_timeout_ms(10);
  EXPECT_TRUE(HasError(call(q), ENOENT));
}

// Default storage: a file in STATE/storage, limit = the volume size, the
// initial step preallocated; it outlives retained snapshots only as long as
// the data plane needs them.
TEST_F(Storage, DefaultManagedFileAndRetainedSnapshots) {
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> buf(kSize);
  stamp_range(buf.data(), 0, kSize, 1);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), kSize, 0), "");

  auto a = create({kVolume}, "a");
  ASSERT_TRUE(IsOk(a));
  const auto sa = a->snapshot_create().snapshot();
  EXPECT_EQ(sa.storage_path(), state_dir_ + "/storage/" + sa.id() + ".diff");
  EXPECT_EQ(sa.storage_limit(), kSize);
  EXPECT_EQ(sa.storage_capacity(), kStep);
  ASSERT_TRUE(IsOk(take("a")));
  stamp_range(buf.data(), 0, kSize, 2);
  ASSERT_NO_FATAL_FAILURE(write_paced(h.get(), buf, 0, MiB, sa.id()));  // a gets copies of the first MiB
  auto b = create({kVolume}, "b");
  ASSERT_TRUE(IsOk(b));
  const auto sb = b->snapshot_create().snapshot();
  ASSERT_TRUE(IsOk(take("b")));
  stamp_range(buf.data(), 0, kSize, 3);
  ASSERT_NO_FATAL_FAILURE(write_paced(h.get(), buf, 0, 2 * MiB, sb.id()));  // b gets copies
  ASSERT_NE(nbd_flush(h.get(), 0), -1);

  // Destroying b (newer) keeps its storage while a reads through it.
  ASSERT_TRUE(IsOk(destroy("b")));
  EXPECT_EQ(::access(sb.storage_path().c_str(), F_OK), 0) << "storage of a retained snapshot deleted";
  {
    NbdPtr s = open("vol0@a", {}, &err);
    ASSERT_TRUE(s) << err;
    std::vector<char> got(2 * MiB);
    ASSERT_EQ(nbd_read_all(s.get(), got.data(), got.size(), 0), "");
    for (uint64_t off = 0; off < got.size(); off += kBlock) ASSERT_EQ(check_block(got.data() + off, off, 1), "") << off;
  }
  ASSERT_TRUE(IsOk(destroy("a")));
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while ((::access(sa.storage_path().c_str(), F_OK) == 0 || ::access(sb.storage_path().c_str(), F_OK) == 0) &&
         Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_NE(::access(sa.storage_path().c_str(), F_OK), 0);
  EXPECT_NE(::access(sb.storage_path().c_str(), F_OK), 0);
  EXPECT_TRUE(list_dir(state_dir_ + "/storage").empty());
}

}  // namespace
}  // namespace nbdsnap::dt
