// U32Map: insert-if-absent, find, growth, concurrent inserts, memory use.
#include "u32_map.h"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

TEST(U32Map, EmptyMapFindsNothing) {
  U32Map m;
  EXPECT_EQ(m.find(0), std::nullopt);
  EXPECT_EQ(m.find(12345), std::nullopt);
  EXPECT_EQ(m.size(), 0u);
  int calls = 0;
  m.for_each([&](uint32_t, uint32_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(U32Map, InsertIfAbsentKeepsTheFirstValue) {
  U32Map m;
  EXPECT_TRUE(m.insert(5, 10));
  uint32_t existing = 0;
  EXPECT_FALSE(m.insert(5, 20, &existing));
  EXPECT_EQ(existing, 10u);
  EXPECT_FALSE(m.insert(5, 30));  // existing pointer is optional
  EXPECT_EQ(m.find(5), 10u);
  EXPECT_EQ(m.size(), 1u);
  EXPECT_EQ(m.find(6), std::nullopt);
}

TEST(U32Map, ExtremeKeysAndValuesRoundTrip) {
  U32Map m;
  // Chunk and CBT indexes stay below 0xffffffff (Volume::open checks it).
  EXPECT_TRUE(m.insert(0, 0));
  EXPECT_TRUE(m.insert(0xfffffffeu, 0xffffffffu));  // kZeroSlot as a value
  EXPECT_EQ(m.find(0), 0u);
  EXPECT_EQ(m.find(0xfffffffeu), 0xffffffffu);
  EXPECT_EQ(m.size(), 2u);
}

TEST(U32Map, GrowsWithManyKeysAndFindsEveryOne) {
  U32Map m;
  constexpr uint32_t kN = 200000;
  for (uint32_t i = 0; i < kN; ++i) ASSERT_TRUE(m.insert(i * 7, i ^ 0x5a5a5a5au));
  EXPECT_EQ(m.size(), kN);
  for (uint32_t i = 0; i < kN; ++i) ASSERT_EQ(m.find(i * 7), i ^ 0x5a5a5a5au) << "key " << i * 7;
  for (uint32_t i = 0; i < 1000; ++i) ASSERT_EQ(m.find(i * 7 + 3), std::nullopt);
  std::vector<uint8_t> seen(kN, 0);
  size_t visits = 0;
  m.for_each([&](uint32_t k, uint32_t v) {
    ASSERT_EQ(k % 7, 0u);
    ASSERT_EQ(v, (k / 7) ^ 0x5a5a5a5au);
    ++seen[k / 7];
    ++visits;
  });
  EXPECT_EQ(visits, kN);
  for (uint32_t i = 0; i < kN; ++i) ASSERT_EQ(seen[i], 1) << "for_each visits key " << i * 7 << " once";
}

TEST(U32Map, ConcurrentInsertsStoreEachKeyExactlyOnce) {
  U32Map m;
  constexpr uint32_t kKeys = 100000;
  constexpr int kThreads = 4;
  std::vector<std::atomic<int>> wins(kKeys);
  std::vector<std::atomic<uint32_t>> winner(kKeys);
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      // Each thread walks the keys in its own order, so they collide often.
      for (uint32_t j = 0; j < kKeys; ++j) {
        uint32_t key = (t % 2 == 0) ? j : kKeys - 1 - j;
        uint32_t existing = 0xdeadbeef;
        if (m.insert(key, static_cast<uint32_t>(t) + 1, &existing)) {
          wins[key].fetch_add(1);
          winner[key].store(static_cast<uint32_t>(t) + 1);
        } else {
          ASSERT_GE(existing, 1u);
          ASSERT_LE(existing, static_cast<uint32_t>(kThreads));
        }
      }
    });
  }
  go = true;
  for (auto& th : threads) th.join();
  EXPECT_EQ(m.size(), kKeys);
  for (uint32_t k = 0; k < kKeys; ++k) {
    ASSERT_EQ(wins[k].load(), 1) << "key " << k;
    ASSERT_EQ(m.find(k), winner[k].load()) << "key " << k;
  }
}

TEST(U32Map, ConcurrentFindsDuringInsertsNeverSeeAWrongValue) {
  U32Map m;
  constexpr uint32_t kKeys = 200000;
  std::atomic<uint32_t> inserted{0};
  std::thread writer([&] {
    for (uint32_t k = 0; k < kKeys; ++k) {
      m.insert(k, k * 3 + 1);
      inserted.store(k + 1, std::memory_order_release);
    }
  });
  std::thread reader([&] {
    uint32_t x = 1;
    while (inserted.load(std::memory_order_acquire) < kKeys) {
      uint32_t n = inserted.load(std::memory_order_acquire);
      if (n == 0) continue;
      x = x * 1664525u + 1013904223u;
      uint32_t k = x % n;
      auto v = m.find(k);
      ASSERT_TRUE(v.has_value()) << "inserted key " << k << " not found";
      ASSERT_EQ(*v, k * 3 + 1);
    }
  });
  writer.join();
  reader.join();
}

TEST(U32Map, MemoryStaysUnder32BytesPerEntryAfterAMillionInserts) {
  U32Map m;
  constexpr uint32_t kN = 1000000;
  for (uint32_t i = 0; i < kN; ++i) m.insert(i, i);
  EXPECT_EQ(m.size(), kN);
  EXPECT_LE(m.memory_bytes(), size_t{32} * kN) << m.memory_bytes() / double(kN) << " bytes per entry";
  EXPECT_GE(m.memory_bytes(), size_t{8} * kN);  // 8-byte entries
}

}  // namespace
}  // namespace nbdsnap
