#include "u32_map.h"

namespace nbdsnap {

U32Map::U32Map() : shards_(new Shard[kShards]) {}

uint32_t U32Map::hash(uint32_t key) {
  // Murmur3 finalizer: spreads sequential chunk numbers over shards and slots.
  key ^= key >> 16;
  key *= 0x85ebca6bu;
  key ^= key >> 13;
  key *= 0xc2b2ae35u;
  key ^= key >> 16;
  return key;
}

void U32Map::place(std::vector<Entry>& slots, Entry e) {
  size_t mask = slots.size() - 1;
  size_t i = (hash(e.key_plus_one - 1) >> kShardBits) & mask;
  while (slots[i].key_plus_one != 0) i = (i + 1) & mask;
  slots[i] = e;
}

std::optional<uint32_t> U32Map::find(uint32_t key) const {
  uint32_t h = hash(key);
  const Shard& s = shards_[h & (kShards - 1)];
  std::shared_lock lock(s.mu);
  if (s.slots.empty()) return std::nullopt;
  size_t mask = s.slots.size() - 1;
  for (size_t i = (h >> kShardBits) & mask;; i = (i + 1) & mask) {
    const Entry& e = s.slots[i];
    if (e.key_plus_one == 0) return std::nullopt;
    if (e.key_plus_one == key + 1) return e.value;
  }
}

bool U32Map::insert(uint32_t key, uint32_t value, uint32_t* existing) {
  uint32_t h = hash(key);
  Shard& s = shards_[h & (kShards - 1)];
  std::unique_lock lock(s.mu);
  if (!s.slots.empty()) {
    size_t mask = s.slots.size() - 1;
    for (size_t i = (h >> kShardBits) & mask;; i = (i + 1) & mask) {
      const Entry& e = s.slots[i];
      if (e.key_plus_one == 0) break;
      if (e.key_plus_one == key + 1) {
        if (existing) *existing = e.value;
        return false;
      }
    }
  }
  if ((s.used + 1) * 10 > s.slots.size() * 7) {
    std::vector<Entry> bigger(s.slots.empty() ? 16 : s.slots.size() * 2, Entry{0, 0});
    for (const Entry& e : s.slots)
      if (e.key_plus_one != 0) place(bigger, e);
    s.slots.swap(bigger);
  }
  place(s.slots, Entry{key + 1, value});
  ++s.used;
  return true;
}

size_t U32Map::size() const {
  size_t n = 0;
  for (size_t i = 0; i < kShards; ++i) {
    std::shared_lock lock(shards_[i].mu);
    n += shards_[i].used;
  }
  return n;
}

size_t U32Map::memory_bytes() const {
  size_t n = kShards * sizeof(Shard);  // the shard array itself
  for (size_t i = 0; i < kShards; ++i) {
    std::shared_lock lock(shards_[i].mu);
    n += shards_[i].slots.capacity() * sizeof(Entry);
  }
  return n;
}

void U32Map::for_each(const std::function<void(uint32_t, uint32_t)>& fn) const {
  for (size_t i = 0; i < kShards; ++i) {
    std::shared_lock lock(shards_[i].mu);
    for (const Entry& e : shards_[i].slots)
      if (e.key_plus_one != 0) fn(e.key_plus_one - 1, e.value);
  }
}

}  // namespace nbdsnap
