// Randomized single-threaded test against a reference model: a plain byte
// vector for the volume, a copy of it per snapshot at take, and the CBT
// stamps (live and frozen per snapshot). Every read is compared byte for
// byte. The seed is printed; NBDSNAP_SEED=N reproduces a run.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

using test::Harness;
using test::kChunk;
using test::kKiB;
using test::kMiB;

// Not a multiple of 4 KiB, not even of 512: short last chunk and CBT block.
constexpr uint64_t kSize = 2 * kMiB + 12 * kKiB + 300;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kBlocks = (kSize + kBlock - 1) / kBlock;
constexpr uint64_t kStoragePerSnapshot = (kSize + 4095) / 4096 * 4096;
constexpr int kOps = 2000;
constexpr size_t kMaxSnapshots = 6;

struct ModelSnapshot {
  std::string name;
  uint64_t sequence;
  std::vector<char> data;
  std::vector<uint32_t> stamps;
  bool corrupted = false;  // then every read fails with EIO
};

enum class Mode {
  kMemory,        // memory storage, always big enough
  kPersistent,    // state directory, file storage, restarts
  kSmallStorage,  // memory storage of 2..32 chunks: snapshots run out and get corrupted
};

class RandomModel : public ::testing::TestWithParam<Mode> {
 protected:
  void SetUp() override {
    persistent_ = GetParam() == Mode::kPersistent;
    small_storage_ = GetParam() == Mode::kSmallStorage;
    seed_ = test::test_seed(::testing::UnitTest::GetInstance()->current_test_info()->name());
    rng_.seed(seed_);
    Harness::Options o;
    o.volumes = {{"vol", kSize}};
    if (persistent_) {
      o.persistent = true;
      o.storage_factory = nullptr;  // file ranges, one per snapshot, in one sparse file
    }
    h_ = std::make_unique<Harness>(o);
    if (persistent_) storage_ = test::make_file(h_->dir().file("storage"), 400 * kStoragePerSnapshot);
    disk_.assign(kSize, 0);
    stamps_.assign(kBlocks, 0);
  }

  uint64_t rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  // A random request: small, chunk-sized or large; aligned, random or at the end.
  std::pair<uint64_t, uint64_t> range() {
    uint64_t len;
    switch (rand(10)) {
      case 0: case 1: case 2: case 3: case 4: len = 1 + rand(8192); break;
      case 5: case 6: case 7: len = 1 + rand(3 * kChunk); break;
      default: len = 1 + rand(10 * kChunk); break;
    }
    len = std::min(len, kSize);
    uint64_t off;
    switch (rand(10)) {
      case 0: case 1: off = std::min(rand(kSize / kChunk + 1) * kChunk, kSize - len); break;
      case 2: off = kSize - len; break;
      default: off = rand(kSize - len + 1); break;
    }
    return {off, len};
  }

  void stamp(uint64_t off, uint64_t len) {
    for (uint64_t b = off / kBlock; b <= (off + len - 1) / kBlock; ++b) stamps_[b] = seq_;
  }

  void op_write() {
    auto [off, len] = range();
    auto data = test::pattern(len, rng_());
    ASSERT_OK(h_->write(off, data)) << "write " << off << "+" << len;
    std::copy(data.begin(), data.end(), disk_.begin() + static_cast<long>(off));
    stamp(off, len);
  }

  void op_zero_or_trim(bool trim) {
    auto [off, len] = range();
    if (trim) {
      ASSERT_OK(h_->vol()->trim(len, off, rand(2))) << "trim " << off << "+" << len;
      // Trim is advisory: the first one tells whether this file system punches holes.
      auto now = h_->read(off, len);
      bool zeroed = std::all_of(now.begin(), now.end(), [](char c) { return c == 0; });
      if (trim_zeroes_ < 0) trim_zeroes_ = zeroed;
      if (trim_zeroes_) {
        ASSERT_TRUE(zeroed) << "trim " << off << "+" << len << " left data";
        std::fill_n(disk_.begin() + static_cast<long>(off), len, 0);
      }
    } else {
      ASSERT_OK(h_->vol()->zero(len, off, rand(2), rand(2))) << "zero " << off << "+" << len;
      std::fill_n(disk_.begin() + static_cast<long>(off), len, 0);
    }
    stamp(off, len);
  }

