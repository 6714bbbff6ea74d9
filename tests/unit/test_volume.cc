// Volume: copy-before-write and the snapshot chain (DESIGN 4.1, 4.4), through
// an in-memory Engine with one 4 MiB + 4 KiB volume (64 KiB chunks, the last
// one 4 KiB).
#include "volume.h"

#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

using test::Harness;
using test::kChunk;
using test::kKiB;
using test::kMiB;
using test::kVolumeSize;
using test::pattern;

std::vector<char> zeros(uint64_t n) { return std::vector<char>(n, 0); }

void put(std::vector<char>& model, uint64_t offset, const std::vector<char>& data) {
  std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(offset));
}

// Fills the whole volume with a pattern and returns it.
std::vector<char> fill(Harness& h, uint64_t seed) {
  auto data = pattern(kVolumeSize, seed);
  test::must(h.write(0, data));
  return data;
}

TEST(Volume, SnapshotReadsOldDataAfterTheOriginIsOverwritten) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  auto after = pattern(kVolumeSize, 2);
  ASSERT_OK(h.write(0, after));
  EXPECT_EQ(h.read(0, kVolumeSize), after);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 65u);
}

TEST(Volume, SnapshotOfAnUntouchedVolumeReadsTheOrigin) {
  Harness h;
  auto data = fill(h, 3);
  h.snapshot("s1");
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), data);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 0u);
}

TEST(Volume, UnalignedWriteStraddlingChunksPreservesEveryChunkItTouches) {
  Harness h;
  auto before = fill(h, 4);
  h.snapshot("s1");
  // From 1000 bytes before the end of chunk 2 to 333 bytes into chunk 4.
  uint64_t off = 3 * kChunk - 1000, len = 1000 + kChunk + 333;
  auto data = pattern(len, 5);
  ASSERT_OK(h.write(off, data));
  auto expect = before;
  put(expect, off, data);
  EXPECT_EQ(h.read(0, kVolumeSize), expect);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  // Unaligned snapshot reads across the same boundaries.
  EXPECT_EQ(h.snap_read("s1", off - 7, len + 19),
            std::vector<char>(before.begin() + off - 7, before.begin() + off + len + 12));
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 3u);
}

TEST(Volume, LastShortChunkIsPreserved) {
  Harness h;
  auto before = fill(h, 6);
  h.snapshot("s1");
  auto data = pattern(100, 7);
  ASSERT_OK(h.write(kVolumeSize - 100, data));
  EXPECT_EQ(h.read(kVolumeSize - 100, 100), data);
  EXPECT_EQ(h.snap_read("s1", kVolumeSize - 4 * kKiB, 4 * kKiB),
            std::vector<char>(before.end() - 4 * kKiB, before.end()));
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.chunks_copied, 1u);
  EXPECT_EQ(info.storage.used, 4 * kKiB) << "the short chunk takes only its own length";
}

TEST(Volume, EachChunkIsCopiedOnceForASnapshot) {
  Harness h;
  auto before = fill(h, 8);
  h.snapshot("s1");
  for (int i = 0; i < 5; ++i) ASSERT_OK(h.write(10 * kChunk + i * 1000, pattern(500, 100 + i)));
  ASSERT_OK(h.write(10 * kChunk, pattern(kChunk, 200)));
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.chunks_copied, 1u);
  EXPECT_EQ(info.storage.used, kChunk);
  EXPECT_EQ(h.snap_read("s1", 10 * kChunk, kChunk),
            std::vector<char>(before.begin() + 10 * kChunk, before.begin() + 11 * kChunk));
}

