// Params: the tunables of the engine, named and defaulted as blksnap's module
// parameters (DESIGN section 7). A plain value; validate() before use.
#pragma once

#include <cstdint>
#include <string>

#include "status.h"

namespace nbdsnap {

struct Params {
  // Smallest CBT block: 2^shift bytes.
  uint32_t tracking_block_minimum_shift = 16;
  // CBT block doubles until the block count fits this number...
  uint64_t tracking_block_maximum_count = 2097152;
  // ...or the block reaches 2^shift bytes.
  uint32_t tracking_block_maximum_shift = 26;
  // Same three for the copy-before-write chunk.
  uint32_t chunk_minimum_shift = 18;
  uint64_t chunk_maximum_count = 2097152;
  uint32_t chunk_maximum_shift = 26;
  // Copies on their way to difference storage at once per volume (staging
  // entries); further first writes wait.
  uint32_t chunk_maximum_in_queue = 16;
  // Accepted (blksnap's) and unused: the staging area is the buffer pool.
  uint32_t free_diff_buffer_pool_size = 128;
  // Growth step and low-space threshold (x2), in 512-byte sectors.
  uint64_t diff_storage_minimum = 2097152;
  // Not blksnap's (default off): 1 writes zeros over every range given to
  // append-storage, before the snapshot may use it (regular files only), so
  // that copies overwrite written blocks instead of converting preallocated
  // ones. Costs one write of the range at append time.
  uint32_t diff_storage_zero_fill = 0;

  uint64_t diff_storage_minimum_bytes() const { return diff_storage_minimum * 512; }

  // Sets a parameter from its key and decimal text. EINVAL names the key.
  Status set(const std::string& key, const std::string& value);
  static bool is_key(const std::string& key);
  Status validate() const;
};

}  // namespace nbdsnap
