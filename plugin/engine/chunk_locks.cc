#include "chunk_locks.h"

namespace nbdsnap {

ChunkLocks::ChunkLocks() : shards_(new Shard[kShards]) {}

void ChunkLocks::lock_shared(ChunkIndex c) {
  Shard& s = shard(c);
  std::unique_lock lk(s.mu);
  for (;;) {
    State& st = s.held[to_u32(c)];
    // Writers first: a stream of readers must not starve a copy-before-write.
    if (!st.writer && st.waiting_writers == 0) {
      ++st.readers;
      return;
    }
    s.cv.wait(lk);
  }
}

void ChunkLocks::unlock_shared(ChunkIndex c) {
  Shard& s = shard(c);
  std::lock_guard lk(s.mu);
  auto it = s.held.find(to_u32(c));
  if (--it->second.readers == 0) {
    if (it->second.waiting_writers == 0 && !it->second.writer) s.held.erase(it);
    s.cv.notify_all();
  }
}

void ChunkLocks::lock(ChunkIndex c) {
  Shard& s = shard(c);
  std::unique_lock lk(s.mu);
  State* st = &s.held[to_u32(c)];
  if (st->writer || st->readers) {
    ++st->waiting_writers;
    do {
      s.cv.wait(lk);
      st = &s.held[to_u32(c)];
    } while (st->writer || st->readers);
    --st->waiting_writers;
  }
  st->writer = true;
}

void ChunkLocks::unlock(ChunkIndex c) {
  Shard& s = shard(c);
  std::lock_guard lk(s.mu);
  auto it = s.held.find(to_u32(c));
  it->second.writer = false;
  if (it->second.waiting_writers == 0 && it->second.readers == 0) s.held.erase(it);
  s.cv.notify_all();
}

}  // namespace nbdsnap
