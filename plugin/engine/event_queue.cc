#include "event_queue.h"

namespace nbdsnap {

void EventQueue::push(Event e) {
  if (e.time_ms == 0)
    e.time_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::system_clock::now().time_since_epoch()).count();
  {
    std::lock_guard lk(mu_);
    if (events_.size() >= kMax) {
      events_.pop_front();
      ++dropped_;
    }
    events_.push_back(std::move(e));
  }
  cv_.notify_one();
}

std::optional<Event> EventQueue::wait(uint32_t timeout_ms) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, std::chrono::milliseconds(timeout_ms),
               [&] { return closed_ || !events_.empty(); });
  if (events_.empty()) return std::nullopt;
  Event e = std::move(events_.front());
  events_.pop_front();
  return e;
}

void EventQueue::close() {
  {
    std::lock_guard lk(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

size_t EventQueue::dropped() const {
  std::lock_guard lk(mu_);
  return dropped_;
}

}  // namespace nbdsnap
