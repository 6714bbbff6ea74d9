// DiffStorage: memory, file and faulty implementations; slot allocation over
// appended ranges.
#include "diff_storage.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

using test::kKiB;
using test::kMiB;
using test::pattern;

std::vector<char> read_slot(DiffStorage& s, SlotAddress slot, uint64_t offset, uint64_t length) {
  std::vector<char> out(length);
  test::must(s.read(slot, offset, out.data(), length), "read slot");
  return out;
}

// ------------------------------------------------------------------ memory

TEST(MemoryDiffStorage, AppendRejectsEmptyOrUnalignedLength) {
  auto s = make_memory_storage();
  EXPECT_ERRNO(s->append(StorageRange{"", 0, 0}), EINVAL);
  EXPECT_ERRNO(s->append(StorageRange{"", 0, 5000}), EINVAL);
  EXPECT_EQ(s->usage().capacity, 0u);
  EXPECT_TRUE(s->ranges().empty());
}

TEST(MemoryDiffStorage, EmptyStorageIsFull) {
  auto s = make_memory_storage();
  EXPECT_ERRNO(s->allocate(4096), ENOSPC);
}

TEST(MemoryDiffStorage, SlotsAreAllocatedSequentiallyAndReadBack) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 256 * kKiB}));
  std::vector<SlotAddress> slots;
  for (int i = 0; i < 4; ++i) slots.push_back(test::must(s->allocate(64 * kKiB)));
  EXPECT_EQ(slots, (std::vector<SlotAddress>{0, 16, 32, 48}));  // 4 KiB units
  for (int i = 0; i < 4; ++i) {
    auto data = pattern(64 * kKiB, i);
    ASSERT_OK(s->write(slots[i], data.data(), data.size()));
  }
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(read_slot(*s, slots[i], 0, 64 * kKiB), pattern(64 * kKiB, i));
    // A piece inside the slot, at an unaligned offset.
    auto whole = pattern(64 * kKiB, i);
    EXPECT_EQ(read_slot(*s, slots[i], 1000, 3000), std::vector<char>(whole.begin() + 1000, whole.begin() + 4000));
  }
  EXPECT_EQ(s->usage().capacity, 256 * kKiB);
  EXPECT_EQ(s->usage().used, 256 * kKiB);
  EXPECT_ERRNO(s->allocate(64 * kKiB), ENOSPC);
}

TEST(MemoryDiffStorage, ShortSlotTakesWholeUnitsAndCountsItsBytes) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 64 * kKiB}));
  EXPECT_EQ(test::must(s->allocate(5000)), 0u);  // 2 units
  EXPECT_EQ(test::must(s->allocate(4096)), 2u);
  EXPECT_EQ(s->usage().used, 5000u + 4096u);
}

TEST(MemoryDiffStorage, SlotNeverStraddlesRanges) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 12 * kKiB}));  // units 0..2
  ASSERT_OK(s->append(StorageRange{"", 0, 16 * kKiB}));  // units 3..6
  EXPECT_EQ(test::must(s->allocate(8 * kKiB)), 0u);
  // Units 2..3 would cross into the second range: it skips to unit 3.
  EXPECT_EQ(test::must(s->allocate(8 * kKiB)), 3u);
  EXPECT_EQ(test::must(s->allocate(8 * kKiB)), 5u);
  EXPECT_ERRNO(s->allocate(4 * kKiB), ENOSPC);
  // The skipped tail of the first range counts as used.
  EXPECT_EQ(s->usage().used, 28 * kKiB);
  EXPECT_EQ(s->usage().capacity, 28 * kKiB);
  auto data = pattern(8 * kKiB, 9);
  ASSERT_OK(s->write(3, data.data(), data.size()));
  EXPECT_EQ(read_slot(*s, 3, 0, 8 * kKiB), data);
}

TEST(MemoryDiffStorage, TooBigSlotForEveryRangeIsENOSPC) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 8 * kKiB}));
  ASSERT_OK(s->append(StorageRange{"", 0, 8 * kKiB}));
  EXPECT_ERRNO(s->allocate(12 * kKiB), ENOSPC);
  EXPECT_EQ(test::must(s->allocate(8 * kKiB)), 0u) << "a failed allocation must not move the cursor";
}

TEST(MemoryDiffStorage, AccessOutsideTheStorageIsEINVAL) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 8 * kKiB}));
  char buf[4096] = {};
  EXPECT_ERRNO(s->write(2, buf, sizeof buf), EINVAL);
  EXPECT_ERRNO(s->read(1, 1, buf, sizeof buf), EINVAL);  // runs past the end
  EXPECT_ERRNO(s->read(100, 0, buf, 1), EINVAL);
}

