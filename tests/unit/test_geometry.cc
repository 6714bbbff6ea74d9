// Geometry: choice of the chunk and CBT block shifts (blksnap's rule) and the
// split of requests into per-unit pieces.
#include "geometry.h"

#include <gtest/gtest.h>

#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

using test::kGiB;
using test::kKiB;
using test::kMiB;
constexpr uint64_t kTiB = 1024 * kGiB;

std::vector<Piece> chunk_pieces(const Geometry& g, uint64_t offset, uint64_t length) {
  std::vector<Piece> out;
  g.for_each_chunk_piece(offset, length, [&](const Piece& p) {
    out.push_back(p);
    return true;
  });
  return out;
}

void expect_piece(const Piece& p, uint64_t unit, uint64_t offset, uint64_t length, uint64_t buf_offset,
                  uint64_t unit_offset) {
  EXPECT_EQ(p.unit, unit);
  EXPECT_EQ(p.offset, offset);
  EXPECT_EQ(p.length, length);
  EXPECT_EQ(p.buf_offset, buf_offset);
  EXPECT_EQ(p.unit_offset, unit_offset);
}

TEST(Geometry, OneGibibyteWithDefaultsGetsQuarterMebibyteChunksAndSixtyFourKibibyteCbtBlocks) {
  Geometry g(kGiB, Params{});
  EXPECT_EQ(g.chunk_shift(), 18u);
  EXPECT_EQ(g.chunk_size(), 256 * kKiB);
  EXPECT_EQ(g.cbt_shift(), 16u);
  EXPECT_EQ(g.cbt_block_size(), 64 * kKiB);
  EXPECT_EQ(g.chunk_count(), 4096u);
  EXPECT_EQ(g.cbt_block_count(), 16384u);
}

TEST(Geometry, OneTebibyteGrowsTheCbtBlockToHalfAMebibyte) {
  Geometry g(kTiB, Params{});
  // 2^40 / 2^16 = 2^24 blocks > 2^21: doubles three times to 2^19.
  EXPECT_EQ(g.cbt_block_size(), 512 * kKiB);
  EXPECT_EQ(g.cbt_block_count(), 2097152u);
  // The chunk grows by the same rule: 2^40 / 2^18 = 2^22 > 2^21.
  EXPECT_EQ(g.chunk_size(), 512 * kKiB);
  EXPECT_EQ(g.chunk_count(), 2097152u);
}

TEST(Geometry, ShiftStaysAtMinimumUntilTheCountExceedsTheMaximum) {
  Params p;
  // Exactly tracking_block_maximum_count blocks of 64 KiB: no growth.
  Geometry exact(2097152 * 64 * kKiB, p);
  EXPECT_EQ(exact.cbt_shift(), 16u);
  // One byte more needs one more block: the block doubles.
  Geometry more(2097152 * 64 * kKiB + 1, p);
  EXPECT_EQ(more.cbt_shift(), 17u);
  EXPECT_LE(more.cbt_block_count(), p.tracking_block_maximum_count);
}

TEST(Geometry, HugeVolumeCapsBothShiftsAtTheirMaximum) {
  Params p;
  Geometry g(uint64_t{1} << 52, p);  // 4 PiB
  EXPECT_EQ(g.chunk_shift(), p.chunk_maximum_shift);
  EXPECT_EQ(g.cbt_shift(), p.tracking_block_maximum_shift);
  // The count then exceeds the maximum count: the cap wins.
  EXPECT_EQ(g.cbt_block_count(), uint64_t{1} << 26);
  EXPECT_GT(g.cbt_block_count(), p.tracking_block_maximum_count);
}

TEST(Geometry, SmallVolumeUsesTheMinimumShiftsFromParams) {
  Params p = test::small_params();
  Geometry g(test::kVolumeSize, p);
  EXPECT_EQ(g.chunk_shift(), 16u);
  EXPECT_EQ(g.cbt_shift(), 12u);
}

TEST(Geometry, LastChunkIsShortWhenSizeIsNotAMultiple) {
  Geometry g(4 * kMiB + 4 * kKiB, 16, 12);
  EXPECT_EQ(g.chunk_count(), 65u);
  EXPECT_EQ(g.chunk_length(ChunkIndex(63)), 64 * kKiB);
  EXPECT_EQ(g.chunk_length(ChunkIndex(64)), 4 * kKiB);
  EXPECT_EQ(g.chunk_length(ChunkIndex(65)), 0u);  // beyond the end
  EXPECT_EQ(g.chunk_offset(ChunkIndex(64)), 4 * kMiB);

  Geometry odd(10000, 12, 12);  // not even a multiple of 512
  EXPECT_EQ(odd.chunk_count(), 3u);
  EXPECT_EQ(odd.chunk_length(ChunkIndex(2)), 10000u - 8192u);
  EXPECT_EQ(odd.cbt_block_count(), 3u);
  EXPECT_EQ(odd.cbt_block_length(CbtBlockIndex(2)), 10000u - 8192u);
}

