// Params: blksnap defaults, set() parsing and validate(); errors name the key.
#include "params.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace nbdsnap {
namespace {

TEST(Params, DefaultsAreBlksnapsAndValid) {
  Params p;
  EXPECT_EQ(p.tracking_block_minimum_shift, 16u);
  EXPECT_EQ(p.tracking_block_maximum_count, 2097152u);
  EXPECT_EQ(p.tracking_block_maximum_shift, 26u);
  EXPECT_EQ(p.chunk_minimum_shift, 18u);
  EXPECT_EQ(p.chunk_maximum_count, 2097152u);
  EXPECT_EQ(p.chunk_maximum_shift, 26u);
  EXPECT_EQ(p.chunk_maximum_in_queue, 16u);
  EXPECT_EQ(p.free_diff_buffer_pool_size, 128u);
  EXPECT_EQ(p.diff_storage_minimum, 2097152u);
  EXPECT_EQ(p.diff_storage_minimum_bytes(), 2097152u * 512);
  EXPECT_EQ(p.diff_storage_zero_fill, 0u) << "not blksnap's: off unless asked for";
  EXPECT_OK(p.validate());
}

TEST(Params, SetParsesEveryKnownKey) {
  const char* keys[] = {"tracking_block_minimum_shift", "tracking_block_maximum_count",
                        "tracking_block_maximum_shift", "chunk_minimum_shift",
                        "chunk_maximum_count",          "chunk_maximum_shift",
                        "chunk_maximum_in_queue",       "free_diff_buffer_pool_size",
                        "diff_storage_minimum",         "diff_storage_zero_fill"};
  for (const char* k : keys) {
    EXPECT_TRUE(Params::is_key(k)) << k;
    Params p;
    EXPECT_OK(p.set(k, "20"));
  }
  Params p;
  ASSERT_OK(p.set("chunk_minimum_shift", "16"));
  ASSERT_OK(p.set("diff_storage_minimum", "4096"));
  ASSERT_OK(p.set("tracking_block_maximum_count", "8589934592"));  // > 32 bit
  EXPECT_EQ(p.chunk_minimum_shift, 16u);
  EXPECT_EQ(p.diff_storage_minimum, 4096u);
  EXPECT_EQ(p.diff_storage_minimum_bytes(), 4096u * 512);
  EXPECT_EQ(p.tracking_block_maximum_count, 8589934592u);
}

TEST(Params, SetRejectsTextThatIsNotANonNegativeIntegerNamingTheKey) {
  for (const char* bad : {"", "abc", "-1", "12x", " 12", "1.5", "99999999999"}) {
    Params p;
    Status st = p.set("chunk_minimum_shift", bad);
    EXPECT_EQ(st.code(), EINVAL) << "value \"" << bad << "\"";
    EXPECT_CONTAINS(st.message(), "chunk_minimum_shift") << "value \"" << bad << "\"";
    EXPECT_EQ(p.chunk_minimum_shift, 18u) << "a rejected value must not change the parameter";
  }
}

TEST(Params, UnknownKeyIsENOENTAndNamesTheKey) {
  Params p;
  Status st = p.set("chunk_size", "16");
  EXPECT_EQ(st.code(), ENOENT);
  EXPECT_CONTAINS(st.message(), "chunk_size");
  EXPECT_FALSE(Params::is_key("chunk_size"));
  EXPECT_FALSE(Params::is_key(""));
}

struct BadValue {
  const char* key;
  const char* value;
};

TEST(Params, ValidateRejectsEachOutOfRangeValueNamingTheKey) {
  const BadValue cases[] = {
      {"tracking_block_minimum_shift", "11"}, {"tracking_block_minimum_shift", "31"},
      {"tracking_block_maximum_shift", "15"}, {"tracking_block_maximum_shift", "41"},
      {"tracking_block_maximum_count", "0"},  {"chunk_minimum_shift", "11"},
      {"chunk_minimum_shift", "31"},          {"chunk_maximum_shift", "17"},
      {"chunk_maximum_shift", "31"},          {"chunk_maximum_count", "0"},
      {"chunk_maximum_in_queue", "0"},        {"diff_storage_minimum", "7"},
      {"diff_storage_zero_fill", "2"},
  };
  for (const auto& c : cases) {
    Params p;
    ASSERT_OK(p.set(c.key, c.value));
    Status st = p.validate();
    EXPECT_EQ(st.code(), EINVAL) << c.key << "=" << c.value;
    EXPECT_CONTAINS(st.message(), c.key) << c.key << "=" << c.value;
  }
}

TEST(Params, ValidateAcceptsTheBoundaries) {
  Params p;
  ASSERT_OK(p.set("chunk_minimum_shift", "12"));
  ASSERT_OK(p.set("tracking_block_minimum_shift", "12"));
  ASSERT_OK(p.set("diff_storage_minimum", "8"));
  ASSERT_OK(p.set("chunk_maximum_shift", "30"));
  ASSERT_OK(p.set("tracking_block_maximum_shift", "40"));
  EXPECT_OK(p.validate());
}

TEST(Params, EngineStartFailsWithInvalidParamsNamingTheKey) {
  test::TempDir dir;
  EngineOptions o;
  o.volumes = {{"vol", test::make_file(dir.file("vol.img"), test::kMiB)}};
  ASSERT_OK(o.params.set("chunk_maximum_in_queue", "0"));
  Engine e(o);
  Status st = e.start();
  EXPECT_EQ(st.code(), EINVAL);
  EXPECT_CONTAINS(st.message(), "chunk_maximum_in_queue");
}

}  // namespace
}  // namespace nbdsnap
