// Change tracking: the CbtMap file (generation, trust rules) and the engine's
// CBT operations (stamps, frozen views per snapshot, changes, mark-dirty).
#include "cbt_map.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <set>
#include <vector>

#include "crc32c.h"
#include "test_util.h"

namespace nbdsnap {

bool operator==(const ByteRange& a, const ByteRange& b) { return a.offset == b.offset && a.length == b.length; }

namespace {

using test::Harness;
using test::kKiB;
using test::kMiB;
using test::pattern;

// ------------------------------------------------------------------ CbtMap

class CbtMapTest : public ::testing::Test {
 protected:
  Geometry geometry_{4 * kMiB + 1000, 16, 12};  // 1025 blocks, the last one short
  test::TempDir dir_;
  std::string path_ = dir_.file("vol.map");
};

// The on-disk header (docs/on-disk-format.md), to simulate other boots.
struct DiskHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_crc;
  uint8_t generation[16];
  uint64_t capacity;
  uint32_t block_shift;
  uint32_t clean;
  uint64_t block_count;
  char boot_id[40];
};
static_assert(sizeof(DiskHeader) == 96);

void rewrite_header(const std::string& path, const std::function<void(DiskHeader&)>& change) {
  DiskHeader h;
  auto raw = test::read_raw(path, 0, sizeof h);
  std::memcpy(&h, raw.data(), sizeof h);
  change(h);
  h.header_crc = 0;
  h.header_crc = crc32c(&h, sizeof h);
  test::write_raw(path, 0, &h, sizeof h);
}

TEST_F(CbtMapTest, AnonymousMapStartsANewGenerationWithZeroStamps) {
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open("", geometry_, &why));
  EXPECT_FALSE(why.empty());
  EXPECT_FALSE(m.generation().is_nil());
  EXPECT_EQ(m.block_count(), 1025u);
  for (uint32_t b = 0; b < 1025; ++b) ASSERT_EQ(m.load(CbtBlockIndex(b)), 0u);
  EXPECT_EQ(m.exchange(CbtBlockIndex(1024), 7), 0u);
  EXPECT_EQ(m.exchange(CbtBlockIndex(1024), 9), 7u);
  EXPECT_EQ(m.load(CbtBlockIndex(1024)), 9u);
}

TEST_F(CbtMapTest, TwoNewMapsHaveDifferentGenerations) {
  CbtMap a, b;
  std::string why;
  ASSERT_OK(a.open("", geometry_, &why));
  ASSERT_OK(b.open("", geometry_, &why));
  EXPECT_NE(a.generation(), b.generation());
}

TEST_F(CbtMapTest, FileMapKeepsGenerationAndStampsAcrossACleanClose) {
  Uuid gen;
  {
    CbtMap m;
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    EXPECT_FALSE(why.empty()) << "a new file has no history";
    gen = m.generation();
    m.exchange(CbtBlockIndex(0), 3);
    m.exchange(CbtBlockIndex(1024), 5);
    ASSERT_OK(m.close());
  }
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  EXPECT_EQ(why, "");
  EXPECT_EQ(m.generation(), gen);
  EXPECT_EQ(m.load(CbtBlockIndex(0)), 3u);
  EXPECT_EQ(m.load(CbtBlockIndex(1)), 0u);
  EXPECT_EQ(m.load(CbtBlockIndex(1024)), 5u);
}

TEST_F(CbtMapTest, UncleanCloseOnTheSameBootIsTrusted) {
  Uuid gen;
  {
    CbtMap m;  // never closed: like a kill -9 of the process
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    gen = m.generation();
    m.exchange(CbtBlockIndex(10), 4);
  }
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  EXPECT_EQ(why, "");
  EXPECT_EQ(m.generation(), gen);
  EXPECT_EQ(m.load(CbtBlockIndex(10)), 4u) << "stamps live in the page cache (MAP_SHARED)";
}

TEST_F(CbtMapTest, UncleanCloseFromAnotherBootGetsANewGeneration) {
  Uuid gen;
  {
    CbtMap m;
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    gen = m.generation();
    m.exchange(CbtBlockIndex(10), 4);
  }
  rewrite_header(path_, [](DiskHeader& h) { std::strcpy(h.boot_id, "00000000-not-this-boot"); });
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  EXPECT_CONTAINS(why, "reboot");
  EXPECT_NE(m.generation(), gen);
  EXPECT_EQ(m.load(CbtBlockIndex(10)), 0u);
}

