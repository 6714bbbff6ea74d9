// EventQueue: the events of one snapshot (low free space, no space,
// corrupted), delivered in order to wait() callers, each event once.
// Bounded: beyond 1024 pending events the oldest are dropped and counted.
// Safe for concurrent use.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>

namespace nbdsnap {

enum class EventCode { kLowFreeSpace = 1, kNoSpace = 2, kCorrupted = 3 };

struct Event {
  EventCode code = EventCode::kLowFreeSpace;
  uint64_t time_ms = 0;     // since the Unix epoch
  uint64_t requested = 0;   // kLowFreeSpace: bytes asked for
  std::string volume;       // kCorrupted
  int error_code = 0;       // kCorrupted
  std::string error;
};

class EventQueue {
 public:
  void push(Event e);
  // Next event, or nullopt after timeout_ms milliseconds (or once closed).
  std::optional<Event> wait(uint32_t timeout_ms);
  // Wakes every waiter; later waits return nullopt at once.
  void close();
  size_t dropped() const;

 private:
  static constexpr size_t kMax = 1024;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
  size_t dropped_ = 0;
  bool closed_ = false;
};

}  // namespace nbdsnap
