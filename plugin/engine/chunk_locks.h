// ChunkLocks: a shared/exclusive lock per chunk of one volume, created on
// demand and forgotten when released (memory is proportional to the chunks
// locked right now, not to the volume).
//
// Copy-before-write holds a chunk exclusively while it copies it; a snapshot
// read of a chunk not yet copied holds it shared while it reads the origin
// (DESIGN 4.2, 4.3). A waiter waits for its own chunk only: shard mutexes are
// held for a few instructions, never across I/O. A caller holds at most one
// chunk lock at a time. Safe for concurrent use.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "geometry.h"

namespace nbdsnap {

class ChunkLocks {
 public:
  ChunkLocks();
  void lock_shared(ChunkIndex c);
  void unlock_shared(ChunkIndex c);
  void lock(ChunkIndex c);
  void unlock(ChunkIndex c);

 private:
  struct State {
    uint32_t readers = 0;
    bool writer = false;
    uint32_t waiting_writers = 0;
  };
  struct alignas(64) Shard {
    std::mutex mu;
    std::condition_variable cv;
    std::unordered_map<uint32_t, State> held;
  };
  static constexpr size_t kShards = 64;
  Shard& shard(ChunkIndex c) { return shards_[to_u32(c) % kShards]; }
  std::unique_ptr<Shard[]> shards_;
};

// RAII holders.
class SharedChunkLock {
 public:
  SharedChunkLock(ChunkLocks& l, ChunkIndex c) : l_(l), c_(c) { l_.lock_shared(c_); }
  ~SharedChunkLock() { l_.unlock_shared(c_); }
  SharedChunkLock(const SharedChunkLock&) = delete;
  SharedChunkLock& operator=(const SharedChunkLock&) = delete;

 private:
  ChunkLocks& l_;
  ChunkIndex c_;
};

class ExclusiveChunkLock {
 public:
  ExclusiveChunkLock(ChunkLocks& l, ChunkIndex c) : l_(l), c_(c) { l_.lock(c_); }
  ~ExclusiveChunkLock() { l_.unlock(c_); }
  ExclusiveChunkLock(const ExclusiveChunkLock&) = delete;
  ExclusiveChunkLock& operator=(const ExclusiveChunkLock&) = delete;

 private:
  ChunkLocks& l_;
  ChunkIndex c_;
};

}  // namespace nbdsnap
