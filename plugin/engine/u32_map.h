// U32Map: a concurrent map from uint32 key to uint32 value, used for chunk
// tables (chunk -> slot) and saved CBT stamps (block -> stamp).
//
// Owns its memory: 64 shards, each an open-addressing table of 8-byte entries
// (load kept between 0.35 and 0.7, so 11-23 bytes per entry) behind its own
// shared_mutex. Entries are only inserted, never changed or erased, which is
// what copy-before-write needs ("exactly one copy per chunk per snapshot").
// Safe for concurrent use.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <vector>

namespace nbdsnap {

class U32Map {
 public:
  U32Map();
  U32Map(const U32Map&) = delete;
  U32Map& operator=(const U32Map&) = delete;

  std::optional<uint32_t> find(uint32_t key) const;
  // Inserts key -> value unless key is present. Returns true if inserted;
  // otherwise *existing (if given) receives the value already there.
  bool insert(uint32_t key, uint32_t value, uint32_t* existing = nullptr);
  size_t size() const;
  // Bytes of heap used by the map (shard array and tables).
  size_t memory_bytes() const;
  // Calls fn(key, value) for every entry; fn must not call back into the map.
  void for_each(const std::function<void(uint32_t, uint32_t)>& fn) const;

 private:
  static constexpr unsigned kShardBits = 6;
  static constexpr size_t kShards = size_t{1} << kShardBits;
  struct Entry {
    uint32_t key_plus_one;  // 0 = empty
    uint32_t value;
  };
  struct alignas(64) Shard {
    mutable std::shared_mutex mu;
    std::vector<Entry> slots;  // power-of-two size, or empty
    size_t used = 0;
  };
  static uint32_t hash(uint32_t key);
  static void place(std::vector<Entry>& slots, Entry e);
  std::unique_ptr<Shard[]> shards_;
};

}  // namespace nbdsnap
