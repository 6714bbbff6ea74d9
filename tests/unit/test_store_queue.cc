// StoreQueue: staging entries (reservation all or nothing, first come first
// served), the storer threads, drain, and the staging file across a reopen.
#include "store_queue.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<StoreQueue> anonymous(uint32_t entries, unsigned threads = 2) {
  return test::must(StoreQueue::open("", entries, 4096, threads));
}

TEST(StoreQueue, ReservationIsAllOrNothingAndWaitersAreServedInOrder) {
  auto q = anonymous(4);
  std::vector<uint32_t> a;
  ASSERT_TRUE(q->try_reserve(3, &a));
  ASSERT_EQ(a.size(), 3u);
  std::vector<uint32_t> b;
  EXPECT_FALSE(q->try_reserve(2, &b)) << "only one entry is free";
  EXPECT_TRUE(b.empty()) << "a failed reservation takes nothing";
  auto waiter = std::async(std::launch::async, [&] {
    std::vector<uint32_t> w;
    q->reserve(2, &w);
    return w;
  });
  EXPECT_EQ(waiter.wait_for(100ms), std::future_status::timeout);
  EXPECT_FALSE(q->try_reserve(1, &b)) << "one entry is free, but a waiter came first";
  q->release(a.back());
  a.pop_back();
  auto got = waiter.get();
  ASSERT_EQ(got.size(), 2u);
  std::vector<uint32_t> all = a;
  all.insert(all.end(), got.begin(), got.end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<uint32_t>{0, 1, 2, 3})) << "every entry handed out once";
  for (uint32_t e : all) q->release(e);
  EXPECT_TRUE(q->try_reserve(4, &b));
}

TEST(StoreQueue, DrainWaitsForJobsSubmittedBeforeItOnly) {
  auto q = anonymous(2, 2);
  std::atomic<int> ran{0};
  q->hold_for_test(true);
  q->submit([&] { ++ran; });
  auto drained = std::async(std::launch::async, [&] { q->drain(); });
  EXPECT_EQ(drained.wait_for(100ms), std::future_status::timeout) << "drain returned with a job queued";
  // A job submitted after the drain started, which does not end yet, does
  // not hold the drain up.
  std::promise<void> release;
  auto gate = release.get_future().share();
  q->submit([gate] { gate.wait(); });
  q->hold_for_test(false);
  EXPECT_EQ(drained.wait_for(20s), std::future_status::ready) << "drain waited for a later job";
  EXPECT_EQ(ran.load(), 1);
  release.set_value();
  q->drain();
}

TEST(StoreQueue, DestructionRunsEveryQueuedJob) {
  std::atomic<int> ran{0};
  {
    auto q = anonymous(2, 1);
    q->hold_for_test(true);
    for (int i = 0; i < 5; ++i) q->submit([&] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 5);
}

TEST(StoreQueue, StagingFileKeepsItsEntriesAcrossAReopen) {
  test::TempDir dir;
  std::string path = dir.file("staging");
  std::vector<char> buf(4096);
  {
    auto q = test::must(StoreQueue::open(path, 2, 4096, 1));
    std::memset(q->entry(1), 0x11, 4096);
  }  // never committed: the file made at open is not in place
  {
    auto q = test::must(StoreQueue::open(path, 2, 4096, 1));
    EXPECT_ERRNO(q->read_file_entry(1, buf.data(), buf.size()), EIO) << "no file was in place";
    ASSERT_OK(q->commit());
    std::memset(q->entry(1), 0x5a, 4096);
  }  // as after a crash: nothing but the file is left
  auto q = test::must(StoreQueue::open(path, 2, 4096, 1));
  ASSERT_OK(q->read_file_entry(1, buf.data(), buf.size()));
  EXPECT_EQ(buf, std::vector<char>(4096, 0x5a)) << "reopening never truncates";
  EXPECT_EQ(std::memcmp(q->entry(1), buf.data(), 4096), 0);
}

TEST(StoreQueue, ShortStagingFileServesOnlyWhatItHeldUntilReplaced) {
  test::TempDir dir;
  std::string path = dir.file("staging");
  test::make_file(path, 4096);
  test::write_raw(path, 0, std::vector<char>(4096, 0x33).data(), 4096);  // one entry of two
  auto q = test::must(StoreQueue::open(path, 2, 4096, 1));
  std::vector<char> buf(4096);
  ASSERT_OK(q->read_file_entry(0, buf.data(), buf.size()));
  EXPECT_EQ(buf, std::vector<char>(4096, 0x33));
  EXPECT_ERRNO(q->read_file_entry(1, buf.data(), buf.size()), EIO) << "beyond what the file held: never zeros";
  EXPECT_EQ(test::read_raw(path, 0, 4096), std::vector<char>(4096, 0x33)) << "the old file stays until commit";
  ASSERT_OK(q->commit());
  q.reset();
  EXPECT_EQ(std::filesystem::file_size(path), 2 * 4096u);
}

}  // namespace
}  // namespace nbdsnap