TEST(MemoryDiffStorage, AppendWhileFullMakesRoomAgain) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 64 * kKiB}));
  EXPECT_EQ(test::must(s->allocate(64 * kKiB)), 0u);
  EXPECT_ERRNO(s->allocate(64 * kKiB), ENOSPC);
  ASSERT_OK(s->append(StorageRange{"", 0, 64 * kKiB}));
  EXPECT_EQ(test::must(s->allocate(64 * kKiB)), 16u);
  EXPECT_EQ(s->ranges().size(), 2u);
}

TEST(MemoryDiffStorage, RestoreAllocationContinuesAfterTheRestoredEnd) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 64 * kKiB}));
  s->restore_allocation(5, 20 * kKiB);
  EXPECT_EQ(test::must(s->allocate(4 * kKiB)), 5u);
  EXPECT_EQ(s->usage().used, 24 * kKiB);
}

TEST(MemoryDiffStorage, ConcurrentAllocationsGetDistinctSlots) {
  auto s = make_memory_storage();
  ASSERT_OK(s->append(StorageRange{"", 0, 4 * kMiB}));
  std::vector<std::vector<SlotAddress>> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 16; ++i) {
        auto a = s->allocate(64 * kKiB);
        if (!a) return;
        got[t].push_back(*a);
        auto data = pattern(64 * kKiB, *a);
        s->write(*a, data.data(), data.size());
      }
    });
  for (auto& th : threads) th.join();
  std::vector<SlotAddress> all;
  for (auto& v : got) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  ASSERT_EQ(all.size(), 64u);
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i], i * 16);
    EXPECT_EQ(read_slot(*s, all[i], 0, 64 * kKiB), pattern(64 * kKiB, all[i]));
  }
}

// -------------------------------------------------------------------- file

class FileDiffStorageTest : public ::testing::Test {
 protected:
  void SetUp() override { path_ = test::make_file(dir_.file("storage"), 1 * kMiB); }
  test::TempDir dir_;
  std::string path_;
};

TEST_F(FileDiffStorageTest, SlotsLandAtTheirRangeOffsetsAndReadBack) {
  auto s = make_file_storage();
  ASSERT_OK(s->append(StorageRange{path_, 0, 40 * kKiB}));          // units 0..9
  ASSERT_OK(s->append(StorageRange{path_, 512 * kKiB, 64 * kKiB}));  // units 10..25
  SlotAddress a = test::must(s->allocate(32 * kKiB));
  SlotAddress b = test::must(s->allocate(32 * kKiB));  // would straddle: skips to unit 10
  SlotAddress c = test::must(s->allocate(32 * kKiB));
  EXPECT_EQ(a, 0u);
  EXPECT_EQ(b, 10u);
  EXPECT_EQ(c, 18u);
  EXPECT_ERRNO(s->allocate(32 * kKiB), ENOSPC);
  for (SlotAddress slot : {a, b, c}) {
    auto data = pattern(32 * kKiB, slot + 100);
    ASSERT_OK(s->write(slot, data.data(), data.size()));
  }
  ASSERT_OK(s->flush());
  for (SlotAddress slot : {a, b, c}) EXPECT_EQ(read_slot(*s, slot, 0, 32 * kKiB), pattern(32 * kKiB, slot + 100));
  // Where the bytes are in the file: slot b starts the second range.
  EXPECT_EQ(test::read_raw(path_, 0, 32 * kKiB), pattern(32 * kKiB, a + 100));
  EXPECT_EQ(test::read_raw(path_, 512 * kKiB, 32 * kKiB), pattern(32 * kKiB, b + 100));
  EXPECT_EQ(test::read_raw(path_, 544 * kKiB, 32 * kKiB), pattern(32 * kKiB, c + 100));
  // Nothing was written into the gap between the ranges.
  EXPECT_EQ(test::read_raw(path_, 40 * kKiB, 4 * kKiB), std::vector<char>(4 * kKiB, 0));
  auto ranges = s->ranges();
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[1].path, path_);
  EXPECT_EQ(ranges[1].offset, 512 * kKiB);
  EXPECT_EQ(ranges[1].length, 64 * kKiB);
}

TEST_F(FileDiffStorageTest, FullStorageIsENOSPC) {
  auto s = make_file_storage();
  ASSERT_OK(s->append(StorageRange{path_, 0, 64 * kKiB}));
  EXPECT_OK(s->allocate(64 * kKiB));
  EXPECT_ERRNO(s->allocate(4 * kKiB), ENOSPC);
}