TEST(Volume, TrimAndZeroAlsoPreserveTheOldData) {
  Harness h;
  auto before = fill(h, 9);
  h.snapshot("s1");
  uint64_t trim_off = 5 * kChunk + 4096, trim_len = kChunk;           // chunks 5 and 6
  uint64_t zero_off = 20 * kChunk - 3, zero_len = 2 * kChunk + 10;    // chunks 19..22, unaligned
  uint64_t zero2_off = 40 * kChunk, zero2_len = kChunk;               // may_trim
  ASSERT_OK(h.vol()->trim(trim_len, trim_off, false));
  ASSERT_OK(h.vol()->zero(zero_len, zero_off, false, false));
  ASSERT_OK(h.vol()->zero(zero2_len, zero2_off, true, true));
  EXPECT_EQ(h.read(zero_off, zero_len), zeros(zero_len));
  EXPECT_EQ(h.read(zero2_off, zero2_len), zeros(zero2_len));
  auto trimmed = h.read(trim_off, trim_len);
  EXPECT_TRUE(trimmed == zeros(trim_len) ||
              trimmed == std::vector<char>(before.begin() + trim_off, before.begin() + trim_off + trim_len))
      << "trim leaves zeros (or, without hole punching, the old data)";
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 2u + 4u + 1u);
}

TEST(Volume, RequestsBeyondTheEndFailWithEINVAL) {
  Harness h;
  h.snapshot("s1");
  auto data = pattern(10, 1);
  EXPECT_ERRNO(h.vol()->write(data.data(), 10, kVolumeSize - 5, false), EINVAL);
  EXPECT_ERRNO(h.vol()->trim(10, kVolumeSize, false), EINVAL);
  EXPECT_ERRNO(h.vol()->zero(1, kVolumeSize, false, false), EINVAL);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", kVolumeSize - 5, 10, &out), EINVAL);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 0u) << "a rejected write copies nothing";
}

TEST(Volume, AllZeroChunkUsesNoStorageAndReadsBackZero) {
  Harness h;  // the volume file starts sparse: all zero
  auto data = pattern(kChunk, 1);
  ASSERT_OK(h.write(0, data));  // chunk 0 has data
  h.snapshot("s1");
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  ASSERT_OK(h.write(kChunk, pattern(kChunk, 3)));  // chunk 1 was zero
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.chunks_copied, 2u);
  EXPECT_EQ(info.storage.used, kChunk) << "only the chunk with data takes a slot";
  EXPECT_EQ(h.snap_read("s1", 0, kChunk), data);
  EXPECT_EQ(h.snap_read("s1", kChunk, kChunk), zeros(kChunk));
}

TEST(Volume, SnapshotExtentsReportHolesTruthfully) {
  Harness h;
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));        // chunk 0: data
  ASSERT_OK(h.write(kChunk, zeros(kChunk)));        // chunk 1: written, but all zero
  ASSERT_OK(h.write(2 * kChunk, pattern(kChunk, 2)));  // chunk 2: data, stays on the origin
  // chunk 3.. : never written (sparse)
  h.snapshot("s1");
  ASSERT_OK(h.write(0, pattern(kChunk, 3)));
  ASSERT_OK(h.write(kChunk, pattern(kChunk, 4)));
  ASSERT_OK(h.write(3 * kChunk, pattern(kChunk, 5)));  // chunk 3 was a hole
  auto ref = test::must(h.engine().open_export("vol@s1"));
  std::vector<Extent> ext;
  ASSERT_OK(h.vol()->snapshot_extents(*ref.part, 5 * kChunk, 0, &ext));
  // Every byte is covered once, in order; holes read as zeros, data is data.
  uint64_t pos = 0;
  for (const Extent& e : ext) {
    EXPECT_EQ(e.offset, pos);
    pos += e.length;
    auto bytes = h.snap_read("s1", e.offset, e.length);
    if (e.hole) {
      EXPECT_EQ(bytes, zeros(e.length)) << "hole at " << e.offset << " does not read as zeros";
    }
  }
  EXPECT_EQ(pos, 5 * kChunk);
  auto kind_at = [&](uint64_t off) {
    for (const Extent& e : ext)
      if (off >= e.offset && off < e.offset + e.length) return e.hole;
    ADD_FAILURE() << "no extent at " << off;
    return false;
  };
  EXPECT_FALSE(kind_at(0));
  EXPECT_TRUE(kind_at(kChunk)) << "a copied all-zero chunk is a hole";
  EXPECT_FALSE(kind_at(2 * kChunk));
  EXPECT_TRUE(kind_at(3 * kChunk)) << "a copied hole stays a hole";
  EXPECT_TRUE(kind_at(4 * kChunk)) << "an untouched hole of the origin is a hole";
  EXPECT_EQ(h.snap_read("s1", 0, kChunk), pattern(kChunk, 1));
  EXPECT_EQ(h.snap_read("s1", 2 * kChunk, kChunk), pattern(kChunk, 2));
}

