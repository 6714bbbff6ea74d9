// Self-checking 4 KiB block stamps for the integration tests.
//
// A stamped block carries a magic, its own byte offset, a sequence number
// (which write generation produced it), pseudo-random filler derived from
// (offset, sequence), and a CRC32 over all of that. Reading a block back
// tells whether it is intact, where it was meant to live and which
// generation wrote it: misplaced, torn and stale blocks are all caught.
// The content is a pure function of (offset, sequence), so any byte range
// of a generation can be regenerated (used for unaligned writes whose
// bytes must agree with the aligned stamps of the same generation).
// Plain functions: safe for concurrent use.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace nbdsnap::it {

constexpr uint64_t kBlock = 4096;
constexpr char kStampMagic[8] = {'N', 'B', 'D', 'S', 'S', 'T', 'M', 'P'};
// Layout: magic[0,8) offset[8,16) sequence[16,24) crc[24,28) filler[28,4096).
constexpr size_t kCrcAt = 24;

// CRC-32 (IEEE 802.3, zlib's): independent of the engine's CRC32C.
inline uint32_t crc32(uint32_t crc, const void* data, size_t n) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  while (n--) crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

inline uint64_t splitmix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint32_t stamp_crc(const unsigned char* b) {
  uint32_t c = crc32(0, b, kCrcAt);
  return crc32(c, b + kCrcAt + 4, kBlock - kCrcAt - 4);
}

// Writes the stamp of the block at `offset` (a multiple of kBlock) for
// `sequence` into buf[0, kBlock).
inline void stamp_block(void* buf, uint64_t offset, uint64_t sequence) {
  auto* b = static_cast<unsigned char*>(buf);
  std::memcpy(b, kStampMagic, 8);
  std::memcpy(b + 8, &offset, 8);
  std::memcpy(b + 16, &sequence, 8);
  uint64_t state = offset * 31 + sequence * 0x51ED27u;
  for (size_t at = kCrcAt + 4; at < kBlock; at += 8) {
    uint64_t r = splitmix64(&state);
    std::memcpy(b + at, &r, std::min<size_t>(8, kBlock - at));
  }
  uint32_t crc = stamp_crc(b);
  std::memcpy(b + kCrcAt, &crc, 4);
}

// Fills buf with the bytes [offset, offset+length) of generation `sequence`
// (any alignment).
inline void stamp_range(void* buf, uint64_t offset, uint64_t length, uint64_t sequence) {
  std::vector<unsigned char> block(kBlock);
  auto* out = static_cast<unsigned char*>(buf);
  uint64_t end = offset + length;
  for (uint64_t b = offset / kBlock * kBlock; b < end; b += kBlock) {
    stamp_block(block.data(), b, sequence);
    uint64_t from = std::max(b, offset), to = std::min(b + kBlock, end);
    std::memcpy(out + (from - offset), block.data() + (from - b), to - from);
  }
}

// "" if buf[0, kBlock) is an intact stamp of (offset, sequence); otherwise
// what is wrong with it.
inline std::string check_block(const void* buf, uint64_t offset, uint64_t sequence) {
  const auto* b = static_cast<const unsigned char*>(buf);
  if (std::memcmp(b, kStampMagic, 8) != 0) {
    bool zero = true;
    for (size_t i = 0; i < kBlock && zero; ++i) zero = b[i] == 0;
    return zero ? "block is all zeros" : "no stamp magic";
  }
  uint64_t got_off, got_seq;
  uint32_t got_crc;
  std::memcpy(&got_off, b + 8, 8);
  std::memcpy(&got_seq, b + 16, 8);
  std::memcpy(&got_crc, b + kCrcAt, 4);
  if (got_crc != stamp_crc(b)) return "CRC mismatch (torn or mixed block)";
  if (got_off != offset) return "stamp of offset " + std::to_string(got_off);
  if (got_seq != sequence) return "sequence " + std::to_string(got_seq) + ", expected " + std::to_string(sequence);
  return "";
}

}  // namespace nbdsnap::it
