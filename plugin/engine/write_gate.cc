#include "write_gate.h"

namespace nbdsnap {

void WriteGate::enter() {
  for (;;) {
    uint64_t prev = state_.fetch_add(2, std::memory_order_acquire);
    if ((prev & 1) == 0) return;
    // Closing: back out, wake the closer if we were the last, and wait.
    leave();
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return (state_.load(std::memory_order_acquire) & 1) == 0; });
  }
}

bool WriteGate::try_enter() {
  uint64_t prev = state_.fetch_add(2, std::memory_order_acquire);
  if ((prev & 1) == 0) return true;
  leave();
  return false;
}

void WriteGate::leave() {
  uint64_t prev = state_.fetch_sub(2, std::memory_order_release);
  if ((prev & 1) && prev - 2 == 1) {
    std::lock_guard lk(mu_);
    cv_.notify_all();
  }
}

void WriteGate::close() {
  state_.fetch_or(1, std::memory_order_acq_rel);
  std::unique_lock lk(mu_);
  cv_.wait(lk, [&] { return state_.load(std::memory_order_acquire) == 1; });
}

void WriteGate::open() {
  {
    std::lock_guard lk(mu_);
    state_.fetch_and(~uint64_t{1}, std::memory_order_acq_rel);
  }
  cv_.notify_all();
}

}  // namespace nbdsnap
