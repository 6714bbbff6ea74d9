// When an incremental backup is impossible the backup is full and says why
// (generation reset, previous file missing, --full, plain exports); what
// must not be mixed up fails cleanly (another volume in the directory, a
// snapshot not taken, usage errors), and restore never overwrites a file
// by surprise.
#include <sys/file.h>

#include "backup_fixture.h"

namespace nbdsnap::bt {
namespace {

constexpr uint64_t kSize = 16 * MiB;

class Fallback : public BackupTest {
 protected:
  void SetUp() override {
    BackupTest::SetUp();
    if (IsSkipped()) return;
    ASSERT_TRUE(start_volume(kSize));
    rng_.seed(11);
  }
  // A few random writes, then snapshot NAME taken; returns the model.
  std::vector<char> change_and_snapshot(const std::string& name) {
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    EXPECT_TRUE(h) << err;
    if (!h) return {};
    for (int i = 0; i < 4; ++i) {
      uint64_t off = rng_() % (kSize / (64 * KiB)) * 64 * KiB;
      write(h.get(), off, random_bytes(&rng_, 64 * KiB));
    }
    EXPECT_NE(nbd_flush(h.get(), 0), -1);
    snapshot(name);
    return model_;
  }
  std::mt19937_64 rng_;
};

TEST_F(Fallback, GenerationResetMeansAnnouncedFullBackup) {
  const std::string dir = path("b");
  change_and_snapshot("s1");
  JValue m1 = nbdsnap_json({"backup", "s1", "--to", dir});
  EXPECT_EQ(m1["kind"].str(), "full");
  ASSERT_TRUE(IsOk(destroy("s1")));

  // Lose the CBT state: stop, delete the map, start again.
  ASSERT_TRUE(daemon_.stop());
  std::string map = state_dir_ + "/data/cbt/vol0.map";
  ASSERT_EQ(::unlink(map.c_str()), 0) << map << ": " << std::strerror(errno);
  ASSERT_TRUE(restart_daemon());
  client_.reset();  // the API connection of the old daemon
  auto expected = change_and_snapshot("s2");
  CommandResult raw;
  JValue m2 = nbdsnap_json({"backup", "s2", "--to", dir}, &raw);
  EXPECT_EQ(m2["kind"].str(), "full");
  EXPECT_NE(m2["generation"].str(), m1["generation"].str());
  EXPECT_NE(m2["reason"].str().find("generation"), std::string::npos) << m2["reason"].str();
  // One line on stderr says why.
  EXPECT_NE(raw.err.find("nbdsnap: backup: full backup: the change tracking generation of vol0 changed"),
            std::string::npos)
      << raw.err;
  EXPECT_EQ(std::count(raw.err.begin(), raw.err.end(), '\n'), 1) << raw.err;
  CommandResult r = nbdsnap({"restore", dir, "--to", path("r2.img")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(path("r2.img"), expected), "");

  // And the next one is incremental again, from the new generation.
  ASSERT_TRUE(IsOk(destroy("s2")));
  expected = change_and_snapshot("s3");
  JValue m3 = nbdsnap_json({"backup", "s3", "--to", dir}, &raw);
  EXPECT_EQ(m3["kind"].str(), "incremental");
  EXPECT_EQ(m3["parent"].str(), "backup-0002");
  EXPECT_EQ(raw.err, "");
  r = nbdsnap({"restore", dir, "--to", path("r3.img")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(path("r3.img"), expected), "");
}

TEST_F(Fallback, MissingPreviousFileMeansFullBackup) {
  const std::string dir = path("b");
  change_and_snapshot("s1");
  nbdsnap_json({"backup", "s1", "--to", dir});
  change_and_snapshot("s2");
  JValue m2 = nbdsnap_json({"backup", "s2", "--to", dir});
  EXPECT_EQ(m2["kind"].str(), "incremental");
  ASSERT_EQ(::unlink((dir + "/backup-0001.qcow2").c_str()), 0);

  // Point 2 cannot be restored any more, and says why.
  CommandResult r = nbdsnap({"restore", dir, "--backup", "2", "--to", path("x.img")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("backup-0001.qcow2 is missing"), std::string::npos) << r.err;
  CommandResult v = nbdsnap({"verify", dir});
  EXPECT_EQ(v.exit_code, 1);
  EXPECT_NE(v.err.find("is missing"), std::string::npos) << v.err;

  auto expected = change_and_snapshot("s3");
  CommandResult raw;
  JValue m3 = nbdsnap_json({"backup", "s3", "--to", dir}, &raw);
  EXPECT_EQ(m3["kind"].str(), "full");
  EXPECT_NE(raw.err.find("full backup: the previous backup cannot be used"), std::string::npos) << raw.err;
  r = nbdsnap({"restore", dir, "--to", path("r3.img")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(path("r3.img"), expected), "");
}

TEST_F(Fallback, FullOnRequestAndPlainExports) {
  const std::string dir = path("b");
  auto p1 = change_and_snapshot("s1");
  nbdsnap_json({"backup", "s1", "--to", dir});
  JValue m2 = nbdsnap_json({"backup", "s1", "--to", dir, "--full"});
  EXPECT_EQ(m2["kind"].str(), "full");
  EXPECT_EQ(m2["reason"].str(), "--full given");

  // A plain export (no daemon, no CBT): full every time, with a reason the
  // second time; its "volume" is the export name.
  const std::string plain = path("plain");
  const std::string uri = "nbd+unix:///vol0@s1?socket=" + nbd_socket_;
  JValue a = nbdsnap_json({"backup", "--uri", uri, "--to", plain});
  EXPECT_EQ(a["kind"].str(), "full");
  EXPECT_TRUE(a["generation"].is_null());
  EXPECT_EQ(a["volume"].str(), "vol0@s1");
  CommandResult raw;
  JValue b = nbdsnap_json({"backup", "--uri", uri, "--to", plain}, &raw);
  EXPECT_EQ(b["kind"].str(), "full");
  EXPECT_NE(raw.err.find("no change tracking"), std::string::npos) << raw.err;
  CommandResult r = nbdsnap({"restore", plain, "--to", path("p.img")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(path("p.img"), p1), "");

  // With SNAPSHOT, --uri must name that snapshot's export (CBT of one
  // export and bytes of another would make a wrong incremental).
  CommandResult other = nbdsnap({"backup", "s1", "--to", dir, "--uri", "nbd+unix:///vol0?socket=" + nbd_socket_});
  EXPECT_EQ(other.exit_code, 1);
  EXPECT_NE(other.err.find("--uri names the export 'vol0', not the snapshot's export vol0@s1"), std::string::npos)
      << other.err;
  JValue by_uri = nbdsnap_json({"backup", "s1", "--to", dir, "--uri", uri});
  EXPECT_EQ(by_uri["kind"].str(), "incremental");

  // Backups of another volume do not go into that directory.
  CommandResult wrong = nbdsnap({"backup", "--uri", uri, "--to", dir});
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_NE(wrong.err.find("holds backups of 'vol0', not 'vol0@s1'"), std::string::npos) << wrong.err;
}

TEST_F(Fallback, BadRequestsFailCleanly) {
  const std::string dir = path("b");
  auto c = create({kVolume}, "notyet");
  ASSERT_TRUE(IsOk(c));
  CommandResult r = nbdsnap({"backup", "notyet", "--to", dir});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("not taken yet"), std::string::npos) << r.err;
  r = nbdsnap({"backup", "nosuch", "--to", dir});
  EXPECT_EQ(r.exit_code, 1);
  r = nbdsnap({"backup", "--to", dir});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("give a SNAPSHOT, or --uri"), std::string::npos) << r.err;
  r = nbdsnap({"backup", "notyet"});
  EXPECT_EQ(r.exit_code, 2);
  r = nbdsnap({"restore", dir, "--to", path("a"), "--uri", "nbd://127.0.0.1/x"});
  EXPECT_EQ(r.exit_code, 2);
  r = nbdsnap({"restore", path("nodir"), "--to", path("a")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("open backup directory"), std::string::npos) << r.err;
  r = nbdsnap({"backup", "--uri", "nbd+unix:///nosuch?socket=" + nbd_socket_, "--to", dir});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("connect to nbd+unix:///nosuch"), std::string::npos) << r.err;

  // Restore does not overwrite an existing file without --force.
  change_and_snapshot("s1");
  nbdsnap_json({"backup", "s1", "--to", dir});
  std::string target = path("existing.img");
  {
    std::ofstream f(target);
    f << "precious";
  }
  r = nbdsnap({"restore", dir, "--to", target});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("exists (give --force"), std::string::npos) << r.err;
  EXPECT_EQ(read_text(target), "precious");
  r = nbdsnap({"restore", dir, "--to", target, "--force"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(target, model_), "");

  // One backup at a time per directory.
  {
    int fd = ::open((dir + "/.nbdsnap-backup.lock").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_EX), 0);
    r = nbdsnap({"backup", "s1", "--to", dir});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("another backup into " + dir + " is running"), std::string::npos) << r.err;
    ::close(fd);
  }

  // Files of an interrupted run (no manifest) do not count and go, even
  // after their rename.
  for (const char* f : {"/backup-0002.qcow2.part", "/backup-0002.raw", "/backup-0002.raw.part"})
    std::ofstream(dir + f) << "junk";
  JValue m = nbdsnap_json({"backup", "s1", "--to", dir, "--full"});
  EXPECT_EQ(m["name"].str(), "backup-0002");
  EXPECT_FALSE(fs::exists(dir + "/backup-0002.qcow2.part"));
  EXPECT_FALSE(fs::exists(dir + "/backup-0002.raw.part"));
  r = nbdsnap({"verify", dir});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

// Plain exports of odd shapes: a size that is not a multiple of 512 (qcow2
// rounds it up), and 64 MiB checksum blocks (more than one NBD request).
TEST_F(Fallback, OddSizesAndHugeBlocks) {
  for (auto [size, block] : {std::pair<uint64_t, std::string>{100000, "4K"}, {66 * MiB, "64M"}}) {
    SCOPED_TRACE("size " + std::to_string(size) + ", block " + block);
    std::string sock = path("mem.sock"), dir = path("odd-" + block);
    ServerProcess mem;
    ASSERT_TRUE(mem.start({"nbdkit", "-f", "-U", sock, "memory", "size=" + std::to_string(size)}, sock,
                          path("nbdkit-memory.log")));
    NbdPtr h = nbd_open(sock, "");
    ASSERT_TRUE(h);
    std::mt19937_64 rng(size);
    std::vector<char> want(size, 0);
    auto bytes = random_bytes(&rng, size / 2);
    std::memcpy(want.data() + size / 4, bytes.data(), bytes.size());
    ASSERT_EQ(nbd_write_all(h.get(), bytes.data(), bytes.size(), size / 4), "");
    h.reset();
    const std::string uri = "nbd+unix:///?socket=" + sock;
    JValue m = nbdsnap_json({"backup", "--uri", uri, "--to", dir, "--block-size", block});
    EXPECT_EQ(m["size"].u64(), size);
    mem.stop();
    CommandResult v = nbdsnap({"verify", dir, "--backup", "1"});
    EXPECT_EQ(v.exit_code, 0) << v.err;
    CommandResult r = nbdsnap({"restore", dir, "--to", path("odd.img"), "--force"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(compare_file(path("odd.img"), want), "");
  }
}

// A restore target that takes a single client (qemu-nbd's default): one
// connection, not a hang.
TEST_F(Fallback, RestoreToASingleClientServer) {
  auto expected = change_and_snapshot("s1");
  const std::string dir = path("b");
  nbdsnap_json({"backup", "s1", "--to", dir});
  std::string target = path("target.img"), sock = path("q.sock");
  make_sparse_file(target, kSize);
  {
    ServerProcess q;
    ASSERT_TRUE(q.start({"qemu-nbd", "-f", "raw", "-k", sock, "--persistent", target}, sock, path("qemu-nbd.log")));
    CommandResult r = run_command({cli_, "--api", api_socket_, "restore", dir, "--uri", "nbd+unix:///?socket=" + sock},
                                  60);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  EXPECT_EQ(compare_file(target, expected), "");
}

// Restore to a block device (a loop device over a file full of junk): zero
// blocks must be written as zeroes there, not skipped.
TEST_F(Fallback, RestoreToABlockDevice) {
  if (::geteuid() != 0 || find_program("losetup").empty()) GTEST_SKIP() << "needs root and losetup for a loop device";
  auto expected = change_and_snapshot("s1");
  const std::string dir = path("b");
  nbdsnap_json({"backup", "s1", "--to", dir});
  std::string backing = path("loop.img");
  std::ofstream(backing, std::ios::binary).write(std::string(kSize, '\x5a').data(), kSize);
  CommandResult l = run_command({"losetup", "--find", "--show", backing});
  if (l.exit_code != 0) GTEST_SKIP() << "no loop device: " << l.err;
  std::string dev = l.out.substr(0, l.out.find('\n'));
  struct Detach {
    std::string dev;
    ~Detach() { run_command({"losetup", "-d", dev}); }
  } detach{dev};
  CommandResult r = nbdsnap({"restore", dir, "--to", dev});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Through the device, then the file under it.
  std::vector<char> got(kSize);
  int fd = ::open(dev.c_str(), O_RDONLY | O_DIRECT);
  ASSERT_GE(fd, 0);
  void* buf = nullptr;
  ASSERT_EQ(::posix_memalign(&buf, 4096, kSize), 0);
  ASSERT_EQ(::pread(fd, buf, kSize, 0), static_cast<ssize_t>(kSize));
  std::memcpy(got.data(), buf, kSize);
  std::free(buf);
  ::close(fd);
  EXPECT_TRUE(got == expected) << "the device differs from the snapshot";
  // A device smaller than the backup is refused.
  std::string small = path("small.img");
  make_sparse_file(small, kSize / 2);
  CommandResult s2 = run_command({"losetup", "--find", "--show", small});
  ASSERT_EQ(s2.exit_code, 0) << s2.err;
  Detach d2{s2.out.substr(0, s2.out.find('\n'))};
  r = nbdsnap({"restore", dir, "--to", d2.dev});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("smaller"), std::string::npos) << r.err;
}

TEST_F(Fallback, ProgressOnATerminalOnly) {
  if (find_program("script").empty()) GTEST_SKIP() << "script is not installed (bsdutils)";
  change_and_snapshot("s1");
  // On a terminal (script(1) gives it one): bytes, percentage, rate, ETA.
  auto on_tty = [&](const std::string& args) {
    return run_command({"script", "-qec", cli_ + " --api " + api_socket_ + " " + args, "/dev/null"});
  };
  CommandResult t = on_tty("backup s1 --to " + path("tty"));
  ASSERT_EQ(t.exit_code, 0) << t.out << t.err;
  EXPECT_NE(t.out.find("backup  16.0 MiB / 16.0 MiB  100%"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("ETA "), std::string::npos) << t.out;
  // Not with --json, nor when stderr is not a terminal.
  t = on_tty("--json backup s1 --to " + path("tty"));
  ASSERT_EQ(t.exit_code, 0) << t.out << t.err;
  EXPECT_EQ(t.out.find("ETA "), std::string::npos) << t.out;
  CommandResult plain = nbdsnap({"backup", "s1", "--to", path("tty")});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_EQ(plain.err.find("ETA "), std::string::npos) << plain.err;
}

}  // namespace
}  // namespace nbdsnap::bt