TEST_F(CbtMapTest, CleanCloseFromAnotherBootIsTrusted) {
  Uuid gen;
  {
    CbtMap m;
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    gen = m.generation();
    m.exchange(CbtBlockIndex(10), 4);
    ASSERT_OK(m.close());
  }
  rewrite_header(path_, [](DiskHeader& h) { std::strcpy(h.boot_id, "00000000-not-this-boot"); });
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  EXPECT_EQ(why, "");
  EXPECT_EQ(m.generation(), gen);
  EXPECT_EQ(m.load(CbtBlockIndex(10)), 4u);
}

TEST_F(CbtMapTest, DamagedHeaderGetsANewGeneration) {
  Uuid gen;
  {
    CbtMap m;
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    gen = m.generation();
    m.exchange(CbtBlockIndex(10), 4);
    ASSERT_OK(m.close());
  }
  auto b = test::read_raw(path_, 20, 1);
  b[0] ^= 1;  // inside the generation: the CRC no longer matches
  test::write_raw(path_, 20, b.data(), 1);
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  EXPECT_CONTAINS(why, "damaged");
  EXPECT_NE(m.generation(), gen);
  EXPECT_EQ(m.load(CbtBlockIndex(10)), 0u);
}

TEST_F(CbtMapTest, OtherGeometryGetsANewGeneration) {
  Uuid gen;
  {
    CbtMap m;
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    gen = m.generation();
    m.exchange(CbtBlockIndex(10), 4);
    ASSERT_OK(m.close());
  }
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, Geometry(8 * kMiB, 16, 12), &why));
  EXPECT_CONTAINS(why, "size");
  EXPECT_NE(m.generation(), gen);
  EXPECT_EQ(m.block_count(), 2048u);
  EXPECT_EQ(m.load(CbtBlockIndex(10)), 0u);
}

TEST_F(CbtMapTest, TruncatedMapGetsANewGeneration) {
  {
    CbtMap m;
    std::string why;
    ASSERT_OK(m.open(path_, geometry_, &why));
    ASSERT_OK(m.close());
  }
  std::filesystem::resize_file(path_, 4096 + 100);
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  EXPECT_CONTAINS(why, "truncated");
}

TEST_F(CbtMapTest, ResetStartsANewGenerationWithZeroStamps) {
  CbtMap m;
  std::string why;
  ASSERT_OK(m.open(path_, geometry_, &why));
  Uuid gen = m.generation();
  m.exchange(CbtBlockIndex(3), 8);
  m.reset();
  EXPECT_NE(m.generation(), gen);
  EXPECT_EQ(m.load(CbtBlockIndex(3)), 0u);
}

// ------------------------------------------------------------ engine CBT

// Volume of 4 MiB + 1000 bytes: 4 KiB CBT blocks, the last one 1000 bytes.
constexpr uint64_t kSize = 4 * kMiB + 1000;
constexpr uint64_t kBlocks = 1025;

Harness::Options cbt_options() {
  Harness::Options o;
  o.volumes = {{"vol", kSize}};
  return o;
}

// Merged byte ranges of a set of blocks.
std::vector<ByteRange> ranges_of(const std::set<uint64_t>& blocks) {
  std::vector<ByteRange> out;
  for (uint64_t b : blocks) {
    uint64_t off = b * 4096, len = std::min<uint64_t>(4096, kSize - off);
    if (!out.empty() && out.back().offset + out.back().length == off) out.back().length += len;
    else out.push_back(ByteRange{off, len});
  }
  return out;
}

std::set<uint64_t> blocks_of(uint64_t offset, uint64_t length) {
  std::set<uint64_t> out;
  for (uint64_t b = offset / 4096; b <= (offset + length - 1) / 4096; ++b) out.insert(b);
  return out;
}

std::string str(const std::vector<ByteRange>& r) {
  std::string s;
  for (const auto& x : r) s += "[" + std::to_string(x.offset) + "," + std::to_string(x.length) + "] ";
  return s;
}

