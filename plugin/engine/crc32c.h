// CRC-32C (Castagnoli) of a byte range, for on-disk headers and records.
// Pure function; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nbdsnap {

uint32_t crc32c(const void* data, size_t length, uint32_t crc = 0);

}  // namespace nbdsnap