TEST(Volume, ReadOfADestroyedSnapshotFailsWithEIO) {
  Harness h;
  fill(h, 1);
  h.snapshot("s1");
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  auto ref = test::must(h.engine().open_export("vol@s1"));
  ASSERT_OK(h.engine().destroy("s1"));
  std::vector<char> buf(kChunk);
  EXPECT_ERRNO(ref.volume->read_snapshot(*ref.part, buf.data(), buf.size(), 0), EIO);
  EXPECT_ERRNO(h.engine().open_export("vol@s1"), ENOENT);
}

// ----------------------------------------------------------- many snapshots

// Five snapshots; before each take, generation g writes its own data to a
// different set of chunks (overlapping other generations'), with unaligned
// edges. Keeps a model copy of the volume at each take.
struct Five {
  Harness h;
  std::vector<char> model;
  std::map<std::string, std::vector<char>> at_take;

  void write_generation(int g) {
    for (uint64_t c = 0; c < 65; ++c) {
      if ((c + static_cast<uint64_t>(g)) % 3 != 0) continue;
      uint64_t off = c * kChunk + (c % 5) * 777;
      uint64_t len = std::min<uint64_t>(kChunk + 1234, kVolumeSize - off);
      auto data = pattern(len, static_cast<uint64_t>(g) * 1000 + c);
      test::must(h.write(off, data));
      put(model, off, data);
    }
  }
  Five() : model(kVolumeSize, 0) {
    for (int g = 0; g < 5; ++g) {
      write_generation(g);
      std::string name = "s" + std::to_string(g);
      h.snapshot(name);
      at_take[name] = model;
    }
    write_generation(5);
  }
  void check(const std::string& when) {
    SCOPED_TRACE(when);
    EXPECT_EQ(h.read(0, kVolumeSize), model);
    for (const auto& [name, data] : at_take) {
      auto got = h.snap_read(name, 0, kVolumeSize);
      EXPECT_TRUE(got == data) << "snapshot " << name << " does not read its data";
    }
  }
  void destroy(const std::string& name) {
    test::must(h.engine().destroy(name));
    at_take.erase(name);
  }
};

TEST(Volume, FiveSnapshotsEachReadExactlyTheirData) {
  Five f;
  f.check("all five");
  EXPECT_EQ(f.h.engine().collect().size(), 5u);
}

TEST(Volume, DestroyOldestThenMiddleThenNewestKeepsTheOthersIntact) {
  Five f;
  f.destroy("s0");
  f.check("oldest destroyed");
  f.destroy("s2");
  f.check("middle destroyed");
  f.destroy("s4");
  f.check("newest destroyed");
  // Writes after the destroys copy for the right snapshot.
  f.write_generation(6);
  f.write_generation(7);
  f.check("written after destroys");
}

TEST(Volume, DestroyNewestThenMiddleThenOldestKeepsTheOthersIntact) {
  Five f;
  f.destroy("s4");
  f.write_generation(6);
  f.check("newest destroyed");
  f.destroy("s2");
  f.write_generation(7);
  f.check("middle destroyed");
  f.destroy("s0");
  f.write_generation(8);
  f.check("oldest destroyed");
}

