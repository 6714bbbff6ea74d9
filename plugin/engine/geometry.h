// Geometry: chunk and CBT-block sizes of one volume, and all offset <-> index
// arithmetic (the split of a request into pieces lives here and only here).
//
// Byte offsets are uint64_t; chunk and CBT block indexes are distinct strong
// types so that one is never used for the other. A volume whose size is not a
// multiple of a unit has a short last unit. Immutable after construction.
#pragma once

#include <cstdint>

#include "params.h"

namespace nbdsnap {

enum class ChunkIndex : uint32_t {};
enum class CbtBlockIndex : uint32_t {};

inline uint32_t to_u32(ChunkIndex i) { return static_cast<uint32_t>(i); }
inline uint32_t to_u32(CbtBlockIndex i) { return static_cast<uint32_t>(i); }

// One piece of a request that falls inside one unit (chunk or CBT block).
struct Piece {
  uint64_t unit;         // unit index
  uint64_t offset;       // absolute byte offset of the piece
  uint64_t length;       // bytes in this piece
  uint64_t buf_offset;   // offset of the piece inside the request buffer
  uint64_t unit_offset;  // offset of the piece inside its unit
};

class Geometry {
 public:
  // Chooses the shifts as blksnap does: start at the minimum, double while
  // the count exceeds the maximum count, stop at the maximum shift.
  Geometry(uint64_t size, const Params& params);
  Geometry(uint64_t size, uint32_t chunk_shift, uint32_t cbt_shift);

  uint64_t size() const { return size_; }
  uint32_t chunk_shift() const { return chunk_shift_; }
  uint32_t cbt_shift() const { return cbt_shift_; }
  uint64_t chunk_size() const { return uint64_t{1} << chunk_shift_; }
  uint64_t cbt_block_size() const { return uint64_t{1} << cbt_shift_; }
  uint64_t chunk_count() const { return count(chunk_shift_); }
  uint64_t cbt_block_count() const { return count(cbt_shift_); }

  ChunkIndex chunk_of(uint64_t offset) const {
    return ChunkIndex(static_cast<uint32_t>(offset >> chunk_shift_));
  }
  CbtBlockIndex cbt_block_of(uint64_t offset) const {
    return CbtBlockIndex(static_cast<uint32_t>(offset >> cbt_shift_));
  }
  uint64_t chunk_offset(ChunkIndex c) const { return uint64_t{to_u32(c)} << chunk_shift_; }
  // Length of chunk c: chunk_size, or less for the last chunk.
  uint64_t chunk_length(ChunkIndex c) const { return unit_length(to_u32(c), chunk_shift_); }
  uint64_t cbt_block_offset(CbtBlockIndex b) const { return uint64_t{to_u32(b)} << cbt_shift_; }
  uint64_t cbt_block_length(CbtBlockIndex b) const { return unit_length(to_u32(b), cbt_shift_); }

  // True if [offset, offset+length) lies inside the volume (no overflow).
  bool contains(uint64_t offset, uint64_t length) const {
    return offset <= size_ && length <= size_ - offset;
  }

  // Calls fn(const Piece&) for each chunk piece of [offset, offset+length), in
  // ascending order. Stops early and returns false if fn returns false.
  template <typename Fn>
  bool for_each_chunk_piece(uint64_t offset, uint64_t length, Fn&& fn) const {
    return split(offset, length, chunk_shift_, fn);
  }
  template <typename Fn>
  bool for_each_cbt_piece(uint64_t offset, uint64_t length, Fn&& fn) const {
    return split(offset, length, cbt_shift_, fn);
  }

 private:
  uint64_t count(uint32_t shift) const {
    return (size_ + (uint64_t{1} << shift) - 1) >> shift;
  }
  uint64_t unit_length(uint64_t index, uint32_t shift) const {
    uint64_t start = index << shift;
    uint64_t unit = uint64_t{1} << shift;
    return start >= size_ ? 0 : (size_ - start < unit ? size_ - start : unit);
  }
  template <typename Fn>
  static bool split(uint64_t offset, uint64_t length, uint32_t shift, Fn& fn) {
    uint64_t done = 0;
    while (done < length) {
      uint64_t pos = offset + done;
      uint64_t unit = pos >> shift;
      uint64_t in_unit = pos & ((uint64_t{1} << shift) - 1);
      uint64_t n = (uint64_t{1} << shift) - in_unit;
      if (n > length - done) n = length - done;
      if (!fn(Piece{unit, pos, n, done, in_unit})) return false;
      done += n;
    }
    return true;
  }

  uint64_t size_;
  uint32_t chunk_shift_;
  uint32_t cbt_shift_;
};

}  // namespace nbdsnap