  void op_take() {
    if (snaps_.size() >= kMaxSnapshots) return;
    std::string name = "r" + std::to_string(next_++);
    ASSERT_OK(h_->engine().create_snapshot({"vol"}, name, 0));
    StorageRange r{"", 0, kStoragePerSnapshot};
    if (small_storage_) r.length = (2 + rand(31)) * kChunk;
    if (persistent_) r = StorageRange{storage_, (next_ - 1) * kStoragePerSnapshot, kStoragePerSnapshot};
    ASSERT_OK(h_->engine().append_storage(name, {r}));
    auto t = h_->engine().take(name);
    ASSERT_OK(t);
    ASSERT_EQ(t->sequence, seq_);
    snaps_.push_back(ModelSnapshot{name, seq_, disk_, stamps_});
    ++seq_;
  }

  void op_destroy() {
    if (snaps_.empty()) return;
    size_t i = rand(snaps_.size());
    ASSERT_OK(h_->engine().destroy(snaps_[i].name));
    snaps_.erase(snaps_.begin() + static_cast<long>(i));
  }

  // Learns which snapshots the engine has marked corrupted (only expected
  // when storage is small); a corrupted snapshot never becomes healthy again.
  void update_corrupted() {
    for (auto& s : snaps_) {
      auto info = h_->engine().info(s.name);
      ASSERT_OK(info);
      bool corrupted = info->state == SnapshotState::kCorrupted;
      ASSERT_FALSE(s.corrupted && !corrupted) << s.name << " is healthy again";
      if (corrupted && !s.corrupted) {
        ASSERT_TRUE(small_storage_) << s.name << " corrupted: " << info->error.message();
        ASSERT_EQ(info->error.code(), ENOSPC) << info->error.message();
        s.corrupted = true;
        ++corrupted_count_;
      }
    }
  }

  void check_origin(uint64_t off, uint64_t len) {
    auto got = h_->read(off, len);
    ASSERT_TRUE(std::equal(got.begin(), got.end(), disk_.begin() + static_cast<long>(off)))
        << "origin " << off << "+" << len << " differs from the model";
  }

  void check_snapshot(const ModelSnapshot& s, uint64_t off, uint64_t len) {
    std::vector<char> got;
    if (s.corrupted) {
      ASSERT_ERRNO(h_->read_snapshot(s.name, off, len, &got), EIO) << s.name << " is corrupted";
      return;
    }
    ASSERT_OK(h_->read_snapshot(s.name, off, len, &got)) << s.name;
    ASSERT_TRUE(std::equal(got.begin(), got.end(), s.data.begin() + static_cast<long>(off)))
        << "snapshot " << s.name << " " << off << "+" << len << " differs from the model";
  }

  void check_extents(const ModelSnapshot& s) {
    auto ref = h_->engine().open_export("vol@" + s.name);
    ASSERT_OK(ref);
    auto [off, len] = range();
    std::vector<Extent> ext;
    if (s.corrupted) {
      ASSERT_ERRNO(ref->volume->snapshot_extents(*ref->part, len, off, &ext), EIO);
      return;
    }
    ASSERT_OK(ref->volume->snapshot_extents(*ref->part, len, off, &ext));
    uint64_t pos = off;
    for (const Extent& e : ext) {
      ASSERT_EQ(e.offset, pos);
      pos += e.length;
      if (e.hole) {
        ASSERT_TRUE(std::all_of(s.data.begin() + static_cast<long>(e.offset),
                                s.data.begin() + static_cast<long>(e.offset + e.length), [](char c) { return c == 0; }))
            << "snapshot " << s.name << ": hole " << e.offset << "+" << e.length << " holds data";
      }
    }
    ASSERT_EQ(pos, off + len);
  }