TEST(Volume, DestroyMiddleSnapshotsHandsTheirChunksToOlderOnes) {
  Five f;
  f.destroy("s3");
  f.destroy("s1");
  f.destroy("s2");
  f.check("middle ones destroyed");
  f.write_generation(6);
  f.check("after more writes");
  // A new snapshot after all that.
  f.h.snapshot("s9");
  f.at_take["s9"] = f.model;
  f.write_generation(7);
  f.check("new snapshot");
  f.destroy("s0");
  f.destroy("s9");
  f.check("only s4 left");
  EXPECT_EQ(f.h.engine().collect().size(), 1u);
}

TEST(Volume, EveryRemainingSnapshotSurvivesAnyOrderOfDestroy) {
  const std::vector<std::vector<int>> orders = {{2, 0, 4, 1}, {1, 3, 0, 4}, {4, 3, 2, 1}, {0, 1, 2, 3}};
  for (const auto& order : orders) {
    Five f;
    int step = 0;
    for (int victim : order) {
      f.destroy("s" + std::to_string(victim));
      f.write_generation(10 + step++);
      f.check("after destroying s" + std::to_string(victim));
    }
  }
}

TEST(Volume, NewestSnapshotCopiesOnlyWhatChangedSinceTheOlderOne) {
  Harness h;
  fill(h, 1);
  h.snapshot("a");
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));  // copied into a
  h.snapshot("b");
  ASSERT_OK(h.write(0, pattern(kChunk, 3)));      // copied into b only
  ASSERT_OK(h.write(kChunk, pattern(kChunk, 4)));  // copied into b only: O(1) write cost
  EXPECT_EQ(test::must(h.engine().info("a")).chunks_copied, 1u);
  EXPECT_EQ(test::must(h.engine().info("b")).chunks_copied, 2u);
  auto full = pattern(kVolumeSize, 1);
  EXPECT_EQ(h.snap_read("a", 0, kChunk), std::vector<char>(full.begin(), full.begin() + kChunk));
  EXPECT_EQ(h.snap_read("a", kChunk, kChunk), std::vector<char>(full.begin() + kChunk, full.begin() + 2 * kChunk))
      << "a reads chunk 1 through b's table";
  EXPECT_EQ(h.snap_read("b", 0, kChunk), pattern(kChunk, 2));
}

// ------------------------------------------------- asynchronous storing

// While stores are held, copies stay staged: the writes that made them are
// done, and the snapshot serves the old data once the copies are stored.
TEST(VolumeStoring, WritesReturnBeforeTheirCopiesAreStored) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  h.vol()->hold_stores_for_test(true);
  auto after = pattern(5 * kChunk, 2);
  EXPECT_OK(h.write(3 * kChunk, after));  // 5 copies staged, none stored
  EXPECT_EQ(h.read(3 * kChunk, 5 * kChunk), after);
  h.vol()->hold_stores_for_test(false);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 5u);
}

// Holds the volume's stores until release() or the end of its scope, which
// comes before the harness's: a test that fails while they are held must
// not hang in the engine's stop (it drains the stores).
class HeldStores {
 public:
  explicit HeldStores(Harness& h) : h_(h) { h_.vol()->hold_stores_for_test(true); }
  ~HeldStores() { release(); }
  HeldStores(const HeldStores&) = delete;
  HeldStores& operator=(const HeldStores&) = delete;
  void release() {
    if (held_) h_.vol()->hold_stores_for_test(false);
    held_ = false;
  }

 private:
  Harness& h_;
  bool held_ = true;
};

// Runs f while the stores are held and expects it to finish without them;
// if it does not within 20 s, lets the stores go (so it can finish) and fails.
template <typename F>
auto without_the_stores(HeldStores& held, const char* what, F f) {
  auto done = std::async(std::launch::async, f);
  bool ready = done.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  if (!ready) held.release();
  EXPECT_TRUE(ready) << what << " waited for the held stores";
  return done.get();
}

