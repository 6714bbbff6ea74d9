// CRC-32C (Castagnoli) of a byte range, for on-disk headers and records and
// the block checksums of backups. Uses the SSE 4.2 instruction when the CPU
// has it (checked once at start-up), else a table. Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nbdsnap {

uint32_t crc32c(const void* data, size_t length, uint32_t crc = 0);
// The table implementation alone (same results), for tests.
uint32_t crc32c_portable(const void* data, size_t length, uint32_t crc = 0);

}  // namespace nbdsnap