  void check_cbt() {
    Engine& e = h_->engine();
    ASSERT_EQ(test::must(e.cbt_map("vol", "", 0, kBlocks)), stamps_) << "live CBT map";
    for (const auto& s : snaps_) {
      if (s.corrupted) continue;
      ASSERT_EQ(test::must(e.cbt_map("vol", s.name, 0, kBlocks)), s.stamps) << "frozen CBT map of " << s.name;
    }
    if (snaps_.size() < 2) return;
    // Changes between two snapshots: blocks whose frozen stamp at the newer
    // one is above the older one's sequence.
    size_t a = rand(snaps_.size() - 1), b = a + 1 + rand(snaps_.size() - a - 1);
    if (snaps_[b].corrupted) return;
    std::string gen = test::must(e.cbt_info("vol")).generation.str();
    auto got = test::must(e.cbt_changes("vol", gen, snaps_[a].sequence, snaps_[b].name)).ranges;
    std::vector<ByteRange> want;
    for (uint64_t blk = 0; blk < kBlocks; ++blk) {
      if (snaps_[b].stamps[blk] <= snaps_[a].sequence) continue;
      uint64_t o = blk * kBlock, l = std::min(kBlock, kSize - o);
      if (!want.empty() && want.back().offset + want.back().length == o) want.back().length += l;
      else want.push_back(ByteRange{o, l});
    }
    ASSERT_EQ(got.size(), want.size()) << "changes " << snaps_[a].name << ".." << snaps_[b].name;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i].offset, want[i].offset);
      ASSERT_EQ(got[i].length, want[i].length);
    }
  }

  void check_all() {
    check_origin(0, kSize);
    for (const auto& s : snaps_) check_snapshot(s, 0, kSize);
    check_cbt();
  }

  void run() {
    for (int i = 0; i < kOps && !HasFatalFailure(); ++i) {
      SCOPED_TRACE("op " + std::to_string(i) + ", NBDSNAP_SEED=" + std::to_string(seed_));
      uint64_t r = rand(100);
      if (r < 30) op_write();
      else if (r < 35) op_zero_or_trim(true);
      else if (r < 42) op_zero_or_trim(false);
      if (r < 42) update_corrupted();
      else if (r < 47) op_take();
      else if (r < 51) op_destroy();
      else if (r < 66) {
        auto [off, len] = range();
        check_origin(off, len);
      } else if (r < 91) {
        if (snaps_.empty()) continue;
        const auto& s = snaps_[rand(snaps_.size())];
        auto [off, len] = range();
        check_snapshot(s, off, len);
      } else if (r < 96) {
        if (!snaps_.empty()) check_extents(snaps_[rand(snaps_.size())]);
      } else {
        check_cbt();
      }
      if (persistent_ && i % 250 == 249) {
        h_->restart_engine();
        check_all();
      }
      if (i % 200 == 199) check_all();
    }
    check_all();
    if (small_storage_) {
      std::printf("[ stats    ] %d snapshots corrupted by exhaustion\n", corrupted_count_);
      EXPECT_GT(corrupted_count_, 0) << "small storage never ran out: the failure path was not exercised";
    }
  }

  bool persistent_ = false;
  bool small_storage_ = false;
  int corrupted_count_ = 0;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<Harness> h_;
  std::string storage_;
  std::vector<char> disk_;
  std::vector<uint32_t> stamps_;
  uint32_t seq_ = 1;
  std::vector<ModelSnapshot> snaps_;
  int next_ = 0;
  int trim_zeroes_ = -1;
};

TEST_P(RandomModel, RandomOperationsMatchTheReferenceModelByteForByte) { run(); }

INSTANTIATE_TEST_SUITE_P(, RandomModel, ::testing::Values(Mode::kMemory, Mode::kPersistent, Mode::kSmallStorage),
                         [](const auto& info) -> std::string {
                           switch (info.param) {
                             case Mode::kMemory: return "InMemory";
                             case Mode::kPersistent: return "PersistentWithRestarts";
                             case Mode::kSmallStorage: return "SmallStorageCorruptsSnapshots";
                           }
                           return "";
                         });

}  // namespace
}  // namespace nbdsnap
