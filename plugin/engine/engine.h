// Engine: the data plane without nbdkit. Owns the volumes, the snapshots, the
// current sequence number and the state directory; every control-link
// operation is a method here, and the plugin glue maps NBD exports to
// Volume/SnapshotPart I/O through open_export().
//
// Control operations are serialized by one mutex (they are rare); I/O on
// volumes never takes it. Take is one atomic point over its volumes: their
// write gates are closed in name order, the sequence switches, the parts join
// the chains, the registry is written, the gates open again.
// Safe for concurrent use.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "diff_storage.h"
#include "params.h"
#include "snapshot.h"
#include "status.h"
#include "volume.h"

namespace nbdsnap {

struct EngineOptions {
  std::string state_dir;  // "" = nothing persisted (tests)
  Params params;
  std::vector<std::pair<std::string, std::string>> volumes;  // name, path; in order
  // Makes the difference storage of a new snapshot; default: file ranges.
  std::function<std::unique_ptr<DiffStorage>()> storage_factory;
  // Operator messages (restart findings, resets).
  std::function<void(const std::string&)> log;
  // Tests only: called at named points of control operations, with mu_ held
  // ("take: recorded": the registry says taken, the gates are still open).
  std::function<void(const char* point)> test_point;
};

struct ExportRef {
  std::shared_ptr<Volume> volume;
  std::shared_ptr<SnapshotPart> part;  // null: the origin, read-write
};

struct SnapshotInfo {
  Uuid id;
  std::string name;
  SnapshotState state;
  uint64_t sequence = 0;
  std::vector<std::string> volumes;
  std::vector<std::string> exports;
  Status error;
  StorageUsage storage;
  uint64_t storage_limit = 0;
  uint64_t chunks_copied = 0;
  bool retained = false;  // destroyed; storage still in use
  // Heap bytes of the chunk tables and of the saved CBT stamps of its parts
  // (statistics: memory per copied chunk).
  uint64_t chunk_table_bytes = 0;
  uint64_t saved_stamps_bytes = 0;
};

struct TakeResult {
  uint64_t sequence;
  uint64_t pause_us;
};

struct CbtInfo {
  Uuid generation;
  uint64_t sequence;
  uint64_t block_size;
  uint64_t block_count;
  uint64_t capacity;
};

struct CbtChanges {
  Uuid generation;
  uint64_t sequence;  // changes up to and including this sequence
  std::vector<ByteRange> ranges;
  uint64_t changed_bytes = 0;
};

class Engine {
 public:
  explicit Engine(EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Opens the volumes and the state directory; restores snapshots.
  Status start();
  // Makes everything durable and marks the state clean.
  Status stop();
  // The staging file of a volume ("" without a state directory): in
  // /dev/shm (tmpfs: kept across a crash of the process, never written to
  // disk) as nbdsnap-DEV-INO-VOLUME.chunks, DEV and INO those of the state
  // directory; where /dev/shm is not usable, STATE/staging/VOLUME.chunks.
  // Set by start().
  std::string staging_path(const std::string& volume) const;

  // --- exports ---
  Result<ExportRef> open_export(const std::string& name) const;
  std::vector<std::string> export_names() const;  // volumes, then snapshots
  std::vector<std::shared_ptr<Volume>> volumes() const;
  std::shared_ptr<Volume> volume(const std::string& name) const;

  // Adds a volume while serving (export NAME appears at once). EEXIST name
  // in use, EINVAL bad name or the same file as another volume, EBUSY the
  // file holds difference storage.
  Status add_volume(const std::string& name, const std::string& path);
  // Removes a volume no snapshot uses (EBUSY otherwise); its export goes away,
  // open connections get EIO, its CBT history is deleted.
  Status remove_volume(const std::string& name);

  // --- snapshots (id = UUID text or name) ---
  Result<Uuid> create_snapshot(const std::vector<std::string>& volumes, const std::string& name,
                               uint64_t storage_limit);
  Status append_storage(const std::string& id, const std::vector<StorageRange>& ranges);
  Result<TakeResult> take(const std::string& id);
  Result<SnapshotInfo> info(const std::string& id) const;
  // Live snapshots; with include_retained also destroyed ones whose parts
  // older snapshots still read through (SnapshotInfo::retained).
  std::vector<SnapshotInfo> collect(bool include_retained = false) const;
  // nullopt: the timeout passed.
  Result<std::optional<Event>> wait_event(const std::string& id, uint32_t timeout_ms);
  Status destroy(const std::string& id);

  // --- change tracking ---
  Result<CbtInfo> cbt_info(const std::string& volume) const;
  Result<std::vector<uint32_t>> cbt_map(const std::string& volume, const std::string& snapshot,
                                        uint64_t first, uint64_t count);
  Result<CbtChanges> cbt_changes(const std::string& volume, const std::string& generation,
                                 uint64_t since, const std::string& snapshot);
  Status mark_dirty(const std::string& volume, const std::vector<ByteRange>& ranges);

  // Wakes every wait_event() caller (shutdown); later waits return at once.
  void interrupt_waits();

  uint64_t sequence() const { return sequence_.load(); }
  const Params& params() const { return options_.params; }

 private:
  struct Entry {
    std::shared_ptr<Snapshot> snapshot;
    std::map<std::string, std::shared_ptr<SnapshotPart>> parts;  // by volume, while in a chain
  };
  Result<std::shared_ptr<Snapshot>> find(const std::string& id, const char* op) const;  // requires mu_
  SnapshotInfo describe(const Entry& e) const;
  Status check_storage_range(const StorageRange& r, const Snapshot& s) const;  // requires mu_
  // A take being made: saved as taken before the gates close.
  struct PendingTake {
    const Snapshot* snapshot;
    uint32_t sequence;  // the sequence it closes
    uint64_t take_order;
  };
  // Durable: temp file, fsync, rename, fsync of the directory.
  Status save_registry(const PendingTake* pending = nullptr);  // requires mu_
  Status load_registry();
  std::string snapshot_dir(const Uuid& id) const;
  std::string cbt_path(const std::string& volume) const;
  uint64_t volumes_bytes(const std::vector<std::string>& names) const;
  void note(const std::string& msg) const;
  void forget_dropped(const Chain& dropped);  // requires mu_
  std::unique_ptr<DiffStorage> new_storage() const;

  EngineOptions options_;
  std::string staging_prefix_;  // staging_path() without VOLUME.chunks
  std::atomic<uint32_t> sequence_{1};
  mutable std::mutex mu_;  // serializes control operations
  mutable std::shared_mutex volumes_mu_;  // guards volumes_ (add/remove at run time)
  std::vector<std::shared_ptr<Volume>> volumes_;
  std::map<Uuid, Entry> snapshots_;                  // guarded by mu_
  uint64_t next_take_order_ = 1;                     // guarded by mu_
  int lock_fd_ = -1;
  bool started_ = false;
};

// Validates a volume or snapshot name: 1-128 of [A-Za-z0-9._-], not starting
// with '.' or '-'.
Status check_name(const std::string& what, const std::string& name);

}  // namespace nbdsnap
