// crc32c: the known check value, the hardware path against the table at
// every alignment and length, and chaining.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "crc32c.h"

namespace nbdsnap {
namespace {

TEST(Crc32c, CheckValue) {
  // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
  EXPECT_EQ(crc32c("123456789", 9), 0xe3069283u);
  EXPECT_EQ(crc32c_portable("123456789", 9), 0xe3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
}

TEST(Crc32c, MatchesTableAtEveryAlignmentAndLength) {
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(70000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t align = 0; align < 8; ++align)
    for (size_t len : {0, 1, 7, 8, 9, 15, 16, 63, 64, 65, 4095, 4096, 65536})
      ASSERT_EQ(crc32c(buf.data() + align, len), crc32c_portable(buf.data() + align, len))
          << "align " << align << " length " << len;
}

TEST(Crc32c, ChainsLikeOneCall) {
  std::vector<uint8_t> buf(10000);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(i * 31 + 5);
  uint32_t whole = crc32c(buf.data(), buf.size());
  for (size_t cut : {0, 1, 3, 4096, 9999, 10000}) {
    uint32_t a = crc32c(buf.data(), cut);
    EXPECT_EQ(crc32c(buf.data() + cut, buf.size() - cut, a), whole) << "cut at " << cut;
  }
  // A single flipped bit changes the value.
  buf[5000] ^= 0x10;
  EXPECT_NE(crc32c(buf.data(), buf.size()), whole);
}

}  // namespace
}  // namespace nbdsnap