// A snapshot read of a chunk whose copy is staged reads the staging entry:
// it never reads the origin, which already holds the new data, and does not
// wait for the slot. Extents show the staged chunk as data even where the
// origin is a hole now. The entries all come back afterwards.
TEST(VolumeStoring, ReadOfAChunkBeingStoredIsServedFromItsStagedCopy) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  auto s1 = test::must(h.engine().open_export("vol@s1"));
  {
    HeldStores held(h);
    EXPECT_OK(h.write(7 * kChunk, pattern(kChunk, 2)));
    EXPECT_OK(h.vol()->trim(kChunk, 2 * kChunk, false));  // the origin's chunk 2 becomes a hole
    auto chunk = [&](uint64_t i) { return std::vector<char>(before.begin() + i * kChunk, before.begin() + (i + 1) * kChunk); };
    // A piece inside the chunk (an offset into the entry) and whole chunks.
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s1", 7 * kChunk + 4 * kKiB, 8 * kKiB); }),
              std::vector<char>(before.begin() + 7 * kChunk + 4 * kKiB, before.begin() + 7 * kChunk + 12 * kKiB));
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s1", 6 * kChunk, kChunk); }), chunk(6));
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s1", 7 * kChunk, kChunk); }), chunk(7));
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s1", 2 * kChunk, kChunk); }), chunk(2));
    std::vector<Extent> ext;
    ASSERT_OK(without_the_stores(held, "extents", [&] { return h.vol()->snapshot_extents(*s1.part, kChunk, 2 * kChunk, &ext); }));
    ASSERT_EQ(ext.size(), 1u);
    EXPECT_FALSE(ext[0].hole) << "a staged copy is data, whatever the origin is now";
  }
  h.vol()->drain_stores();
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  // Every staging entry is free again: a snapshot whose first writes need
  // them all gets them with the stores held.
  h.snapshot("s2");
  const uint64_t n = test::small_params().chunk_maximum_in_queue;
  HeldStores held(h);
  ASSERT_OK(without_the_stores(held, "a write needing every staging entry",
                               [&] { return h.write(8 * kChunk, pattern(n * kChunk, 3)); }));
}

// A write to a chunk whose copy for the previous snapshot is still being
// stored copies it again for the new one without waiting for that store
// (it used to wait on the chunk lock inside the gate, where a take waits for
// it); both snapshots read their own data, staged and then stored.
TEST(VolumeStoring, WriteForANewerSnapshotDoesNotWaitForTheOlderCopysStore) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  auto mid = pattern(kChunk, 2), late = pattern(kChunk, 3);
  auto s1_chunk = std::vector<char>(before.begin() + 4 * kChunk, before.begin() + 5 * kChunk);
  {
    HeldStores held(h);
    EXPECT_OK(h.write(4 * kChunk, mid));  // copy for s1 staged, not stored
    without_the_stores(held, "take s2", [&] { return h.snapshot("s2"); });
    ASSERT_OK(without_the_stores(held, "the write for s2", [&] { return h.write(4 * kChunk, late); }));
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s1", 4 * kChunk, kChunk); }), s1_chunk);
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s2", 4 * kChunk, kChunk); }), mid);
    EXPECT_EQ(h.read(4 * kChunk, kChunk), late);
  }
  h.vol()->drain_stores();
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  auto at_s2 = before;
  put(at_s2, 4 * kChunk, mid);
  EXPECT_EQ(h.snap_read("s2", 0, kVolumeSize), at_s2);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 1u);
  EXPECT_EQ(test::must(h.engine().info("s2")).chunks_copied, 1u);
}

