// Volume: one origin (image file or block device) and everything that
// happens on it: origin I/O with copy-before-write, reads of its snapshots,
// its CBT map, and its snapshot chain.
//
// The chain lists the SnapshotParts on this volume, oldest first. Copies go
// only to the newest live, healthy part (O(1) write cost); a part resolves a
// chunk through its own copy (in its table or staged), then the newer parts'
// copies, then the origin.
// The chain changes only with the write gate closed (take, destroy), so
// writers read it without a lock; snapshot readers take a reference to it.
//
// Copies are stored asynchronously (DESIGN 4.1, blksnap's store queue): a
// first write reads the old chunk into a staging entry, logs it as staged and
// goes on; a storer thread writes the slot, logs it as stored, puts it in the
// table and only then takes the staged copy out. The chunk lock is held only
// while the copy is read and staged: a snapshot read of a chunk whose copy is
// staged copies the staging entry (pinned while it does), and a write for a
// newer snapshot copies the chunk again without waiting for the older copy's
// slot write. A write waits for a free staging entry before it enters the
// gate, not inside it (except a request that needs more copies than the
// staging area holds): a take waits for no slot write. A copy whose target
// fails goes to the next older snapshot that needs it instead, from the same
// staged bytes, or is dropped if none does.
//
// Locking order: write gate (shared) -> one chunk lock at a time -> a staged
// shard's mutex -> a table's shard mutex. Snapshot readers take only chunk
// locks and what follows them. All I/O methods are safe for concurrent use;
// chain methods are for the engine, which serializes them.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cbt_map.h"
#include "chunk_locks.h"
#include "geometry.h"
#include "origin_writer.h"
#include "params.h"
#include "snapshot.h"
#include "store_queue.h"
#include "status.h"
#include "write_gate.h"

namespace nbdsnap {

struct Extent {
  uint64_t offset;
  uint64_t length;
  bool hole;  // reads as zeros and is not allocated
};

struct ByteRange {
  uint64_t offset;
  uint64_t length;
};

class Volume {
 public:
  // Opens PATH (file or block device) read-write. cbt_path "" keeps the CBT
  // map in memory only; staging_path "" stages copies in memory only (no
  // recovery of staged copies after a crash). `sequence` is the engine's
  // current sequence number.
  static Result<std::unique_ptr<Volume>> open(const std::string& name, const std::string& path,
                                              const Params& params, const std::string& cbt_path,
                                              const std::string& staging_path,
                                              const std::atomic<uint32_t>* sequence);
  ~Volume();

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }
  const Geometry& geometry() const { return geometry_; }
  uint64_t size() const { return geometry_.size(); }
  bool is_block_device() const { return block_device_; }
  // Why the CBT history was reset when the volume opened ("" if kept).
  const std::string& cbt_reset_reason() const { return cbt_reset_reason_; }
  CbtMap& cbt() { return cbt_; }
  dev_t device() const { return dev_; }
  ino_t inode() const { return ino_; }

  // After removal: every later I/O fails with EIO.
  void retire() { retired_.store(true, std::memory_order_release); }

  // --- export VOLUME (read-write) ---
  Status read(void* buf, uint64_t length, uint64_t offset);
  Status write(const void* buf, uint64_t length, uint64_t offset, bool fua);
  Status trim(uint64_t length, uint64_t offset, bool fua);
  Status zero(uint64_t length, uint64_t offset, bool may_trim, bool fua);
  // Waits for the copies staged so far to be stored, then syncs the origin.
  Status flush();
  Status extents(uint64_t length, uint64_t offset, std::vector<Extent>* out);

  // --- export VOLUME@SNAPSHOT (read-only) ---
  Status read_snapshot(const SnapshotPart& part, void* buf, uint64_t length, uint64_t offset);
  Status snapshot_extents(const SnapshotPart& part, uint64_t length, uint64_t offset,
                          std::vector<Extent>* out);

  // --- change tracking ---
  Status mark_dirty(uint64_t offset, uint64_t length);
  // Stamps of blocks [first, first+count), live (part null) or as frozen at
  // the part's take.
  Result<std::vector<uint32_t>> cbt_stamps(const SnapshotPart* part, uint64_t first, uint64_t count);
  // Merged byte ranges whose stamp is > since, live or frozen at the part.
  Result<std::vector<ByteRange>> cbt_changes(const SnapshotPart* part, uint64_t since);

  // --- copies on their way to difference storage ---
  // Returns once every copy staged before the call is stored (or failed).
  void drain_stores() { store_->drain(); }
  // Restart: stores a copy that was staged (logged kStaged) but not stored
  // before a crash, from the staging file, and records it in the part.
  Status restore_staged(SnapshotPart& part, ChunkIndex c, SlotAddress slot, uint32_t entry, uint32_t length);
  // Puts a new staging file in place (StoreQueue::commit): after restart.
  Status commit_staging() { return store_->commit(); }
  // Tests: while held, staged copies are not stored.
  void hold_stores_for_test(bool held) { store_->hold_for_test(held); }

