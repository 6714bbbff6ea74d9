// SnapshotLog: append-only record file; replay, damage detection, concurrency.
#include "snapshot_log.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nbdsnap {

bool operator==(const LogRecord& a, const LogRecord& b) {
  return a.type == b.type && a.key == b.key && a.value == b.value && a.length == b.length;
}

namespace {

constexpr uint64_t kHeader = 64;  // bytes before the first record
constexpr uint64_t kRecord = 24;

std::vector<LogRecord> replay(const std::string& path, Status* st = nullptr) {
  SnapshotLog log;
  std::vector<LogRecord> out;
  Status s = log.replay(path, [&](const LogRecord& r) { out.push_back(r); });
  if (st) *st = s;
  else test::must(s, "replay");
  return out;
}

const std::vector<LogRecord> kRecords = {
    {LogType::kChunk, 3, 16, 65536},
    {LogType::kCbtStamp, 17, 4, 0},
    {LogType::kChunk, 4, 0xffffffffu, 4096},
    {LogType::kCorrupted, 0, ENOSPC, 0},
};

class SnapshotLogTest : public ::testing::Test {
 protected:
  std::string write_log(const std::vector<LogRecord>& records) {
    SnapshotLog log;
    test::must(log.create(path_));
    for (const auto& r : records) test::must(log.append(r));
    test::must(log.sync());
    return path_;
  }
  test::TempDir dir_;
  std::string path_ = dir_.file("vol.log");
};

TEST(SnapshotLog, WithoutAPathItKeepsNothing) {
  SnapshotLog log;
  EXPECT_OK(log.create(""));
  EXPECT_OK(log.append(LogRecord{LogType::kChunk, 1, 2, 3}));
  EXPECT_OK(log.sync());
  EXPECT_EQ(log.path(), "");
}

TEST_F(SnapshotLogTest, ReplayReturnsEveryRecordInOrder) {
  write_log(kRecords);
  EXPECT_EQ(std::filesystem::file_size(path_), kHeader + kRecords.size() * kRecord);
  EXPECT_EQ(replay(path_), kRecords);
}

TEST_F(SnapshotLogTest, CreateTruncatesAnOldLog) {
  write_log(kRecords);
  write_log({kRecords[1]});
  EXPECT_EQ(replay(path_), (std::vector<LogRecord>{kRecords[1]}));
}

TEST_F(SnapshotLogTest, AppendAfterReplayContinuesAtTheEnd) {
  write_log({kRecords[0], kRecords[1]});
  {
    SnapshotLog log;
    ASSERT_OK(log.replay(path_, [](const LogRecord&) {}));
    ASSERT_OK(log.append(kRecords[2]));
  }
  EXPECT_EQ(replay(path_), (std::vector<LogRecord>{kRecords[0], kRecords[1], kRecords[2]}));
}

TEST_F(SnapshotLogTest, RecordReservedButNeverWrittenIsSkipped) {
  write_log(kRecords);
  char zeros[kRecord] = {};
  test::write_raw(path_, kHeader + kRecord, zeros, sizeof zeros);  // record 1 "never written"
  EXPECT_EQ(replay(path_), (std::vector<LogRecord>{kRecords[0], kRecords[2], kRecords[3]}));
}

TEST_F(SnapshotLogTest, TornRecordAtTheEndIsIgnored) {
  write_log(kRecords);
  std::filesystem::resize_file(path_, kHeader + 2 * kRecord + 10);
  EXPECT_EQ(replay(path_), (std::vector<LogRecord>{kRecords[0], kRecords[1]}));
}

TEST_F(SnapshotLogTest, DamagedRecordIsEBADMSGNamingTheFileAndRecord) {
  write_log(kRecords);
  auto byte = test::read_raw(path_, kHeader + 2 * kRecord + 5, 1);
  byte[0] ^= 0x40;
  test::write_raw(path_, kHeader + 2 * kRecord + 5, byte.data(), 1);
  Status st;
  replay(path_, &st);
  EXPECT_EQ(st.code(), EBADMSG);
  EXPECT_CONTAINS(st.message(), path_);
  EXPECT_CONTAINS(st.message(), "record 2");
}

TEST_F(SnapshotLogTest, DamagedHeaderIsEBADMSG) {
  write_log(kRecords);
  char bad = 'X';
  test::write_raw(path_, 0, &bad, 1);
  Status st;
  replay(path_, &st);
  EXPECT_EQ(st.code(), EBADMSG);
  EXPECT_CONTAINS(st.message(), path_);
}

TEST_F(SnapshotLogTest, TruncatedHeaderIsEBADMSG) {
  write_log(kRecords);
  std::filesystem::resize_file(path_, 10);
  Status st;
  replay(path_, &st);
  EXPECT_EQ(st.code(), EBADMSG);
}

TEST_F(SnapshotLogTest, MissingLogIsENOENT) {
  Status st;
  replay(dir_.file("absent.log"), &st);
  EXPECT_EQ(st.code(), ENOENT);
}

TEST_F(SnapshotLogTest, ConcurrentAppendsAllSurvive) {
  SnapshotLog log;
  ASSERT_OK(log.create(path_));
  constexpr uint32_t kThreads = 4, kEach = 2000;
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (uint32_t i = 0; i < kEach; ++i) ASSERT_OK(log.append(LogRecord{LogType::kChunk, t * kEach + i, t, i}));
    });
  for (auto& th : threads) th.join();
  auto records = replay(path_);
  ASSERT_EQ(records.size(), size_t{kThreads} * kEach);
  std::vector<uint32_t> keys;
  for (const auto& r : records) {
    EXPECT_EQ(r.value, r.key / kEach);
    EXPECT_EQ(r.length, r.key % kEach);
    keys.push_back(r.key);
  }
  std::sort(keys.begin(), keys.end());
  for (uint32_t i = 0; i < keys.size(); ++i) ASSERT_EQ(keys[i], i);
}

}  // namespace
}  // namespace nbdsnap
