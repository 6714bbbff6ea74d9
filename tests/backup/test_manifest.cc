// Manifests and chains without a server: JSON round trip, what parse()
// refuses, finding points, ancestry and the expected checksum of every block.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "backup_chain.h"
#include "file_io.h"

namespace nbdsnap {
namespace {

namespace fs = std::filesystem;

Manifest make(int n, const std::string& kind, const std::string& parent) {
  Manifest m;
  char name[32];
  std::snprintf(name, sizeof name, "backup-%04d", n);
  m.name = name;
  m.file = m.name + ".qcow2";
  if (kind == "full") m.data = m.name + ".raw";
  m.kind = kind;
  m.parent = parent;
  m.volume = "vol0";
  m.generation = "g";
  m.sequence = static_cast<uint64_t>(n);
  m.block_size = 65536;
  m.size = 4 * 65536 + 512;  // 5 blocks, the last partial
  m.time = "2026-11-24T00:00:00Z";
  return m;
}

class TempDir {
 public:
  TempDir() {
    char t[] = "/tmp/nbdsnap-manifest.XXXXXX";
    path_ = ::mkdtemp(t);
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void save(const std::string& dir, const Manifest& m, bool with_file = true) {
  std::ofstream(dir + "/" + m.name + ".json") << m.to_json().dump() << "\n";
  if (with_file) std::ofstream(dir + "/" + m.file) << "x";
  if (with_file && !m.data.empty()) std::ofstream(dir + "/" + m.data) << "x";
}

TEST(Manifest, RoundTrip) {
  Manifest m = make(1, "full", "");
  std::vector<uint32_t> crcs = {1, 0xdeadbeef, 3, 4, 0xffffffff};
  m.checksums = BlockChecksums::from_array(65536, crcs, {1, 1, 1, 1, 1});
  m.bytes_read = 123;
  m.reason = "--full given";
  auto p = Manifest::parse(m.to_json().dump());
  ASSERT_TRUE(p) << p.status().message();
  EXPECT_EQ(p->name, "backup-0001");
  EXPECT_EQ(p->reason, "--full given");
  EXPECT_EQ(p->bytes_read, 123u);
  EXPECT_EQ(p->size, m.size);
  ASSERT_EQ(p->checksums.runs.size(), 1u);
  EXPECT_EQ(p->checksums.runs[0].second, crcs);
  EXPECT_EQ(p->number(), 1u);
}

TEST(Manifest, SparseRuns) {
  std::vector<uint32_t> crcs = {10, 11, 12, 13, 14};
  auto c = BlockChecksums::from_array(65536, crcs, {0, 1, 1, 0, 1});
  ASSERT_EQ(c.runs.size(), 2u);
  EXPECT_EQ(c.runs[0].first, 1u);
  EXPECT_EQ(c.runs[0].second, (std::vector<uint32_t>{11, 12}));
  EXPECT_EQ(c.runs[1].first, 4u);
  EXPECT_EQ(c.blocks(), 3u);
}

TEST(Manifest, ParseRefusesWhatIsWrong) {
  Manifest full = make(1, "full", "");
  full.checksums = BlockChecksums::from_array(65536, {1, 2, 3, 4, 5}, {1, 1, 1, 1, 1});
  std::string good = full.to_json().dump();
  ASSERT_TRUE(Manifest::parse(good));
  auto bad = [&](std::string from, std::string to) {
    std::string t = good;
    auto at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    t.replace(at, from.size(), to);
    return Manifest::parse(t);
  };
  EXPECT_FALSE(Manifest::parse("not json"));
  EXPECT_FALSE(Manifest::parse("{}"));
  EXPECT_FALSE(bad("nbdsnap-backup/1", "nbdsnap-backup/2"));
  EXPECT_FALSE(bad("\"kind\":\"full\"", "\"kind\":\"partial\""));
  EXPECT_FALSE(bad("00000001", "0000000g"));                   // bad hex
  EXPECT_FALSE(bad("\"blocks\":5", "\"blocks\":4"));           // count differs
  EXPECT_FALSE(bad("\"crc32c\"", "\"md5\""));
  EXPECT_FALSE(bad("[[0,\"", "[[1,\""));                       // past the end
  EXPECT_FALSE(bad("[[0,\"", "[[18446744073709551615,\""));   // first + count overflows
  Manifest partial = make(1, "full", "");
  partial.checksums = BlockChecksums::from_array(65536, {1, 2, 3, 4, 5}, {1, 1, 0, 1, 1});
  EXPECT_FALSE(Manifest::parse(partial.to_json().dump())) << "a full backup needs every block";
  Manifest orphan = make(2, "incremental", "");
  EXPECT_FALSE(Manifest::parse(orphan.to_json().dump()));
  EXPECT_FALSE(bad("\"data\":\"backup-0001.raw\"", "\"data\":null")) << "a full backup names its raw data";
}

TEST(Chain, FindAncestryAndExpected) {
  TempDir d;
  Manifest a = make(1, "full", "");
  a.checksums = BlockChecksums::from_array(65536, {1, 2, 3, 4, 5}, {1, 1, 1, 1, 1});
  Manifest b = make(2, "incremental", "backup-0001");
  b.checksums = BlockChecksums::from_array(65536, {0, 22, 0, 0, 55}, {0, 1, 0, 0, 1});
  Manifest c = make(3, "incremental", "backup-0002");
  c.checksums = BlockChecksums::from_array(65536, {111, 0, 0, 0, 0}, {1, 0, 0, 0, 0});
  Manifest e = make(4, "full", "");
  e.checksums = BlockChecksums::from_array(65536, {9, 9, 9, 9, 9}, {1, 1, 1, 1, 1});
  for (const auto* m : {&a, &b, &c, &e}) save(d.path(), *m);
  std::ofstream(d.path() + "/backup-0005.qcow2.part") << "unfinished";

  auto chain = BackupChain::load(d.path());
  ASSERT_TRUE(chain) << chain.status().message();
  ASSERT_EQ(chain->backups().size(), 4u);
  EXPECT_EQ(chain->next_name(), "backup-0005");
  EXPECT_EQ((*chain->find("latest"))->name, "backup-0004");
  EXPECT_EQ((*chain->find("3"))->name, "backup-0003");
  EXPECT_EQ((*chain->find("backup-0002"))->name, "backup-0002");
  EXPECT_FALSE(chain->find("7"));
  EXPECT_FALSE(chain->find("backup-x"));

  auto anc = chain->ancestry(**chain->find("3"));
  ASSERT_TRUE(anc);
  ASSERT_EQ(anc->size(), 3u);
  EXPECT_EQ((*anc)[2]->name, "backup-0001");
  auto want = chain->expected(**chain->find("3"));
  ASSERT_TRUE(want);
  EXPECT_EQ(*want, (std::vector<uint32_t>{111, 22, 3, 4, 55}));
  EXPECT_EQ(*chain->expected(**chain->find("2")), (std::vector<uint32_t>{1, 22, 3, 4, 55}));
  EXPECT_EQ(*chain->expected(**chain->find("4")), (std::vector<uint32_t>{9, 9, 9, 9, 9}));

  // A missing file anywhere in the ancestry is an error naming it.
  fs::remove(d.path() + "/backup-0001.qcow2");
  auto broken = chain->ancestry(**chain->find("3"));
  ASSERT_FALSE(broken);
  EXPECT_NE(broken.status().message().find("backup-0001.qcow2 is missing"), std::string::npos);
  EXPECT_TRUE(chain->ancestry(**chain->find("4")));
  fs::remove(d.path() + "/backup-0004.raw");
  auto no_data = chain->ancestry(**chain->find("4"));
  ASSERT_FALSE(no_data);
  EXPECT_NE(no_data.status().message().find("backup-0004.raw is missing"), std::string::npos);
}

TEST(Chain, DamagedManifestIsNamed) {
  TempDir d;
  std::ofstream(d.path() + "/backup-0001.json") << "{\"format\":";
  auto chain = BackupChain::load(d.path());
  ASSERT_FALSE(chain);
  EXPECT_NE(chain.status().message().find("backup-0001.json"), std::string::npos) << chain.status().message();
  EXPECT_FALSE(BackupChain::load(d.path() + "/nosuch"));
}

TEST(WriteFileAtomic, ReplacesWholeOrNothing) {
  TempDir d;
  std::string p = d.path() + "/f.json";
  // As backup.cc writes manifests: PATH.part, readable by all.
  ASSERT_TRUE(write_file_atomic(p, "one", ".part", 0644));
  ASSERT_TRUE(write_file_atomic(p, "two", ".part", 0644));
  std::ifstream in(p);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(s, "two");
  EXPECT_FALSE(fs::exists(p + ".part"));
  EXPECT_EQ(fs::status(p).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
  EXPECT_FALSE(write_file_atomic(d.path() + "/nosuchdir/f", "x", ".part", 0644));
  // A failed rename (onto a directory that is not empty) leaves no temp file.
  std::string busy = d.path() + "/busy";
  fs::create_directories(busy + "/inside");
  Status st = write_file_atomic(busy, "x", ".part", 0644);
  EXPECT_FALSE(st);
  EXPECT_NE(st.message().find("rename"), std::string::npos) << st.message();
  EXPECT_FALSE(fs::exists(busy + ".part"));
  EXPECT_TRUE(fs::is_directory(busy + "/inside"));
}

}  // namespace
}  // namespace nbdsnap
