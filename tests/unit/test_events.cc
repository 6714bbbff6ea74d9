// Snapshot failure and events (DESIGN 4.5, 6): exhausted or failing diff
// storage corrupts the snapshot, never the origin; low-free-space, no-space
// and corrupted events; wait-event timeouts in milliseconds.
#include "event_queue.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "snapshot.h"
#include "test_util.h"

namespace nbdsnap {
namespace {

using test::Harness;
using test::kChunk;
using test::kKiB;
using test::kMiB;
using test::kVolumeSize;
using test::pattern;
using namespace std::chrono_literals;

// All events pending now (each wait returns at once or after 50 ms).
std::vector<Event> drain(Engine& e, const std::string& id) {
  std::vector<Event> out;
  for (;;) {
    auto ev = test::must(e.wait_event(id, 50));
    if (!ev) return out;
    out.push_back(*ev);
  }
}

size_t count(const std::vector<Event>& events, EventCode code) {
  size_t n = 0;
  for (const auto& e : events) n += e.code == code;
  return n;
}

Harness::Options faulty(FaultPlan plan) {
  Harness::Options o;
  o.storage_factory = [plan] { return make_faulty_storage(make_memory_storage(), plan); };
  return o;
}

// ---------------------------------------------------------------- EventQueue

TEST(EventQueue, DeliversEventsInOrderEachOnce) {
  EventQueue q;
  for (uint64_t i = 1; i <= 3; ++i) {
    Event e;
    e.requested = i;
    q.push(e);
  }
  for (uint64_t i = 1; i <= 3; ++i) {
    auto e = q.wait(0);
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->requested, i);
    EXPECT_GT(e->time_ms, 1600000000000u) << "time is milliseconds since the epoch";
  }
  EXPECT_FALSE(q.wait(0).has_value());
}

TEST(EventQueue, KeepsAtMost1024EventsDroppingTheOldest) {
  EventQueue q;
  for (uint64_t i = 0; i < 1030; ++i) {
    Event e;
    e.requested = i;
    q.push(e);
  }
  EXPECT_EQ(q.dropped(), 6u);
  EXPECT_EQ(q.wait(0)->requested, 6u);
}

TEST(EventQueue, WaitTimesOutAfterTheTimeoutInMilliseconds) {
  EventQueue q;
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(q.wait(300).has_value());
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(ms, 290);
  EXPECT_LT(ms, 3000);
}

TEST(EventQueue, PushWakesAWaiterAndCloseWakesEveryWaiter) {
  EventQueue q;
  std::thread pusher([&] {
    std::this_thread::sleep_for(100ms);
    q.push(Event{});
  });
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(q.wait(10000).has_value());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  pusher.join();
  std::thread closer([&] {
    std::this_thread::sleep_for(100ms);
    q.close();
  });
  t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(q.wait(10000).has_value());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  closer.join();
  EXPECT_FALSE(q.wait(10000).has_value()) << "a closed queue answers at once";
}

// ------------------------------------------------------------------ Snapshot

TEST(Snapshot, FirstErrorSticksAndOnlyTheFirstCorruptEmitsAnEvent) {
  Snapshot s(Uuid::random(), "s", {"vol"}, make_memory_storage(), 0, test::small_params());
  EXPECT_EQ(s.state(), SnapshotState::kCreated);
  s.set_taken(5, 1);
  EXPECT_EQ(s.state(), SnapshotState::kTaken);
  EXPECT_TRUE(s.corrupt("vol", Status::error(ENOSPC, "first")));
  EXPECT_FALSE(s.corrupt("vol", Status::error(EIO, "second")));
  EXPECT_EQ(s.state(), SnapshotState::kCorrupted);
  EXPECT_FALSE(s.healthy());
  EXPECT_EQ(s.error().code(), ENOSPC);
  EXPECT_EQ(s.error().message(), "first");
  auto e = s.events().wait(0);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->code, EventCode::kCorrupted);
  EXPECT_EQ(e->volume, "vol");
  EXPECT_EQ(e->error_code, ENOSPC);
  EXPECT_FALSE(s.events().wait(0).has_value());
  EXPECT_STREQ(state_name(s.state()), "corrupted");
}

// -------------------------------------------------------- through the engine

