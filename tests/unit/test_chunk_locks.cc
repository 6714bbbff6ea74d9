// ChunkLocks: shared/exclusive per chunk; waiters wait for their own chunk only.
#include "chunk_locks.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

using namespace std::chrono_literals;

// Long enough that a lock which should block has had every chance to be
// (wrongly) granted; short enough to keep the suite quick.
constexpr auto kBlockedFor = 150ms;
// Generous bound for something that must happen "immediately".
constexpr auto kPromptly = 5s;

TEST(ChunkLocks, ExclusiveExcludesSharedOnTheSameChunk) {
  ChunkLocks locks;
  locks.lock(ChunkIndex(1));
  std::atomic<bool> got{false};
  std::thread reader([&] {
    locks.lock_shared(ChunkIndex(1));
    got = true;
    locks.unlock_shared(ChunkIndex(1));
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(got.load()) << "a shared lock was granted while the chunk was held exclusively";
  locks.unlock(ChunkIndex(1));
  reader.join();
  EXPECT_TRUE(got.load());
}

TEST(ChunkLocks, SharedExcludesExclusiveOnTheSameChunk) {
  ChunkLocks locks;
  locks.lock_shared(ChunkIndex(7));
  std::atomic<bool> got{false};
  std::thread writer([&] {
    locks.lock(ChunkIndex(7));
    got = true;
    locks.unlock(ChunkIndex(7));
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(got.load()) << "an exclusive lock was granted while a reader held the chunk";
  locks.unlock_shared(ChunkIndex(7));
  writer.join();
  EXPECT_TRUE(got.load());
}

TEST(ChunkLocks, ExclusiveExcludesExclusiveOnTheSameChunk) {
  ChunkLocks locks;
  locks.lock(ChunkIndex(3));
  std::atomic<bool> got{false};
  std::thread other([&] {
    locks.lock(ChunkIndex(3));
    got = true;
    locks.unlock(ChunkIndex(3));
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(got.load());
  locks.unlock(ChunkIndex(3));
  other.join();
  EXPECT_TRUE(got.load());
}

TEST(ChunkLocks, SharedLocksOnTheSameChunkCoexist) {
  ChunkLocks locks;
  locks.lock_shared(ChunkIndex(2));
  auto second = std::async(std::launch::async, [&] {
    locks.lock_shared(ChunkIndex(2));
    locks.unlock_shared(ChunkIndex(2));
  });
  EXPECT_EQ(second.wait_for(kPromptly), std::future_status::ready);
  locks.unlock_shared(ChunkIndex(2));
}

TEST(ChunkLocks, DifferentChunksDoNotBlockEachOther) {
  ChunkLocks locks;
  locks.lock(ChunkIndex(1));
  // Chunk 2 (another shard) and chunk 65 (the same shard as chunk 1).
  for (uint32_t c : {2u, 65u}) {
    auto other = std::async(std::launch::async, [&, c] {
      locks.lock(ChunkIndex(c));
      locks.unlock(ChunkIndex(c));
      locks.lock_shared(ChunkIndex(c));
      locks.unlock_shared(ChunkIndex(c));
    });
    EXPECT_EQ(other.wait_for(kPromptly), std::future_status::ready) << "chunk " << c << " waited for chunk 1";
  }
  locks.unlock(ChunkIndex(1));
}

TEST(ChunkLocks, WaitingWriterGoesBeforeNewReaders) {
  ChunkLocks locks;
  locks.lock_shared(ChunkIndex(4));
  std::atomic<int> order{0};
  std::atomic<int> writer_at{-1}, reader_at{-1};
  std::thread writer([&] {
    locks.lock(ChunkIndex(4));
    writer_at = order.fetch_add(1);
    std::this_thread::sleep_for(20ms);
    locks.unlock(ChunkIndex(4));
  });
  std::this_thread::sleep_for(kBlockedFor);  // the writer is now waiting
  std::thread reader([&] {
    locks.lock_shared(ChunkIndex(4));
    reader_at = order.fetch_add(1);
    locks.unlock_shared(ChunkIndex(4));
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_EQ(reader_at.load(), -1) << "a new reader overtook a waiting writer";
  locks.unlock_shared(ChunkIndex(4));
  writer.join();
  reader.join();
  EXPECT_EQ(writer_at.load(), 0);
  EXPECT_EQ(reader_at.load(), 1);
}

TEST(ChunkLocks, ExclusiveLockSerializesUpdatesFromManyThreads) {
  ChunkLocks locks;
  constexpr int kThreads = 4, kIters = 20000;
  uint64_t counters[3] = {0, 0, 0};  // plain: protected by the chunk lock only
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIters; ++i) {
        uint32_t c = static_cast<uint32_t>((i + t) % 3) * 64;  // chunks 0, 64, 128 share a shard
        ExclusiveChunkLock l(locks, ChunkIndex(c));
        ++counters[c / 64];
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(counters[0] + counters[1] + counters[2], uint64_t{kThreads} * kIters);
  for (uint64_t n : counters) EXPECT_GT(n, 0u);
}

TEST(ChunkLocks, ReadersAndWritersNeverOverlap) {
  ChunkLocks locks;
  std::atomic<int> readers{0}, writers{0};
  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5000; ++i) {
        if ((i + t) % 4 == 0) {
          ExclusiveChunkLock l(locks, ChunkIndex(9));
          if (writers.fetch_add(1) != 0 || readers.load() != 0) bad = true;
          writers.fetch_sub(1);
        } else {
          SharedChunkLock l(locks, ChunkIndex(9));
          readers.fetch_add(1);
          if (writers.load() != 0) bad = true;
          readers.fetch_sub(1);
        }
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_FALSE(bad.load());
}

}  // namespace
}  // namespace nbdsnap
