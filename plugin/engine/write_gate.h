// WriteGate: lets origin writes of one volume run concurrently, and lets take
// and destroy drain them: close() waits until every write that entered has
// left and holds new ones off until open().
//
// enter()/leave() cost one atomic add each while the gate is open. Writers
// never starve close() (new writers wait once closing starts). close()/open()
// calls are serialized by the caller (the engine's control mutex).
// Safe for concurrent use.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace nbdsnap {

class WriteGate {
 public:
  void enter();
  // enter() unless the gate is closing; false then (not entered).
  bool try_enter();
  void leave();
  void close();  // returns once no writer is inside
  void open();

 private:
  // Low bit: closing; the rest: writers inside, in steps of 2.
  std::atomic<uint64_t> state_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

class GateGuard {
 public:
  explicit GateGuard(WriteGate& g) : g_(g) { g_.enter(); }
  // Adopts an entry made already (enter() or a successful try_enter()).
  GateGuard(WriteGate& g, std::adopt_lock_t) : g_(g) {}
  ~GateGuard() { g_.leave(); }
  GateGuard(const GateGuard&) = delete;
  GateGuard& operator=(const GateGuard&) = delete;

 private:
  WriteGate& g_;
};

}  // namespace nbdsnap