TEST(Geometry, ExactMultipleHasNoShortLastChunk) {
  Geometry g(4 * kMiB, 16, 12);
  EXPECT_EQ(g.chunk_count(), 64u);
  EXPECT_EQ(g.chunk_length(ChunkIndex(63)), 64 * kKiB);
  EXPECT_EQ(g.cbt_block_count(), 1024u);
}

TEST(Geometry, IndexAndOffsetConversionsUseTheirOwnShift) {
  Geometry g(4 * kMiB, 16, 12);
  EXPECT_EQ(to_u32(g.chunk_of(64 * kKiB - 1)), 0u);
  EXPECT_EQ(to_u32(g.chunk_of(64 * kKiB)), 1u);
  EXPECT_EQ(to_u32(g.cbt_block_of(64 * kKiB)), 16u);
  EXPECT_EQ(g.cbt_block_offset(CbtBlockIndex(3)), 12 * kKiB);
  EXPECT_EQ(g.cbt_block_length(CbtBlockIndex(3)), 4 * kKiB);
}

TEST(Geometry, UnalignedRequestIsSplitAcrossChunks) {
  Geometry g(4 * kMiB, 16, 12);
  // From 100 bytes before the end of chunk 0 to 100 bytes into chunk 2.
  auto pieces = chunk_pieces(g, 64 * kKiB - 100, 64 * kKiB + 200);
  ASSERT_EQ(pieces.size(), 3u);
  expect_piece(pieces[0], 0, 64 * kKiB - 100, 100, 0, 64 * kKiB - 100);
  expect_piece(pieces[1], 1, 64 * kKiB, 64 * kKiB, 100, 0);
  expect_piece(pieces[2], 2, 128 * kKiB, 100, 64 * kKiB + 100, 0);
}

TEST(Geometry, RequestInsideOneChunkIsOnePieceWithItsOffsetInTheUnit) {
  Geometry g(4 * kMiB, 16, 12);
  auto pieces = chunk_pieces(g, 3 * 64 * kKiB + 777, 1000);
  ASSERT_EQ(pieces.size(), 1u);
  expect_piece(pieces[0], 3, 3 * 64 * kKiB + 777, 1000, 0, 777);
}

TEST(Geometry, PiecesCoverTheRequestExactlyOnceInAscendingOrder) {
  Geometry g(test::kVolumeSize, 16, 12);
  uint64_t offset = 12345, length = test::kVolumeSize - offset;
  uint64_t expect_pos = offset;
  uint64_t total = 0;
  uint64_t last_unit = 0;
  bool first = true;
  g.for_each_chunk_piece(offset, length, [&](const Piece& p) {
    EXPECT_EQ(p.offset, expect_pos);
    EXPECT_EQ(p.buf_offset, p.offset - offset);
    EXPECT_EQ(p.unit, p.offset >> 16);
    EXPECT_EQ(p.unit_offset, p.offset & 0xffff);
    EXPECT_LE(p.unit_offset + p.length, 64 * kKiB);
    if (!first) {
      EXPECT_EQ(p.unit, last_unit + 1);
    }
    first = false;
    last_unit = p.unit;
    expect_pos += p.length;
    total += p.length;
    return true;
  });
  EXPECT_EQ(total, length);
  EXPECT_EQ(last_unit, 64u);  // reaches the short last chunk
}

TEST(Geometry, CbtPiecesUseTheCbtBlockSize) {
  Geometry g(4 * kMiB, 16, 12);
  std::vector<Piece> pieces;
  g.for_each_cbt_piece(4095, 2, [&](const Piece& p) {
    pieces.push_back(p);
    return true;
  });
  ASSERT_EQ(pieces.size(), 2u);
  expect_piece(pieces[0], 0, 4095, 1, 0, 4095);
  expect_piece(pieces[1], 1, 4096, 1, 1, 0);
}

TEST(Geometry, SplitStopsWhenTheCallbackReturnsFalse) {
  Geometry g(4 * kMiB, 16, 12);
  int calls = 0;
  bool done = g.for_each_chunk_piece(0, 4 * kMiB, [&](const Piece& p) {
    ++calls;
    return p.unit < 2;
  });
  EXPECT_FALSE(done);
  EXPECT_EQ(calls, 3);
}

TEST(Geometry, ZeroLengthRequestHasNoPieces) {
  Geometry g(4 * kMiB, 16, 12);
  EXPECT_TRUE(chunk_pieces(g, 1000, 0).empty());
}

TEST(Geometry, ContainsRejectsRangesPastTheEndAndOverflow) {
  Geometry g(4 * kMiB, 16, 12);
  EXPECT_TRUE(g.contains(0, 4 * kMiB));
  EXPECT_TRUE(g.contains(4 * kMiB, 0));
  EXPECT_FALSE(g.contains(4 * kMiB - 1, 2));
  EXPECT_FALSE(g.contains(4 * kMiB + 1, 0));
  EXPECT_FALSE(g.contains(UINT64_MAX, 2));
  EXPECT_FALSE(g.contains(2, UINT64_MAX));
}

}  // namespace
}  // namespace nbdsnap