TEST(SnapshotFailure, ExhaustedStorageCorruptsTheSnapshotButNeverTheOrigin) {
  Harness h;
  auto before = pattern(kVolumeSize, 1);
  ASSERT_OK(h.write(0, before));
  h.snapshot("s1", 2 * kChunk);  // room for two chunks
  auto after = pattern(kVolumeSize, 2);
  // One write over the whole volume: the third chunk's copy finds no space.
  // The first two are staged, held there until the snapshot is corrupted:
  // then they are not stored (it can never be read again).
  h.vol()->hold_stores_for_test(true);
  EXPECT_OK(h.write(0, after)) << "the origin never fails because of a snapshot";
  h.vol()->hold_stores_for_test(false);
  EXPECT_EQ(h.read(0, kVolumeSize), after);
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted);
  EXPECT_EQ(info.error.code(), ENOSPC);
  EXPECT_EQ(info.chunks_copied, 0u);
  EXPECT_EQ(info.storage.used, 2 * kChunk) << "their slots stay allocated";
  // More writes: no more copies, no more events, the first error sticks.
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 3)));
  EXPECT_EQ(h.read(0, kVolumeSize), pattern(kVolumeSize, 3));
  auto events = drain(h.engine(), "s1");
  EXPECT_EQ(count(events, EventCode::kCorrupted), 1u);
  for (const auto& e : events)
    if (e.code == EventCode::kCorrupted) {
      EXPECT_EQ(e.error_code, ENOSPC);
      EXPECT_EQ(e.volume, "vol");
    }
  info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.error.code(), ENOSPC);
  EXPECT_EQ(info.chunks_copied, 0u);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 4096, &out), EIO);
  EXPECT_ERRNO(h.read_snapshot("s1", 0, kVolumeSize, &out), EIO);
  // A corrupted snapshot cannot be taken again or given storage.
  EXPECT_ERRNO(h.engine().append_storage("s1", {StorageRange{"", 0, 1 * kMiB}}), EINVAL);
  ASSERT_OK(h.engine().destroy("s1"));
}

TEST(SnapshotFailure, InjectedWriteErrorSticksAndEmitsOneEvent) {
  Harness h(faulty(FaultPlan{3, EIO, false, false}));
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 1)));
  h.snapshot("s1");
  for (uint64_t c = 0; c < 10; ++c) ASSERT_OK(h.write(c * kChunk + 5, pattern(100, c)));
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted);
  EXPECT_EQ(info.error.code(), EIO);
  EXPECT_EQ(info.chunks_copied, 3u);
  auto events = drain(h.engine(), "s1");
  ASSERT_EQ(count(events, EventCode::kCorrupted), 1u);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 100, &out), EIO);
  for (uint64_t c = 0; c < 10; ++c) EXPECT_EQ(h.read(c * kChunk + 5, 100), pattern(100, c));
}

TEST(SnapshotFailure, InjectedENOSPCOnAllocateIsTheStickyError) {
  Harness h(faulty(FaultPlan{0, ENOSPC, true, false}));
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  h.snapshot("s1");
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  EXPECT_EQ(h.read(0, kChunk), pattern(kChunk, 2));
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted);
  EXPECT_EQ(info.error.code(), ENOSPC);
  EXPECT_EQ(count(drain(h.engine(), "s1"), EventCode::kCorrupted), 1u);
}

TEST(SnapshotFailure, CorruptedNewestSnapshotLeavesTheOlderOneIntact) {
  // "a" gets healthy memory storage; "b" fails at its first write.
  int made = 0;
  Harness::Options o;
  o.storage_factory = [&made]() -> std::unique_ptr<DiffStorage> {
    if (made++ == 0) return make_memory_storage();
    return make_faulty_storage(make_memory_storage(), FaultPlan{0, EIO, false, false});
  };
  Harness h(o);
  auto d0 = pattern(kVolumeSize, 1);
  ASSERT_OK(h.write(0, d0));
  h.snapshot("a");
  ASSERT_OK(h.write(5 * kChunk, pattern(kChunk, 2)));  // copied into a
  auto at_b = h.read(0, kVolumeSize);
  h.snapshot("b");
  ASSERT_OK(h.write(5 * kChunk, pattern(kChunk, 3)));  // b fails: corrupted
  ASSERT_OK(h.write(7 * kChunk, pattern(kChunk, 4)));  // now copies go to a
  EXPECT_EQ(test::must(h.engine().info("b")).state, SnapshotState::kCorrupted);
  EXPECT_EQ(test::must(h.engine().info("a")).state, SnapshotState::kTaken);
  EXPECT_EQ(test::must(h.engine().info("a")).chunks_copied, 2u);
  EXPECT_EQ(h.snap_read("a", 0, kVolumeSize), d0);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("b", 0, kVolumeSize, &out), EIO);
}

