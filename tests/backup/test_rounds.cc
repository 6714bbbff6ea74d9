// Rounds of random writes, snapshot, backup (full, then incremental) and
// destroy; then every point of the chain is restored and compared with the
// model of the volume at its snapshot, read directly by qemu-img, verified,
// restored into the volume itself, and a damaged backup file is caught.
#include <set>

#include "backup_fixture.h"

namespace nbdsnap::bt {
namespace {

class Rounds : public BackupTest {};

constexpr uint64_t kSize = 64 * MiB;
constexpr uint64_t kBlock = 64 * KiB;  // the CBT block at this size
constexpr int kRounds = 6;

TEST_F(Rounds, EveryPointRestoresExactly) {
  ASSERT_TRUE(start_volume(kSize));
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("NBDSNAP_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("seed %llu (NBDSNAP_SEED to replay)\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::string dir = path("backups");
  std::vector<std::vector<char>> points;  // the model at each snapshot

  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  for (int round = 1; round <= kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::set<uint64_t> touched, zeroed, pages;  // CBT blocks; 4 KiB pages of data
    // Random writes of 4 KiB to 512 KiB, a few zeroed ranges; the first
    // round writes more (about a quarter of the volume).
    int writes = round == 1 ? 60 : 12;
    for (int w = 0; w < writes; ++w) {
      uint64_t len = (1 + rng() % 128) * 4 * KiB;
      uint64_t off = rng() % ((kSize - len) / (4 * KiB)) * 4 * KiB;
      ASSERT_NO_FATAL_FAILURE(write(h.get(), off, random_bytes(&rng, len)));
      for (uint64_t b = off / kBlock; b * kBlock < off + len; ++b) touched.insert(b);
      for (uint64_t p = off / (4 * KiB); p * 4 * KiB < off + len; ++p) pages.insert(p);
    }
    if (round > 1) {
      uint64_t b = rng() % (kSize / kBlock);
      ASSERT_NO_FATAL_FAILURE(zero(h.get(), b * kBlock, kBlock));
      touched.insert(b);
      zeroed.insert(b);
      for (uint64_t p = b * kBlock / (4 * KiB); p < (b + 1) * kBlock / (4 * KiB); ++p) pages.erase(p);
    }
    ASSERT_NE(nbd_flush(h.get(), 0), -1);
    const std::string snap = "r" + std::to_string(round);
    snapshot(snap);
    points.push_back(model_);

    JValue m = nbdsnap_json({"backup", snap, "--to", dir});
    ASSERT_TRUE(m.is_object());
    EXPECT_EQ(m["name"].str(), "backup-000" + std::to_string(round));
    EXPECT_EQ(m["volume"].str(), "vol0");
    EXPECT_EQ(m["snapshot_name"].str(), snap);
    EXPECT_EQ(m["size"].u64(), kSize);
    EXPECT_EQ(m["block_size"].u64(), kBlock);
    EXPECT_FALSE(m["generation"].str().empty());
    if (round == 1) {
      EXPECT_EQ(m["kind"].str(), "full");
      EXPECT_TRUE(m["parent"].is_null());
      EXPECT_EQ(m["checksums"]["blocks"].u64(), kSize / kBlock);
      // Holes are skipped: much less than the volume is read.
      EXPECT_LT(m["bytes_read"].u64(), kSize / 2);
    } else {
      EXPECT_EQ(m["kind"].str(), "incremental");
      EXPECT_EQ(m["parent"].str(), "backup-000" + std::to_string(round - 1));
      // CBT granularity: exactly the touched blocks changed, and only they
      // were read, at least every page written in the round (the rest of a
      // block may be a hole of the volume file, skipped).
      EXPECT_EQ(m["changed_bytes"].u64(), touched.size() * kBlock);
      EXPECT_EQ(m["checksums"]["blocks"].u64(), touched.size());
      EXPECT_LE(m["bytes_read"].u64(), touched.size() * kBlock);
      EXPECT_GE(m["bytes_read"].u64(), pages.size() * 4 * KiB);
      std::printf("round %d: %zu blocks touched, %llu bytes read of %llu\n", round, touched.size(),
                  static_cast<unsigned long long>(m["bytes_read"].u64()), static_cast<unsigned long long>(kSize));
    }
    auto d = destroy(snap);
    ASSERT_TRUE(IsOk(d));
  }
  h.reset();

  // Every point, through our restore (checksummed) and through qemu-img
  // reading the qcow2 chain by itself.
  for (int i = 1; i <= kRounds; ++i) {
    SCOPED_TRACE("point " + std::to_string(i));
    std::string out = path("restore-" + std::to_string(i) + ".img");
    CommandResult r = nbdsnap({"restore", dir, "--backup", std::to_string(i), "--to", out});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("all match"), std::string::npos) << r.out;
    EXPECT_EQ(compare_file(out, points[i - 1]), "");
    std::string raw = path("qemu-" + std::to_string(i) + ".raw");
    CommandResult c = run_command({"qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                                   dir + "/backup-000" + std::to_string(i) + ".qcow2", raw});
    ASSERT_EQ(c.exit_code, 0) << c.err;
    EXPECT_EQ(compare_file(raw, points[i - 1]), "");
    ::unlink(raw.c_str());
    ::unlink(out.c_str());
  }

  // verify: every backup's own blocks, then one whole point.
  JValue v = nbdsnap_json({"verify", dir});
  EXPECT_TRUE(v["ok"].b);
  ASSERT_EQ(v["backups"].size(), static_cast<size_t>(kRounds));
  EXPECT_EQ(v["backups"][0]["blocks"].u64(), kSize / kBlock);
  JValue whole = nbdsnap_json({"verify", dir, "--backup", "3"});
  EXPECT_TRUE(whole["ok"].b);
  EXPECT_EQ(whole["backups"][0]["blocks"].u64(), kSize / kBlock);
  EXPECT_TRUE(whole["backups"][0]["whole_point"].b);

  // Restore point 2 into the volume itself, through its export; the next
  // backup is incremental and holds exactly that state.
  CommandResult rv = nbdsnap({"restore", dir, "--backup", "backup-0002", "--volume", kVolume});
  ASSERT_EQ(rv.exit_code, 0) << rv.err;
  {
    NbdPtr r = open(kVolume, {}, &err);
    ASSERT_TRUE(r) << err;
    std::vector<char> got(kSize);
    ASSERT_EQ(nbd_read_all(r.get(), got.data(), kSize, 0), "");
    EXPECT_TRUE(got == points[1]) << "the volume after restore differs from point 2";
  }
  snapshot("after-restore");
  JValue m = nbdsnap_json({"backup", "after-restore", "--to", dir});
  EXPECT_EQ(m["kind"].str(), "incremental");
  std::string out = path("after-restore.img");
  CommandResult r = nbdsnap({"restore", dir, "--to", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(out, points[1]), "");

  // The chain names its backing files relatively: a moved directory still
  // reads, for qemu-img too.
  const std::string moved = path("moved");
  fs::rename(dir, moved);
  dir = moved;
  {
    std::ofstream(path("qemu-ref-4.raw"), std::ios::binary)
        .write(points[3].data(), static_cast<std::streamsize>(points[3].size()));
    CommandResult cmp = run_command({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", dir + "/backup-0004.qcow2",
                       path("qemu-ref-4.raw")});
    EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
  }

  // Damage one data cluster of backup-0002: verify and restore say so.
  std::string file = dir + "/backup-0002.qcow2";
  CommandResult map = run_command({"qemu-img", "map", "--output=json", "-f", "qcow2", file});
  ASSERT_EQ(map.exit_code, 0) << map.err;
  std::string mj;
  auto parsed = json::parse_json(map.out, &mj);
  ASSERT_TRUE(parsed) << mj;
  uint64_t host = 0;
  for (size_t i = 0; i < parsed->size() && host == 0; ++i) {
    const JValue& e = (*parsed)[i];
    if (e["data"].b && e["depth"].u64() == 0 && e["offset"].is_number()) host = e["offset"].u64() + 100;
  }
  ASSERT_NE(host, 0u) << "no data cluster in " << file << ": " << map.out;
  {
    int fd = ::open(file.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char b;
    ASSERT_EQ(::pread(fd, &b, 1, static_cast<off_t>(host)), 1);
    b = static_cast<char>(b ^ 0x5a);
    ASSERT_EQ(::pwrite(fd, &b, 1, static_cast<off_t>(host)), 1);
    ::close(fd);
  }
  CommandResult bad = nbdsnap({"verify", dir});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("backup-0002: 1 of"), std::string::npos) << bad.err;
  EXPECT_NE(bad.out.find("1 BAD"), std::string::npos) << bad.out;
  CommandResult bad_restore = nbdsnap({"restore", dir, "--backup", "2", "--to", path("bad.img")});
  EXPECT_EQ(bad_restore.exit_code, 1);
  EXPECT_NE(bad_restore.err.find("do not match"), std::string::npos) << bad_restore.err;
}

}  // namespace
}  // namespace nbdsnap::bt
