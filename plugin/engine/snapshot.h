// Snapshot: a point in time over a set of volumes. Owns its difference
// storage, its state (created -> taken -> corrupted), the first error, and
// its event queue. SnapshotPart: the snapshot on one volume: its chunk table
// (chunk -> slot), the CBT stamps that writes after the take overwrote, and
// the record log that persists both.
//
// State changes are atomic; corrupt() keeps the first error and emits one
// `corrupted` event. A snapshot is kept alive by its parts (shared_ptr) as
// long as an older snapshot on some volume may still read through them.
// Safe for concurrent use.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "diff_storage.h"
#include "event_queue.h"
#include "params.h"
#include "snapshot_log.h"
#include "status.h"
#include "u32_map.h"
#include "uuid.h"

namespace nbdsnap {

enum class SnapshotState : int { kCreated = 1, kTaken = 2, kCorrupted = 3 };
const char* state_name(SnapshotState s);

class Snapshot {
 public:
  // volumes_bytes: total size of the volumes; storage that large can never
  // run out, so it raises no free-space event.
  Snapshot(Uuid id, std::string name, std::vector<std::string> volumes,
           std::unique_ptr<DiffStorage> storage, uint64_t storage_limit, const Params& params,
           uint64_t volumes_bytes = UINT64_MAX);

  // Constant after construction.
  const Uuid& id() const { return id_; }
  const std::string& name() const { return name_; }
  const std::vector<std::string>& volumes() const { return volumes_; }
  uint64_t storage_limit() const { return storage_limit_; }
  // Export name suffix: the name if any, else the UUID.
  std::string label() const { return name_.empty() ? id_.str() : name_; }
  DiffStorage& storage() { return *storage_; }
  const DiffStorage& storage() const { return *storage_; }

  SnapshotState state() const { return state_.load(std::memory_order_acquire); }
  bool healthy() const { return state() != SnapshotState::kCorrupted; }
  uint64_t sequence() const { return sequence_.load(); }
  uint64_t take_order() const { return take_order_.load(); }
  void set_taken(uint64_t sequence, uint64_t take_order);
  // Restores state after a restart (no event).
  void restore(SnapshotState s, uint64_t sequence, uint64_t take_order, Status error);

  // Marks the snapshot corrupted. The first error sticks; only the first call
  // emits an event. Returns true for that first call.
  bool corrupt(const std::string& volume, const Status& why);
  Status error() const;

  // Free-space signals: call after an allocation or an append.
  void check_free_space();
  void storage_appended();

  EventQueue& events() { return events_; }
  std::atomic<bool> destroyed{false};
  std::atomic<uint64_t> chunks_copied{0};

 private:
  const Uuid id_;
  const std::string name_;
  const std::vector<std::string> volumes_;
  const std::unique_ptr<DiffStorage> storage_;
  const uint64_t storage_limit_;
  const uint64_t minimum_bytes_;
  const uint64_t volumes_bytes_;
  std::atomic<SnapshotState> state_{SnapshotState::kCreated};
  std::atomic<uint64_t> sequence_{0};
  std::atomic<uint64_t> take_order_{0};
  std::atomic<bool> space_signal_armed_{true};
  mutable std::mutex mu_;
  Status error_;  // guarded by mu_
  EventQueue events_;
};

struct SnapshotPart {
  SnapshotPart(std::shared_ptr<Snapshot> s, std::string volume)
      : snapshot(std::move(s)), volume(std::move(volume)) {}
  const std::shared_ptr<Snapshot> snapshot;
  const std::string volume;
  U32Map chunks;        // chunk index -> slot address (or kZeroSlot)
  U32Map saved_stamps;  // CBT block -> stamp before its first change after take
  SnapshotLog log;
  // Set (with the volume's write gate closed) when the snapshot is destroyed
  // but an older snapshot on this volume may still read through this part.
  std::atomic<bool> hidden{false};
};

using Chain = std::vector<std::shared_ptr<SnapshotPart>>;  // oldest first

}  // namespace nbdsnap
