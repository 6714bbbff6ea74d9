// The NBD export names: VOLUME@SNAPSHOT is read-only and refuses writes;
// unknown and destroyed exports fail cleanly, also for a connection that
// was open when the snapshot went away; `nbdinfo --list` follows takes and
// destroys. Also: nbdkit without -f (it forks into the background after the
// plugin opened its volumes) serves writes, snapshots and the control link.
#include "nbdkit_fixture.h"
#include "stamp.h"

namespace nbdsnap::it {
namespace {

class Exports : public NbdkitTest {
 protected:
  // 4 MiB volume, stamped with generation 1; snapshot s1 taken.
  void SetUp() override {
    NbdkitTest::SetUp();
    if (IsSkipped()) return;
    ASSERT_NO_FATAL_FAILURE(start_stamped(kSize, 1));
    ASSERT_TRUE(IsOk(snapshot("s1", kSize)));
  }
  static constexpr uint64_t kSize = 4 * MiB;
};

TEST_F(Exports, SnapshotExportIsReadOnlyAndRefusesWritesWithEperm) {
  std::string err;
  NbdPtr snap = open("vol0@s1", {.strict = false}, &err);
  ASSERT_TRUE(snap) << err;
  EXPECT_EQ(nbd_is_read_only(snap.get()), 1);
  EXPECT_EQ(nbd_can_trim(snap.get()), 0);
  EXPECT_EQ(nbd_can_zero(snap.get()), 0);

  std::vector<char> buf(kBlock, 'w');
  EXPECT_EQ(nbd_pwrite(snap.get(), buf.data(), buf.size(), 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_get_error();
  EXPECT_EQ(nbd_zero(snap.get(), kBlock, kBlock, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_get_error();

  // The connection still works and the data did not change.
  ASSERT_EQ(nbd_read_all(snap.get(), buf.data(), kBlock, 0), "");
  EXPECT_EQ(check_block(buf.data(), 0, 1), "");
  ASSERT_EQ(nbd_read_all(snap.get(), buf.data(), kBlock, kBlock), "");
  EXPECT_EQ(check_block(buf.data(), kBlock, 1), "");

  // The origin stays writable.
  NbdPtr origin = open(kVolume, {}, &err);
  ASSERT_TRUE(origin) << err;
  EXPECT_EQ(nbd_is_read_only(origin.get()), 0);
}

TEST_F(Exports, UnknownExportNamesFailToConnect) {
  for (const char* name : {"nope", "vol0@nope", "vol1@s1", "vol0@", "@s1"}) {
    std::string err;
    int errnum = 0;
    NbdPtr h = open(name, {}, &err, &errnum);
    EXPECT_FALSE(h) << name << " connected";
    EXPECT_EQ(errnum, ENOENT) << name << ": " << err;
  }
  std::string err;
  NbdPtr h = open("vol0@s1", {}, &err);  // the server is fine afterwards
  EXPECT_TRUE(h) << err;
}

TEST_F(Exports, DestroyedSnapshotExportIsGoneAndOpenConnectionsGetEio) {
  std::string err;
  NbdPtr open_before = open("vol0@s1", {}, &err);
  ASSERT_TRUE(open_before) << err;
  std::vector<char> buf(64 * KiB);
  ASSERT_EQ(nbd_read_all(open_before.get(), buf.data(), buf.size(), 0), "");
  EXPECT_EQ(check_block(buf.data(), 0, 1), "");

  ASSERT_TRUE(IsOk(destroy("s1")));

  int errnum = 0;
  NbdPtr after = open("vol0@s1", {}, &err, &errnum);
  EXPECT_FALSE(after) << "a destroyed snapshot's export still connects";
  EXPECT_EQ(errnum, ENOENT) << err;

  // The connection opened before: reads fail with EIO, promptly.
  for (uint64_t offset : {uint64_t{0}, 2 * MiB}) {
    int64_t cookie = nbd_aio_pread(open_before.get(), buf.data(), buf.size(), offset, NBD_NULL_COMPLETION, 0);
    ASSERT_NE(cookie, -1) << nbd_get_error();
    auto deadline = Clock::now() + std::chrono::seconds(10);
    int done = 0;
    while ((done = nbd_aio_command_completed(open_before.get(), cookie)) == 0) {
      ASSERT_LT(Clock::now(), deadline) << "read on a destroyed snapshot's connection hangs";
      ASSERT_NE(nbd_poll(open_before.get(), 100), -1) << nbd_get_error();
    }
    EXPECT_EQ(done, -1) << "read of a destroyed snapshot succeeded";
    EXPECT_EQ(nbd_get_errno(), EIO) << nbd_get_error();
  }
  // A synchronous read fails as well.
  EXPECT_EQ(nbd_pread(open_before.get(), buf.data(), kBlock, 0, 0), -1);

  // The origin is unaffected.
  NbdPtr origin = open(kVolume, {}, &err);
  ASSERT_TRUE(origin) << err;
  ASSERT_EQ(nbd_read_all(origin.get(), buf.data(), kBlock, 0), "");
  EXPECT_EQ(check_block(buf.data(), 0, 1), "");
}

// Export names listed by `nbdinfo --list --json`.
std::vector<std::string> listed_exports(const std::string& nbdinfo, const std::string& uri, std::string* raw) {
  auto r = run_command({nbdinfo, "--list", "--json", uri});
  *raw = r.out + r.err;
  std::vector<std::string> names;
  if (r.exit_code != 0) return names;
  const std::string key = "\"export-name\": \"";
  for (size_t at = r.out.find(key); at != std::string::npos; at = r.out.find(key, at)) {
    at += key.size();
    names.push_back(r.out.substr(at, r.out.find('"', at) - at));
  }
  return names;
}

TEST_F(Exports, NbdinfoListShowsVolumeAndSnapshotExportsUntilDestroy) {
  std::string nbdinfo = find_program("nbdinfo");
  if (nbdinfo.empty()) GTEST_SKIP() << "nbdinfo is not installed (apt-get install libnbd-bin)";
  ASSERT_TRUE(IsOk(snapshot("s2", kSize)));

  std::string raw;
  auto names = listed_exports(nbdinfo, uri(""), &raw);
  EXPECT_EQ(names, (std::vector<std::string>{"vol0", "vol0@s1", "vol0@s2"})) << raw;
  EXPECT_NE(raw.find("read-only"), std::string::npos) << raw;

  ASSERT_TRUE(IsOk(destroy("s1")));
  names = listed_exports(nbdinfo, uri(""), &raw);
  EXPECT_EQ(names, (std::vector<std::string>{"vol0", "vol0@s2"})) << raw;

  // The plain-text form names them too.
  auto text = run_command({nbdinfo, "--list", uri("")});
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find("export=\"vol0@s2\""), std::string::npos) << text.out;
  EXPECT_EQ(text.out.find("vol0@s1"), std::string::npos) << text.out;
}

// The plugin opens its volumes before nbdkit daemonizes; the fork keeps no
// thread, so every thread the data path needs must start after it (a write
// that waited for a thread lost in the fork would hang).
class Daemonized : public NbdkitTest {
 protected:
  void TearDown() override {
    link_.close();
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      auto deadline = Clock::now() + std::chrono::seconds(30);
      while (::kill(pid_, 0) == 0 && Clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (::kill(pid_, 0) == 0) {
        ADD_FAILURE() << "daemonized nbdkit did not exit within 30 s of SIGTERM";
        ::kill(pid_, SIGKILL);
      }
    }
    NbdkitTest::TearDown();
  }
  pid_t pid_ = -1;
};

TEST_F(Daemonized, ForkedServerServesWritesSnapshotsAndTheLink) {
  constexpr uint64_t kSize = 4 * MiB;
  make_volume(kSize);
  std::string pidfile = path("nbdkit.pid");
  // Through sh so that the daemon's output goes to the log, not to a pipe
  // that run_command would wait on.
  std::string cmd = "exec nbdkit -P '" + pidfile + "' -U '" + nbd_socket_ + "' '" + plugin_ + "' volume=" +
                    kVolume + "='" + volume_path_ + "' state='" + state_dir_ + "' control='" +
                    control_socket_ + "' chunk_minimum_shift=16 >>'" + log_path_ + "' 2>&1";
  CommandResult r = run_command({"sh", "-c", cmd}, 30);
  ASSERT_EQ(r.exit_code, 0) << r.err << read_text(log_path_);
  auto deadline = Clock::now() + std::chrono::seconds(20);
  while (pid_ <= 0 && Clock::now() < deadline) {
    std::string text = read_text(pidfile);
    if (!text.empty() && text.back() == '\n')
      pid_ = static_cast<pid_t>(std::stol(text));
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_GT(pid_, 0) << "no pid file: " << read_text(log_path_);
  Status st;
  while (!(st = link_.connect(control_socket_)) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(IsOk(st));

  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> want(kSize), b(64 * KiB);
  stamp_range(want.data(), 0, kSize, 1);
  ASSERT_EQ(nbd_write_all(h.get(), want.data(), kSize, 0), "");
  ASSERT_TRUE(IsOk(snapshot("s1", kSize)));
  stamp_range(b.data(), MiB, b.size(), 2);
  ASSERT_EQ(nbd_write_all(h.get(), b.data(), b.size(), MiB), "");
  ASSERT_NE(nbd_flush(h.get(), 0), -1) << nbd_get_error();
  std::memcpy(want.data() + MiB, b.data(), b.size());

  std::vector<char> got(kSize);
  ASSERT_EQ(nbd_read_all(h.get(), got.data(), kSize, 0), "");
  EXPECT_TRUE(got == want) << "the volume does not read back what was written";
  EXPECT_EQ(read_text(volume_path_), std::string(want.begin(), want.end())) << "the file differs";
  NbdPtr snap = open("vol0@s1", {}, &err);
  ASSERT_TRUE(snap) << err;
  ASSERT_EQ(nbd_read_all(snap.get(), got.data(), b.size(), MiB), "");
  EXPECT_EQ(check_block(got.data(), MiB, 1), "");
  auto i = info("s1");
  ASSERT_TRUE(IsOk(i.status()));
  EXPECT_EQ(i->info().snapshot().chunks_copied(), 1u);
}

}  // namespace
TEST_F(Exports, VolumeAddedThroughTheLinkIsServedAndRemovedAgain) {
  make_sparse_file(path("extra.img"), 1 * MiB);
  link::Request add;
  add.mutable_add_volume()->set_name("extra");
  add.mutable_add_volume()->set_path(path("extra.img"));
  auto added = call(add);
  ASSERT_TRUE(IsOk(added));
  EXPECT_EQ(added->add_volume().volume().size(), 1 * MiB);

  std::string err;
  NbdPtr h = open("extra", {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> out(4096, 'x'), in(4096);
  ASSERT_NE(nbd_pwrite(h.get(), out.data(), out.size(), 8192, 0), -1) << nbd_get_error();
  ASSERT_EQ(nbd_read_all(h.get(), in.data(), in.size(), 8192), "");
  EXPECT_EQ(in, out);

  auto again = call(add);
  EXPECT_FALSE(again.is_ok());
  EXPECT_EQ(again.status().code(), EEXIST);

  link::Request remove;
  remove.mutable_remove_volume()->set_name("extra");
  ASSERT_TRUE(IsOk(call(remove)));
  EXPECT_EQ(nbd_pread(h.get(), in.data(), in.size(), 0, 0), -1) << "an open connection gets EIO";
  EXPECT_EQ(nbd_get_errno(), EIO);
  NbdPtr gone = open("extra", {}, &err);
  EXPECT_FALSE(gone) << "the export is gone";
}

}  // namespace nbdsnap::it
