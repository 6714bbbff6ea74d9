// Difference storage running out through the plugin: the origin never fails
// because of a snapshot; the snapshot becomes corrupted with ENOSPC, emits
// one corrupted event, and its export's reads fail with EIO.
#include "nbdkit_fixture.h"
#include "stamp.h"

namespace nbdsnap::it {
namespace {

class DiffStorage : public NbdkitTest {};

TEST_F(DiffStorage, ExhaustionCorruptsTheSnapshotButNeverFailsOriginWrites) {
  constexpr uint64_t kSize = 8 * MiB, kChunk = 64 * KiB, kStorage = 256 * KiB;
  ASSERT_NO_FATAL_FAILURE(start_stamped(kSize, 1));
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> buf(kSize);

  ASSERT_TRUE(IsOk(snapshot("s1", kStorage)));  // room for 4 of the 128 chunks
  std::string snap_error;
  NbdPtr snap = open("vol0@s1", {}, &snap_error);
  ASSERT_TRUE(snap) << snap_error;
  ASSERT_EQ(nbd_read_all(snap.get(), buf.data(), kChunk, 0), "");
  EXPECT_EQ(check_block(buf.data(), 0, 1), "");

  // Every chunk of the origin, one write each: all succeed.
  stamp_range(buf.data(), 0, kSize, 2);
  for (uint64_t off = 0; off < kSize; off += kChunk)
    ASSERT_NE(nbd_pwrite(h.get(), buf.data() + off, kChunk, off, 0), -1)
        << "origin write failed because of the snapshot: " << nbd_failure("pwrite", off);
  ASSERT_NE(nbd_flush(h.get(), 0), -1) << nbd_get_error();

  auto i = info("s1");
  ASSERT_TRUE(IsOk(i));
  const auto& s = i->info().snapshot();
  EXPECT_EQ(s.state(), link::CORRUPTED);
  EXPECT_EQ(s.error_code(), ENOSPC) << s.error();
  EXPECT_FALSE(s.error().empty());
  EXPECT_LE(s.storage_used(), kStorage);

  // wait-event: the corrupted event comes (possibly after space warnings),
  // exactly once.
  int corrupted = 0;
  for (int n = 0; n < 20; ++n) {
    auto e = wait_event("s1", corrupted ? 200 : 5000);
    ASSERT_TRUE(IsOk(e));
    if (!e->wait_event().has_event()) break;
    const auto& ev = e->wait_event().event();
    if (ev.code() != link::CORRUPTED_EVENT) continue;
    ++corrupted;
    EXPECT_EQ(ev.volume(), kVolume);
    EXPECT_EQ(ev.error_code(), ENOSPC) << ev.error();
    EXPECT_GT(ev.time_ms(), 0u);
  }
  EXPECT_EQ(corrupted, 1);

  // The export of the corrupted snapshot fails reads with EIO: on the
  // connection opened before, and on a new one if it still connects.
  std::vector<char> scratch(kChunk);
  EXPECT_EQ(nbd_pread(snap.get(), scratch.data(), kChunk, 0, 0), -1) << "read of a corrupted snapshot succeeded";
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  EXPECT_EQ(nbd_pread(snap.get(), scratch.data(), kChunk, kSize - kChunk, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  NbdPtr again = open("vol0@s1", {}, &snap_error);
  if (again) {
    EXPECT_EQ(nbd_pread(again.get(), scratch.data(), kBlock, 0, 0), -1);
    EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  }

  // The origin has every write, and keeps taking more.
  std::vector<char> got(kSize);
  ASSERT_EQ(nbd_read_all(h.get(), got.data(), kSize, 0), "");
  EXPECT_TRUE(got == buf) << "origin content differs from what was written";
  stamp_range(buf.data(), 0, kChunk, 3);
  EXPECT_NE(nbd_pwrite(h.get(), buf.data(), kChunk, 0, 0), -1) << nbd_get_error();

  // Destroying the corrupted snapshot works and frees its export.
  ASSERT_TRUE(IsOk(destroy("s1")));
  int errnum = 0;
  NbdPtr gone = open("vol0@s1", {}, &snap_error, &errnum);
  EXPECT_FALSE(gone);
}

}  // namespace
}  // namespace nbdsnap::it