TEST(SnapshotEvents, LowFreeSpaceAsksForDiffStorageMinimumBytes) {
  Harness h;  // diff_storage_minimum = 64 sectors: event when free < 16 KiB
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 1)));
  h.snapshot("s1", 2 * kChunk + 8 * kKiB);
  EXPECT_FALSE(test::must(h.engine().wait_event("s1", 0)).has_value()) << "plenty of space yet";
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  EXPECT_FALSE(test::must(h.engine().wait_event("s1", 0)).has_value()) << "72 KiB still free";
  ASSERT_OK(h.write(kChunk, pattern(kChunk, 3)));  // 8 KiB free < 16 KiB
  auto e = test::must(h.engine().wait_event("s1", 1000));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->code, EventCode::kLowFreeSpace);
  EXPECT_EQ(e->requested, 64u * 512);
  EXPECT_FALSE(test::must(h.engine().wait_event("s1", 0)).has_value()) << "one event until storage is added";
  // Adding storage re-arms the signal; it fires again when that runs low.
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{"", 0, kChunk}}));
  EXPECT_FALSE(test::must(h.engine().wait_event("s1", 0)).has_value());
  ASSERT_OK(h.write(2 * kChunk, pattern(kChunk, 4)));  // skips the 8 KiB tail, fills the new range
  e = test::must(h.engine().wait_event("s1", 1000));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->code, EventCode::kLowFreeSpace);
  EXPECT_EQ(test::must(h.engine().info("s1")).state, SnapshotState::kTaken);
  auto before = pattern(kVolumeSize, 1);
  EXPECT_EQ(h.snap_read("s1", 0, 3 * kChunk), std::vector<char>(before.begin(), before.begin() + 3 * kChunk));
}

TEST(SnapshotEvents, NoSpaceAtTheStorageLimit) {
  Harness h;
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 1)));
  ASSERT_OK(h.engine().create_snapshot({"vol"}, "s1", 2 * kChunk));
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{"", 0, 2 * kChunk}}));
  ASSERT_OK(h.engine().take("s1"));
  ASSERT_OK(h.write(0, pattern(2 * kChunk, 2)));
  auto e = test::must(h.engine().wait_event("s1", 1000));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->code, EventCode::kNoSpace);
  EXPECT_EQ(test::must(h.engine().info("s1")).storage_limit, 2 * kChunk);
}

TEST(SnapshotEvents, StorageAsLargeAsTheVolumesNeverWarns) {
  Harness h;  // diff_storage_minimum is far larger than kVolumeSize
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 1)));
  uint64_t room = (kVolumeSize + kStorageUnit - 1) / kStorageUnit * kStorageUnit + kStorageUnit;
  ASSERT_OK(h.engine().create_snapshot({"vol"}, "s1", room));
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{"", 0, room}}));
  ASSERT_OK(h.engine().take("s1"));
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 2)));  // copies every chunk
  EXPECT_FALSE(test::must(h.engine().wait_event("s1", 0)).has_value())
      << "storage the size of the volume cannot run out: no low-free-space or no-space";
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kTaken);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), pattern(kVolumeSize, 1));
}

TEST(SnapshotEvents, WaitEventTimesOutAfterRoughlyTheTimeoutInMilliseconds) {
  Harness h;
  h.snapshot("s1");
  for (uint32_t ms : {0u, 150u, 400u}) {
    auto t0 = std::chrono::steady_clock::now();
    auto e = test::must(h.engine().wait_event("s1", ms));
    auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
    EXPECT_FALSE(e.has_value());
    EXPECT_GE(took.count(), ms * 0.95) << "timeout " << ms;
    EXPECT_LT(took.count(), ms + 1000) << "timeout " << ms << " is milliseconds, not seconds or ticks";
  }
}

TEST(SnapshotEvents, WaitEventEndsWithENOENTWhenTheSnapshotIsDestroyed) {
  Harness h;
  h.snapshot("s1");
  std::thread destroyer([&] {
    std::this_thread::sleep_for(100ms);
    test::must(h.engine().destroy("s1"));
  });
  auto t0 = std::chrono::steady_clock::now();
  auto r = h.engine().wait_event("s1", 20000);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  destroyer.join();
  EXPECT_EQ(r.status().code(), ENOENT);
  EXPECT_ERRNO(h.engine().wait_event("s1", 0), ENOENT);
}

TEST(SnapshotEvents, EventsOfASnapshotBeforeTakeAreNone) {
  Harness h;
  ASSERT_OK(h.engine().create_snapshot({"vol"}, "s1", 0));
  EXPECT_FALSE(test::must(h.engine().wait_event("s1", 10)).has_value());
  EXPECT_ERRNO(h.engine().wait_event("nope", 10), ENOENT);
}

}  // namespace
}  // namespace nbdsnap
