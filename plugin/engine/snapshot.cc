#include "snapshot.h"

#include <cstring>

namespace nbdsnap {

const char* state_name(SnapshotState s) {
  switch (s) {
    case SnapshotState::kCreated: return "created";
    case SnapshotState::kTaken: return "taken";
    case SnapshotState::kCorrupted: return "corrupted";
  }
  return "unknown";
}

Snapshot::Snapshot(Uuid id, std::string name, std::vector<std::string> volumes,
                   std::unique_ptr<DiffStorage> storage, uint64_t storage_limit, const Params& params,
                   uint64_t volumes_bytes)
    : id_(id),
      name_(std::move(name)),
      volumes_(std::move(volumes)),
      storage_(std::move(storage)),
      storage_limit_(storage_limit),
      minimum_bytes_(params.diff_storage_minimum_bytes()),
      volumes_bytes_(volumes_bytes) {}

void Snapshot::set_taken(uint64_t sequence, uint64_t take_order) {
  sequence_ = sequence;
  take_order_ = take_order;
  SnapshotState expected = SnapshotState::kCreated;
  state_.compare_exchange_strong(expected, SnapshotState::kTaken);
}

void Snapshot::restore(SnapshotState s, uint64_t sequence, uint64_t take_order, Status error) {
  sequence_ = sequence;
  take_order_ = take_order;
  state_ = s;
  std::lock_guard lk(mu_);
  error_ = std::move(error);
}

bool Snapshot::corrupt(const std::string& volume, const Status& why) {
  {
    std::lock_guard lk(mu_);
    if (state_.load() == SnapshotState::kCorrupted) return false;
    error_ = why.is_ok() ? Status::error(EIO, "unknown error") : why;
    state_.store(SnapshotState::kCorrupted, std::memory_order_release);
  }
  Event e;
  e.code = EventCode::kCorrupted;
  e.volume = volume;
  e.error_code = why.code();
  e.error = why.message();
  events_.push(std::move(e));
  return true;
}

Status Snapshot::error() const {
  std::lock_guard lk(mu_);
  return error_;
}

void Snapshot::check_free_space() {
  StorageUsage u = storage_->usage();
  if (u.capacity >= volumes_bytes_) return;  // room for every chunk: cannot run out
  uint64_t free = u.capacity > u.used ? u.capacity - u.used : 0;
  if (free >= minimum_bytes_ / 2) return;
  if (!space_signal_armed_.exchange(false)) return;
  bool at_limit = storage_limit_ != 0 && u.capacity >= storage_limit_;
  Event e;
  e.code = at_limit ? EventCode::kNoSpace : EventCode::kLowFreeSpace;
  e.requested = at_limit ? 0 : minimum_bytes_;
  events_.push(std::move(e));
}

void Snapshot::storage_appended() {
  space_signal_armed_ = true;
  check_free_space();
}

}  // namespace nbdsnap
