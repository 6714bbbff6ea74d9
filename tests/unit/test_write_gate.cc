// WriteGate: close() drains the writers inside and holds new ones until open().
#include "write_gate.h"

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
constexpr auto kBlockedFor = 150ms;
constexpr auto kPromptly = 5s;

TEST(WriteGate, CloseOnAnIdleGateReturnsAtOnce) {
  WriteGate g;
  auto closer = std::async(std::launch::async, [&] { g.close(); });
  EXPECT_EQ(closer.wait_for(kPromptly), std::future_status::ready);
  g.open();
  auto writer = std::async(std::launch::async, [&] { GateGuard guard(g); });
  EXPECT_EQ(writer.wait_for(kPromptly), std::future_status::ready);
}

TEST(WriteGate, CloseWaitsForTheWritersInside) {
  WriteGate g;
  g.enter();
  g.enter();  // two writers inside
  std::atomic<bool> closed{false};
  std::thread closer([&] {
    g.close();
    closed = true;
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(closed.load()) << "close() returned with two writers inside";
  g.leave();
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(closed.load()) << "close() returned with one writer inside";
  g.leave();
  closer.join();
  EXPECT_TRUE(closed.load());
  g.open();
}

TEST(WriteGate, ClosedGateHoldsNewWritersUntilOpen) {
  WriteGate g;
  g.close();
  std::atomic<bool> entered{false};
  std::thread writer([&] {
    GateGuard guard(g);
    entered = true;
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(entered.load()) << "a writer entered a closed gate";
  g.open();
  writer.join();
  EXPECT_TRUE(entered.load());
}

TEST(WriteGate, WritersArrivingWhileClosingWaitAndCloseStillReturns) {
  WriteGate g;
  g.enter();
  std::atomic<bool> closed{false}, late_in{false};
  std::thread closer([&] {
    g.close();
    closed = true;
  });
  std::this_thread::sleep_for(50ms);  // closing has started
  std::thread late([&] {
    GateGuard guard(g);
    late_in = true;
  });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(late_in.load()) << "a new writer got in while close() was draining";
  EXPECT_FALSE(closed.load());
  g.leave();
  closer.join();
  EXPECT_TRUE(closed.load());
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(late_in.load()) << "a writer got in after close() returned";
  g.open();
  late.join();
  EXPECT_TRUE(late_in.load());
}

TEST(WriteGate, NoWriterIsInsideBetweenCloseAndOpenUnderLoad) {
  WriteGate g;
  std::atomic<int> inside{0};
  std::atomic<bool> stop{false}, bad{false};
  std::atomic<uint64_t> writes{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 3; ++t)
    writers.emplace_back([&] {
      while (!stop.load()) {
        GateGuard guard(g);
        inside.fetch_add(1);
        writes.fetch_add(1);
        inside.fetch_sub(1);
      }
    });
  for (int i = 0; i < 100; ++i) {
    g.close();
    for (int k = 0; k < 50; ++k)
      if (inside.load() != 0) bad = true;
    g.open();
    std::this_thread::yield();
  }
  stop = true;
  for (auto& th : writers) th.join();
  EXPECT_FALSE(bad.load()) << "a writer was inside a closed gate";
  EXPECT_GT(writes.load(), 0u);
}

}  // namespace
}  // namespace nbdsnap
