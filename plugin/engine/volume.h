// Volume: one origin (image file or block device) and everything that
// happens on it: origin I/O with copy-before-write, reads of its snapshots,
// its CBT map, and its snapshot chain.
//
// The chain lists the SnapshotParts on this volume, oldest first. Copies go
// only to the newest live, healthy part (O(1) write cost); a part resolves a
// chunk through its own table, then the newer parts' tables, then the origin.
// The chain changes only with the write gate closed (take, destroy), so
// writers read it without a lock; snapshot readers take a reference to it.
//
// Copies are stored asynchronously (DESIGN 4.1, blksnap's store queue): a
// first write reads the old chunk into a staging entry, logs it as staged and
// goes on; a storer thread writes the slot, logs it as stored and only then
// puts it in the table and releases the chunk, which the copy holds exclusively
// until then (so snapshot reads of it wait for the slot). A write waits for a
// free staging entry before it enters the gate, never inside it: a take does
// not wait for the disk. A copy whose target fails goes to the next older
// snapshot instead, from the same staged bytes.
//
// Locking order: write gate (shared) -> one chunk lock at a time. Snapshot
// readers take only chunk locks. All I/O methods are safe for concurrent use;
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
  // Copies staged and not stored yet: chunk -> the part they go to. A write
  // to such a chunk needs no copy for that part and does not wait for it.
  bool staged_for(ChunkIndex c, const SnapshotPart* part);
  void set_staged(ChunkIndex c, const SnapshotPart* part);  // null: stored or dropped
  size_t copies_needed(uint64_t offset, uint64_t length, const Chain& chain);
  static size_t copy_target(const Chain& chain);  // 1 + index of the target, 0: none
  Status preserve(ChunkIndex c, const std::shared_ptr<const Chain>& chain, std::vector<uint32_t>* entries);
  void store(Staged& job);
  Status store_into(SnapshotPart& part, ChunkIndex c, SlotAddress slot, const char* data, uint32_t len);
  struct Hit {
    const SnapshotPart* part = nullptr;
    SlotAddress slot = 0;
  };
  static Hit resolve(const Chain& chain, size_t from, ChunkIndex c);
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
  struct alignas(64) StagedShard {
    std::mutex mu;
    std::unordered_map<uint32_t, const SnapshotPart*> parts;
  };
  static constexpr size_t kStagedShards = 64;
  std::unique_ptr<StagedShard[]> staged_{new StagedShard[kStagedShards]};
  // Last: its storer threads run jobs that use the members above.
  std::unique_ptr<StoreQueue> store_;
};

}  // namespace nbdsnap