// s1's copy of a chunk is staged when s2 stores its own, later copy of it
// (a zero chunk goes into s2's table at once): s1 still reads its staged
// copy, not s2's through the chain.
TEST(VolumeStoring, StagedCopyIsNotShadowedByANewerSnapshotsStoredCopy) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  auto s1_chunk = std::vector<char>(before.begin() + 3 * kChunk, before.begin() + 4 * kChunk);
  {
    HeldStores held(h);
    EXPECT_OK(h.write(3 * kChunk, zeros(kChunk)));  // copy for s1 staged
    without_the_stores(held, "take s2", [&] { return h.snapshot("s2"); });
    // s2's copy: zeros, in its table at once.
    ASSERT_OK(without_the_stores(held, "the write for s2", [&] { return h.write(3 * kChunk, pattern(kChunk, 3)); }));
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s1", 3 * kChunk, kChunk); }), s1_chunk);
    EXPECT_EQ(without_the_stores(held, "a read", [&] { return h.snap_read("s2", 3 * kChunk, kChunk); }), zeros(kChunk));
  }
  h.vol()->drain_stores();
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(h.snap_read("s2", 3 * kChunk, kChunk), zeros(kChunk));
}

// s2's staged copy of a chunk fails to store: it goes to s1, which read the
// chunk through s2, from the same staged bytes (the walk for an older part
// that needs it stops at the failed part, whose own staged copy it is);
// s3, taken meanwhile, holds its own copy.
TEST(VolumeStoring, FailedStoreOfAStagedCopyFallsBackToTheOlderSnapshot) {
  int made = 0;
  Harness::Options o;
  o.storage_factory = [&made]() -> std::unique_ptr<DiffStorage> {
    if (made++ == 1) return make_faulty_storage(make_memory_storage(), FaultPlan{0, EIO, false, false});  // s2
    return make_memory_storage();
  };
  Harness h(o);
  auto before = fill(h, 1);
  h.snapshot("s1");
  h.snapshot("s2");  // s1 reads the chunk through s2
  {
    HeldStores held(h);
    EXPECT_OK(h.write(3 * kChunk, zeros(kChunk)));  // copy for s2 staged
    without_the_stores(held, "take s3", [&] { return h.snapshot("s3"); });
    ASSERT_OK(without_the_stores(held, "the write for s3", [&] { return h.write(3 * kChunk, pattern(kChunk, 3)); }));
  }  // s2's store fails now
  h.vol()->drain_stores();
  EXPECT_EQ(test::must(h.engine().info("s2")).state, SnapshotState::kCorrupted);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 1u) << "the copy fell back to s1";
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(h.snap_read("s3", 3 * kChunk, kChunk), zeros(kChunk));
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s2", 0, kChunk, &out), EIO);
}

// A second write to a chunk whose copy is staged needs no copy: it does not
// wait for the slot write (inside the gate, where a take would wait for it).
TEST(VolumeStoring, SecondWriteToAStagedChunkDoesNotWaitForTheStore) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  h.vol()->hold_stores_for_test(true);
  EXPECT_OK(h.write(5 * kChunk, pattern(4 * kKiB, 2)));
  auto second = std::async(std::launch::async, [&] { return h.write(5 * kChunk + 8 * kKiB, pattern(kChunk - 8 * kKiB, 3)); });
  bool done = second.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  h.vol()->hold_stores_for_test(false);
  ASSERT_TRUE(done) << "the second write waited for the held store";
  ASSERT_OK(second.get());
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 1u);
  EXPECT_EQ(h.read(5 * kChunk + 8 * kKiB, kChunk - 8 * kKiB), pattern(kChunk - 8 * kKiB, 3));
}

