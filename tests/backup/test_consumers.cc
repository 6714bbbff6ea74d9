// Real NBD consumers on the exports: qemu-img convert and compare on a
// snapshot export, nbdcopy both ways, and fio's nbd engine writing (with
// verification) to the volume and reading the snapshot, which keeps its
// point-in-time bytes throughout and refuses writes.
#include "backup_fixture.h"

namespace nbdsnap::bt {
namespace {

constexpr uint64_t kSize = 64 * MiB;

class Consumers : public BackupTest {
 protected:
  void SetUp() override {
    BackupTest::SetUp();
    if (IsSkipped()) return;
    ASSERT_TRUE(start_volume(kSize));
    std::mt19937_64 rng(3);
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    ASSERT_TRUE(h) << err;
    for (int i = 0; i < 40; ++i) {
      uint64_t len = (1 + rng() % 64) * 4 * KiB;
      uint64_t off = rng() % ((kSize - len) / (4 * KiB)) * 4 * KiB;
      ASSERT_NO_FATAL_FAILURE(write(h.get(), off, random_bytes(&rng, len)));
    }
    ASSERT_NE(nbd_flush(h.get(), 0), -1);
    snapshot("s1");
    point_ = model_;
    ref_ = path("ref.raw");
    std::ofstream(ref_, std::ios::binary).write(point_.data(), static_cast<std::streamsize>(point_.size()));
  }
  std::string uri(const std::string& exp) const { return "nbd+unix:///" + exp + "?socket=" + nbd_socket_; }
  std::vector<char> point_;
  std::string ref_;
};

TEST_F(Consumers, QemuImgConvertAndCompare) {
  std::string out = path("convert.qcow2");
  CommandResult c = run_command({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri("vol0@s1"), out});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  CommandResult cmp = run_command({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, ref_});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
  EXPECT_NE(cmp.out.find("Images are identical"), std::string::npos) << cmp.out;
  // The export itself against the reference, while the origin changes.
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> junk(1 * MiB, 'x');
  ASSERT_NO_FATAL_FAILURE(write(h.get(), 3 * MiB, junk));
  cmp = run_command({"qemu-img", "compare", "-f", "raw", "-F", "raw", uri("vol0@s1"), ref_});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
  cmp = run_command({"qemu-img", "compare", "-f", "raw", "-F", "raw", uri("vol0"), ref_});
  EXPECT_EQ(cmp.exit_code, 1) << "the origin changed, compare must say so: " << cmp.out << cmp.err;
  // qemu-img info names the size.
  CommandResult info = run_command({"qemu-img", "info", "--output=json", "-f", "raw", uri("vol0@s1")});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("\"virtual-size\": " + std::to_string(kSize)), std::string::npos) << info.out;
}

TEST_F(Consumers, Nbdcopy) {
  if (find_program("nbdcopy").empty()) GTEST_SKIP() << "nbdcopy is not installed (libnbd-bin)";
  std::string out = path("copy.raw");
  CommandResult c = run_command({"nbdcopy", "--connections=4", uri("vol0@s1"), out});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_EQ(compare_file(out, point_), "");
  // Into the volume (a restore by hand), then the volume reads back the same.
  std::vector<char> other(kSize);
  std::mt19937_64 rng(9);
  auto bytes = random_bytes(&rng, 8 * MiB);
  std::memcpy(other.data() + 8 * MiB, bytes.data(), bytes.size());
  std::string src = path("other.raw");
  std::ofstream(src, std::ios::binary).write(other.data(), static_cast<std::streamsize>(other.size()));
  c = run_command({"nbdcopy", src, uri("vol0")});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> got(kSize);
  ASSERT_EQ(nbd_read_all(h.get(), got.data(), kSize, 0), "");
  EXPECT_TRUE(got == other);
  // The snapshot still has its point.
  c = run_command({"nbdcopy", uri("vol0@s1"), path("copy2.raw")});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_EQ(compare_file(path("copy2.raw"), point_), "");
}

// fio prints a line before its JSON on these versions.
std::optional<JValue> fio_json(const std::string& out) {
  auto brace = out.find('{');
  if (brace == std::string::npos) return std::nullopt;
  std::string err;
  return json::parse_json(out.substr(brace), &err);
}

TEST_F(Consumers, FioNbdEngine) {
  if (find_program("fio").empty()) GTEST_SKIP() << "fio is not installed";
  // Random writes with crc32c verification read back through the engine.
  CommandResult w = run_command({"fio", "--name=rw", "--ioengine=nbd", "--uri=" + uri("vol0"), "--rw=randwrite",
                                 "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
                                 "--randrepeat=0", "--output-format=json"},
                                120);
  ASSERT_EQ(w.exit_code, 0) << w.out << w.err;
  auto j = fio_json(w.out);
  ASSERT_TRUE(j) << w.out;
  EXPECT_EQ((*j)["jobs"][0]["error"].u64(), 0u);
  EXPECT_EQ((*j)["jobs"][0]["write"]["io_bytes"].u64(), 16 * MiB);
  EXPECT_EQ((*j)["jobs"][0]["read"]["io_bytes"].u64(), 16 * MiB) << "the verify pass read it all back";
  // The snapshot export: random reads work and it kept its bytes.
  CommandResult r = run_command({"fio", "--name=r", "--ioengine=nbd", "--uri=" + uri("vol0@s1"), "--rw=randread",
                                 "--bs=4k", "--size=16M", "--iodepth=32", "--readonly", "--output-format=json"},
                                120);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  j = fio_json(r.out);
  ASSERT_TRUE(j) << r.out;
  EXPECT_EQ((*j)["jobs"][0]["read"]["io_bytes"].u64(), 16 * MiB);
  std::string err;
  NbdPtr h = open("vol0@s1", {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> got(kSize);
  ASSERT_EQ(nbd_read_all(h.get(), got.data(), kSize, 0), "");
  EXPECT_TRUE(got == point_) << "the snapshot changed under fio's writes to the origin";
  // Writes to the snapshot export fail.
  CommandResult bad = run_command({"fio", "--name=w", "--ioengine=nbd", "--uri=" + uri("vol0@s1"), "--rw=write",
                                   "--bs=64k", "--size=1M", "--output-format=json"},
                                  60);
  EXPECT_NE(bad.exit_code, 0) << bad.out;
}

}  // namespace
}  // namespace nbdsnap::bt