class EngineCbt : public ::testing::Test {
 protected:
  // Writes [offset, offset+length) and records the blocks in `into`.
  void write(uint64_t offset, uint64_t length, std::set<uint64_t>* into) {
    test::must(h_.write(offset, pattern(length, offset + length)));
    auto b = blocks_of(offset, length);
    into->insert(b.begin(), b.end());
  }
  std::vector<ByteRange> changes(uint64_t since, const std::string& snapshot) {
    auto c = test::must(h_.engine().cbt_changes("vol", gen(), since, snapshot));
    uint64_t total = 0;
    for (const auto& r : c.ranges) total += r.length;
    EXPECT_EQ(c.changed_bytes, total);
    return c.ranges;
  }
  std::vector<uint32_t> map(const std::string& snapshot) {
    return test::must(h_.engine().cbt_map("vol", snapshot, 0, kBlocks));
  }
  std::string gen() { return test::must(h_.engine().cbt_info("vol")).generation.str(); }

  Harness h_{cbt_options()};
};

TEST_F(EngineCbt, InfoDescribesTheMap) {
  auto info = test::must(h_.engine().cbt_info("vol"));
  EXPECT_EQ(info.block_size, 4096u);
  EXPECT_EQ(info.block_count, kBlocks);
  EXPECT_EQ(info.capacity, kSize);
  EXPECT_EQ(info.sequence, 1u);
  EXPECT_FALSE(info.generation.is_nil());
  EXPECT_ERRNO(h_.engine().cbt_info("nope"), ENOENT);
}

TEST_F(EngineCbt, WritesStampTheCurrentSequenceIntoEveryBlockTheyTouch) {
  std::set<uint64_t> w;
  write(4095, 2, &w);          // blocks 0 and 1
  write(kSize - 10, 10, &w);   // the short last block
  auto m = map("");
  for (uint64_t b = 0; b < kBlocks; ++b) EXPECT_EQ(m[b], w.count(b) ? 1u : 0u) << "block " << b;
  h_.snapshot("a");
  std::set<uint64_t> w2;
  write(8192, 1, &w2);
  m = map("");
  EXPECT_EQ(m[2], 2u) << "after the take, writes get the next sequence";
  EXPECT_EQ(m[0], 1u);
}

TEST_F(EngineCbt, ChangesBetweenTakesAreExactlyTheBlocksWrittenBetweenThem) {
  std::set<uint64_t> w0, w1, w2, w3;
  write(0, 3 * 4096, &w0);
  uint64_t seq_a = h_.snapshot("a");
  write(5000, 10000, &w1);        // blocks 1..3, unaligned
  write(100000, 1, &w1);          // block 24
  write(kSize - 500, 500, &w1);   // last, short block
  uint64_t seq_b = h_.snapshot("b");
  write(9000, 100, &w2);          // block 2 again
  write(50 * 4096, 8192, &w2);    // blocks 50, 51
  uint64_t seq_c = h_.snapshot("c");
  write(5000, 10000, &w3);        // the same blocks as w1, after c
  write(700 * 4096, 1, &w3);
  EXPECT_LT(seq_a, seq_b);
  EXPECT_LT(seq_b, seq_c);

  auto expect = [](std::initializer_list<const std::set<uint64_t>*> sets) {
    std::set<uint64_t> all;
    for (auto* s : sets) all.insert(s->begin(), s->end());
    return ranges_of(all);
  };
  EXPECT_EQ(changes(seq_a, "b"), expect({&w1})) << str(changes(seq_a, "b"));
  EXPECT_EQ(changes(seq_b, "c"), expect({&w2})) << str(changes(seq_b, "c"));
  EXPECT_EQ(changes(seq_a, "c"), expect({&w1, &w2}));
  EXPECT_EQ(changes(0, "a"), expect({&w0}));
  EXPECT_EQ(changes(seq_a, ""), expect({&w1, &w2, &w3})) << "live view";
  EXPECT_EQ(changes(seq_c, ""), expect({&w3}));
  EXPECT_TRUE(changes(seq_b, "b").empty());
  // The last range ends at the end of the volume, not at a block boundary.
  auto last = changes(seq_a, "b").back();
  EXPECT_EQ(last.offset + last.length, kSize);
  auto c = test::must(h_.engine().cbt_changes("vol", gen(), seq_a, "b"));
  EXPECT_EQ(c.sequence, seq_b);
}