// With the staging area full, a write that needs a copy waits outside the
// write gate: a take goes through while the disk (here: held stores) is
// stuck, and that write then lands after the take.
TEST(VolumeStoring, TakeDoesNotWaitForAFullStagingArea) {
  Harness h;
  auto before = fill(h, 1);
  h.snapshot("s1");
  const uint64_t n = test::small_params().chunk_maximum_in_queue;
  ASSERT_LT(n + 1, 65u);
  h.vol()->hold_stores_for_test(true);
  auto mid = pattern(n * kChunk, 2);
  EXPECT_OK(h.write(0, mid));  // fills every staging entry
  auto late = pattern(kChunk, 3);
  auto writer = std::async(std::launch::async, [&] { return h.write(n * kChunk, late); });
  EXPECT_EQ(writer.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout)
      << "the write needing a copy should wait for a staging entry";
  EXPECT_OK(h.engine().create_snapshot({"vol"}, "s2", 0));
  EXPECT_OK(h.engine().append_storage("s2", {StorageRange{"", 0, 8 * kMiB}}));
  auto take = std::async(std::launch::async, [&] { return h.engine().take("s2"); });
  bool took = take.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  h.vol()->hold_stores_for_test(false);  // lets everything finish either way
  ASSERT_TRUE(took) << "take waited for the held stores";
  ASSERT_OK(take.get());
  ASSERT_OK(writer.get());
  auto at_s2 = before;
  put(at_s2, 0, mid);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(h.snap_read("s2", 0, kVolumeSize), at_s2) << "the waiting write landed after the take";
  EXPECT_EQ(h.read(n * kChunk, kChunk), late);
}

// A staging area of two entries, so that a request needs more copies than it holds.
Harness::Options two_staging_entries() {
  Harness::Options o;
  test::must(o.params.set("chunk_maximum_in_queue", "2"));
  return o;
}

// A request that needs more copies than there are staging entries waits for
// more inside the gate; a writer that got entries while a take closes the
// gate must give them back, or the take waits for the first writer, which
// waits for those entries, forever.
TEST(VolumeStoring, TakeWhileARequestNeedsMoreCopiesThanEntries) {
  Harness h(two_staging_entries());
  auto before = fill(h, 1);
  h.snapshot("s1");
  h.vol()->hold_stores_for_test(true);
  auto big = pattern(10 * kChunk, 2);
  auto small = pattern(2 * kChunk, 3);
  auto a = std::async(std::launch::async, [&] { return h.write(0, big); });  // 10 copies, 2 entries
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto b = std::async(std::launch::async, [&] { return h.write(20 * kChunk, small); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_OK(h.engine().create_snapshot({"vol"}, "s2", 0));
  EXPECT_OK(h.engine().append_storage("s2", {StorageRange{"", 0, 8 * kMiB}}));
  auto take = std::async(std::launch::async, [&] { return h.engine().take("s2"); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  h.vol()->hold_stores_for_test(false);
  bool took = take.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  ASSERT_TRUE(took) << "take and writers deadlocked";
  ASSERT_OK(take.get());
  ASSERT_OK(a.get());
  ASSERT_OK(b.get());
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  auto at_s2 = h.snap_read("s2", 0, kVolumeSize);
  EXPECT_EQ(std::vector<char>(at_s2.begin(), at_s2.begin() + 10 * kChunk), big)
      << "the write inside the gate landed before the take";
  auto now = before;
  put(now, 0, big);
  put(now, 20 * kChunk, small);
  EXPECT_EQ(h.read(0, kVolumeSize), now);
}

// Destroy returns only once no staged copy is left to land in the
// snapshot's storage (its ranges may be given to something else then).
TEST(VolumeStoring, DestroyWaitsForStagedCopies) {
  Harness h;
  fill(h, 1);
  h.snapshot("s1");
  h.vol()->hold_stores_for_test(true);
  EXPECT_OK(h.write(0, pattern(3 * kChunk, 2)));
  auto destroy = std::async(std::launch::async, [&] { return h.engine().destroy("s1"); });
  EXPECT_EQ(destroy.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout)
      << "destroy returned with copies still staged for the snapshot";
  h.vol()->hold_stores_for_test(false);
  ASSERT_OK(destroy.get());
}

// A request over more chunks than the staging area holds copies them all.
TEST(VolumeStoring, RequestOverMoreChunksThanStagingEntriesCopiesEveryOne) {
  Harness h(two_staging_entries());
  auto before = fill(h, 1);
  h.snapshot("s1");
  ASSERT_OK(h.write(kKiB, pattern(kVolumeSize - 2 * kKiB, 2)));
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), before);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 65u);
}

}  // namespace
}  // namespace nbdsnap
