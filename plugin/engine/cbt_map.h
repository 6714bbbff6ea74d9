// CbtMap: the live change-tracking map of one volume: one 32-bit stamp per
// CBT block (the sequence number of its last change), and the generation
// UUID of that history.
//
// With a path, the map lives in a file mapped MAP_SHARED: every stamp is in
// the page cache as soon as it is stored, so it survives a kill -9 of the
// process. The header records whether the map was closed cleanly and the
// boot id; an unclean map from another boot (power loss, reboot) cannot be
// trusted and gets a new generation (docs/on-disk-format.md). Without a path,
// the map is anonymous memory (tests).
//
// Frozen views per snapshot are not here: Volume keeps the old stamps that
// later writes overwrite (see volume.h). stamp() is safe for concurrent use;
// open/close/reset need external synchronization.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "geometry.h"
#include "status.h"
#include "uuid.h"

namespace nbdsnap {

class CbtMap {
 public:
  CbtMap() = default;
  ~CbtMap();
  CbtMap(const CbtMap&) = delete;
  CbtMap& operator=(const CbtMap&) = delete;

  // Opens or creates the map for a volume of this geometry. If the stored
  // history cannot be trusted (missing, damaged, other geometry, unclean
  // shutdown across a reboot), starts a new generation with every stamp 0
  // and sets *reset_reason.
  Status open(const std::string& path, const Geometry& geometry, std::string* reset_reason);
  // Flushes the map and marks it clean.
  Status close();
  // Makes stamps durable (msync) without closing.
  Status sync();
  // Forgets the history: new generation, all stamps 0.
  void reset();

  const Uuid& generation() const { return generation_; }
  uint64_t block_count() const { return block_count_; }
  uint32_t load(CbtBlockIndex b) const {
    return std::atomic_ref<uint32_t>(stamps_[to_u32(b)]).load(std::memory_order_acquire);
  }
  // Stores `seq` into block b; returns the previous stamp.
  uint32_t exchange(CbtBlockIndex b, uint32_t seq) {
    return std::atomic_ref<uint32_t>(stamps_[to_u32(b)]).exchange(seq, std::memory_order_acq_rel);
  }

 private:
  Status map_file(int fd, uint64_t bytes, bool create);
  void write_header(bool clean);

  std::string path_;
  int fd_ = -1;
  void* mapping_ = nullptr;
  uint64_t mapping_bytes_ = 0;
  uint32_t* stamps_ = nullptr;
  uint64_t block_count_ = 0;
  uint64_t capacity_ = 0;
  uint32_t block_shift_ = 0;
  Uuid generation_;
};

}  // namespace nbdsnap