TEST_F(EngineCbt, FrozenMapOfASnapshotIgnoresLaterWrites) {
  std::set<uint64_t> w;
  write(0, 64 * kKiB, &w);
  auto before_a = map("");
  h_.snapshot("a");
  write(4096, 100, &w);
  write(300 * 4096, 8192, &w);
  auto before_b = map("");
  h_.snapshot("b");
  write(4096, 100, &w);
  write(600 * 4096, 1, &w);
  EXPECT_EQ(map("a"), before_a);
  EXPECT_EQ(map("b"), before_b);
  // Destroying the newer snapshot keeps the older one's frozen view.
  ASSERT_OK(h_.engine().destroy("b"));
  write(300 * 4096, 1, &w);
  write(900 * 4096, 1, &w);
  EXPECT_EQ(map("a"), before_a);
  // And destroying the older one keeps the newer one's.
  h_.snapshot("c");
  auto before_d = map("");
  h_.snapshot("d");
  write(900 * 4096, 1, &w);
  ASSERT_OK(h_.engine().destroy("c"));
  write(901 * 4096, 1, &w);
  EXPECT_EQ(map("d"), before_d);
  EXPECT_EQ(map("a"), before_a);
}

TEST_F(EngineCbt, MapIsPagedAndClippedAtTheEnd) {
  std::set<uint64_t> w;
  write(1020 * 4096, 5 * 4096 - 3096, &w);
  auto page = test::must(h_.engine().cbt_map("vol", "", 1020, 100));
  ASSERT_EQ(page.size(), 5u);
  for (uint32_t s : page) EXPECT_EQ(s, 1u);
  EXPECT_TRUE(test::must(h_.engine().cbt_map("vol", "", kBlocks, 10)).empty());
  EXPECT_ERRNO(h_.engine().cbt_map("vol", "", kBlocks + 1, 1), EINVAL);
}

TEST_F(EngineCbt, MarkDirtyStampsTheRangesWithoutChangingFrozenViews) {
  uint64_t seq_a = h_.snapshot("a");
  auto frozen = map("a");
  ASSERT_OK(h_.engine().mark_dirty("vol", {ByteRange{4096 * 7 + 1, 10}, ByteRange{kSize - 1, 1}}));
  EXPECT_EQ(changes(seq_a, ""), ranges_of(std::set<uint64_t>{7, 1024}));
  EXPECT_EQ(map("")[7], seq_a + 1);
  EXPECT_EQ(map("a"), frozen);
  EXPECT_EQ(h_.read(0, 4096 * 8), std::vector<char>(4096 * 8, 0)) << "mark-dirty does not write data";
  EXPECT_ERRNO(h_.engine().mark_dirty("vol", {ByteRange{kSize - 1, 2}}), EINVAL);
  EXPECT_ERRNO(h_.engine().mark_dirty("nope", {ByteRange{0, 1}}), ENOENT);
}

TEST_F(EngineCbt, WrongGenerationIsESTALE) {
  h_.snapshot("a");
  Status st = h_.engine().cbt_changes("vol", Uuid::random().str(), 0, "").status();
  EXPECT_EQ(st.code(), ESTALE);
  EXPECT_CONTAINS(st.message(), gen());
  EXPECT_ERRNO(h_.engine().cbt_changes("vol", "not-a-uuid", 0, ""), EINVAL);
  EXPECT_ERRNO(h_.engine().cbt_changes("vol", gen(), 0, "nope"), ENOENT);
  EXPECT_ERRNO(h_.engine().cbt_changes("nope", gen(), 0, ""), ENOENT);
}

TEST_F(EngineCbt, MapOfAnUnknownOrUntakenSnapshotFails) {
  EXPECT_ERRNO(h_.engine().cbt_map("vol", "nope", 0, 10), ENOENT);
  ASSERT_OK(h_.engine().create_snapshot({"vol"}, "created", 0));
  EXPECT_ERRNO(h_.engine().cbt_map("vol", "created", 0, 10), EINVAL);
}

}  // namespace
}  // namespace nbdsnap