  // --- chain (engine only) ---
  WriteGate& gate() { return gate_; }
  std::shared_ptr<const Chain> chain() const;
  // With the gate closed: adds the newest part.
  void push_part(std::shared_ptr<SnapshotPart> part);
  // With the gate closed: hides the part, then drops hidden parts that no
  // older part needs any more. Returns the dropped parts.
  Chain hide_part(const SnapshotPart* part);
  // Restart only: installs a chain (oldest first).
  void restore_chain(Chain chain);

 private:
  Volume(std::string name, std::string path, int fd, const Geometry& g,
         const std::atomic<uint32_t>* sequence);
  template <typename Apply>
  Status modify(uint64_t offset, uint64_t length, const char* op, Apply&& apply);
  void stamp(uint64_t offset, uint64_t length, uint32_t seq, const Chain* chain, Status* log_error);
  struct Staged;
  struct Hit {
    const SnapshotPart* part = nullptr;  // null: no part holds a copy
    SlotAddress slot = 0;                // in part's table, unless staged
    bool staged = false;                 // the copy is in staging entry `entry`
    uint32_t entry = 0;
  };
  // The first of chain[from, to) that holds a copy of c: in its table, or
  // staged for it (a staged copy ends in that part's table, or falls back to
  // an older part that needs it). A copy found stays valid for every part
  // from `from` on; "none" is final only under c's chunk lock (shared or
  // exclusive), which keeps copies of c from being staged. pin: a staged
  // copy found stays in its entry until unpin().
  Hit find_copy(const Chain& chain, size_t from, size_t to, ChunkIndex c, bool pin);
  void add_staged(ChunkIndex c, const SnapshotPart* part, uint32_t entry);
  void move_staged(ChunkIndex c, uint32_t entry, const SnapshotPart* part);  // falls back to part
  // The copy is stored (or dropped): gone from find_copy; its entry goes
  // back to the store queue now, or with the last reader's unpin().
  void unstage(ChunkIndex c, uint32_t entry);
  void unpin(ChunkIndex c, uint32_t entry);
  size_t copies_needed(uint64_t offset, uint64_t length, const Chain& chain);
  static size_t copy_target(const Chain& chain);  // 1 + index of the target, 0: none
  Status preserve(ChunkIndex c, const std::shared_ptr<const Chain>& chain, std::vector<uint32_t>* entries);
  void store(Staged& job);
  Status store_into(SnapshotPart& part, ChunkIndex c, SlotAddress slot, const char* data, uint32_t len);
  static size_t position(const Chain& chain, const SnapshotPart* part);
  Status readable(const SnapshotPart& part) const;
  Status usable(const char* op) const;
  Status read_piece(const SnapshotPart& part, const Piece& p, char* buf);
  Status origin_extents(uint64_t length, uint64_t offset, std::vector<Extent>* out);
  uint32_t frozen_stamp(const Chain& chain, size_t pos, CbtBlockIndex b, uint64_t taken_seq) const;

  // Constant after construction.
  const std::string name_;
  const std::string path_;
  const int fd_;
  const Geometry geometry_;
  const std::atomic<uint32_t>* const sequence_;
  bool block_device_ = false;
  // Regular files only: their buffered writes serialize on the inode lock.
  // Writes under 256 KiB go through it, larger ones are written directly.
  std::unique_ptr<OriginWriter> writer_;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  std::string cbt_reset_reason_;

  std::atomic<bool> retired_{false};
  CbtMap cbt_;
  WriteGate gate_;
  ChunkLocks locks_;
  // Replaced only with the gate closed and chain_mu_ held; writers read it
  // under the gate, readers copy it under chain_mu_.
  std::shared_ptr<const Chain> chain_;
  mutable std::mutex chain_mu_;
  // Staged copies by chunk: usually one, two or more when a chunk is copied
  // again for a newer snapshot before its older copy is stored.
  struct StagedCopy {
    const SnapshotPart* part;  // where it goes; null: stored, pinned by readers
    uint32_t entry;
    uint32_t readers = 0;  // snapshot readers copying from the entry
  };
  struct alignas(64) StagedShard {
    std::mutex mu;
    std::unordered_multimap<uint32_t, StagedCopy> copies;
  };
  static constexpr size_t kStagedShards = 64;
  std::unique_ptr<StagedShard[]> staged_{new StagedShard[kStagedShards]};
  StagedShard& staged_shard(ChunkIndex c) { return staged_[to_u32(c) % kStagedShards]; }
  // Last: its storer threads run jobs that use the members above.
  std::unique_ptr<StoreQueue> store_;
};

}  // namespace nbdsnap