TEST_F(FileDiffStorageTest, UnalignedRangeIsEINVAL) {
  auto s = make_file_storage();
  EXPECT_ERRNO(s->append(StorageRange{path_, 100, 64 * kKiB}), EINVAL);
  EXPECT_ERRNO(s->append(StorageRange{path_, 0, 5000}), EINVAL);
  EXPECT_ERRNO(s->append(StorageRange{path_, 0, 0}), EINVAL);
  EXPECT_EQ(s->usage().capacity, 0u);
}

TEST_F(FileDiffStorageTest, RangeBeyondTheEndOfTheFileIsEINVALNamingThePath) {
  auto s = make_file_storage();
  Status st = s->append(StorageRange{path_, 1 * kMiB - 4 * kKiB, 8 * kKiB});
  EXPECT_EQ(st.code(), EINVAL);
  EXPECT_CONTAINS(st.message(), path_);
  EXPECT_ERRNO(s->append(StorageRange{path_, 2 * kMiB, 4 * kKiB}), EINVAL);
  // The whole file is fine.
  EXPECT_OK(s->append(StorageRange{path_, 0, 1 * kMiB}));
}

TEST_F(FileDiffStorageTest, MissingFileIsENOENT) {
  auto s = make_file_storage();
  EXPECT_ERRNO(s->append(StorageRange{dir_.file("nope"), 0, 4 * kKiB}), ENOENT);
}

TEST_F(FileDiffStorageTest, RangesOfTwoFilesWork) {
  std::string other = test::make_file(dir_.file("storage2"), 128 * kKiB);
  auto s = make_file_storage();
  ASSERT_OK(s->append(StorageRange{path_, 64 * kKiB, 64 * kKiB}));
  ASSERT_OK(s->append(StorageRange{other, 64 * kKiB, 64 * kKiB}));
  SlotAddress a = test::must(s->allocate(64 * kKiB));
  SlotAddress b = test::must(s->allocate(64 * kKiB));
  auto da = pattern(64 * kKiB, 1), db = pattern(64 * kKiB, 2);
  ASSERT_OK(s->write(a, da.data(), da.size()));
  ASSERT_OK(s->write(b, db.data(), db.size()));
  EXPECT_EQ(test::read_raw(path_, 64 * kKiB, 64 * kKiB), da);
  EXPECT_EQ(test::read_raw(other, 64 * kKiB, 64 * kKiB), db);
  EXPECT_EQ(read_slot(*s, b, 4096, 100), std::vector<char>(db.begin() + 4096, db.begin() + 4196));
}

// ------------------------------------------------------------------ faulty

TEST(FaultyDiffStorage, WritesFailWithTheInjectedErrorAfterNWrites) {
  auto s = make_faulty_storage(make_memory_storage(), FaultPlan{2, ENOSPC, false, false});
  ASSERT_OK(s->append(StorageRange{"", 0, 1 * kMiB}));
  auto data = pattern(64 * kKiB, 5);
  std::vector<SlotAddress> slots;
  for (int i = 0; i < 4; ++i) slots.push_back(test::must(s->allocate(64 * kKiB)));
  EXPECT_OK(s->write(slots[0], data.data(), data.size()));
  EXPECT_OK(s->write(slots[1], data.data(), data.size()));
  EXPECT_ERRNO(s->write(slots[2], data.data(), data.size()), ENOSPC);
  EXPECT_ERRNO(s->write(slots[3], data.data(), data.size()), ENOSPC);
  // Data written before the fault is intact.
  EXPECT_EQ(read_slot(*s, slots[1], 0, 64 * kKiB), data);
}

TEST(FaultyDiffStorage, AllocateFailsInsteadWhenAsked) {
  auto s = make_faulty_storage(make_memory_storage(), FaultPlan{1, EIO, true, false});
  ASSERT_OK(s->append(StorageRange{"", 0, 1 * kMiB}));
  SlotAddress a = test::must(s->allocate(64 * kKiB));
  EXPECT_ERRNO(s->allocate(64 * kKiB), EIO);
  auto data = pattern(64 * kKiB, 6);
  EXPECT_OK(s->write(a, data.data(), data.size())) << "with fail_allocate, writes succeed";
}

TEST(FaultyDiffStorage, ReadsFailWhenAsked) {
  auto s = make_faulty_storage(make_memory_storage(), FaultPlan{100, EIO, false, true});
  ASSERT_OK(s->append(StorageRange{"", 0, 64 * kKiB}));
  SlotAddress a = test::must(s->allocate(4 * kKiB));
  char buf[4096] = {1};
  ASSERT_OK(s->write(a, buf, sizeof buf));
  EXPECT_ERRNO(s->read(a, 0, buf, sizeof buf), EIO);
}

}  // namespace
}  // namespace nbdsnap
