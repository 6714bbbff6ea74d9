#include "geometry.h"

namespace nbdsnap {
namespace {

uint32_t choose_shift(uint64_t size, uint32_t min_shift, uint64_t max_count, uint32_t max_shift) {
  uint32_t shift = min_shift;
  while (shift < max_shift && ((size + (uint64_t{1} << shift) - 1) >> shift) > max_count) ++shift;
  return shift;
}

}  // namespace

Geometry::Geometry(uint64_t size, const Params& p)
    : Geometry(size,
               choose_shift(size, p.chunk_minimum_shift, p.chunk_maximum_count, p.chunk_maximum_shift),
               choose_shift(size, p.tracking_block_minimum_shift, p.tracking_block_maximum_count,
                            p.tracking_block_maximum_shift)) {}

Geometry::Geometry(uint64_t size, uint32_t chunk_shift, uint32_t cbt_shift)
    : size_(size), chunk_shift_(chunk_shift), cbt_shift_(cbt_shift) {}

}  // namespace nbdsnap
