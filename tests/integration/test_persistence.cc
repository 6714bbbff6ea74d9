// Snapshots and CBT survive nbdkit restarts: a clean stop (SIGTERM) and a
// crash (kill -9 after the overwrite was acknowledged, same boot). After
// either, the snapshot export still serves the pre-take data, the origin
// has every acknowledged write, and the CBT history keeps its generation
// with exactly the changed blocks.
#include <algorithm>
#include <atomic>
#include <map>
#include <random>

#include "nbdkit_fixture.h"
#include "stamp.h"

namespace nbdsnap::it {
namespace {

class Persistence : public NbdkitTest {
 protected:
  static constexpr uint64_t kSize = 16 * MiB;
  void restart_keeps_snapshot_and_cbt(bool crash);

  // Generation from `nbdsnap-link --json cbt-info vol0`.
  std::string cli_generation() {
    if (link_tool_.empty()) return "";
    auto r = run_command({link_tool_, "--socket", control_socket_, "--json", "cbt-info", kVolume});
    const std::string key = "\"generation\":\"";
    size_t at = r.out.find(key);
    if (r.exit_code != 0 || at == std::string::npos) return "error: " + r.out + r.err;
    at += key.size();
    return r.out.substr(at, r.out.find('"', at) - at);
  }
};

// Reads the whole export and compares every block with the generation
// expected for it (seq_of(offset)). Returns the first problems.
template <typename SeqOf>
std::string check_blocks(nbd_handle* h, uint64_t size, SeqOf seq_of, const char* what) {
  std::vector<char> buf(size);
  std::string e = nbd_read_all(h, buf.data(), size, 0);
  if (!e.empty()) return std::string(what) + ": " + e;
  std::string problems;
  int bad = 0;
  for (uint64_t b = 0; b < size; b += kBlock) {
    std::string why = check_block(buf.data() + b, b, seq_of(b));
    if (!why.empty() && ++bad <= 8) problems += std::string(what) + ": block at " + std::to_string(b) + ": " + why + "\n";
  }
  if (bad > 8) problems += std::to_string(bad) + " bad blocks in all\n";
  return problems;
}

void Persistence::restart_keeps_snapshot_and_cbt(bool crash) {
  ASSERT_NO_FATAL_FAILURE(start_stamped(kSize, 1));
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> buf(kSize);

  auto taken = snapshot("s1", kSize);
  ASSERT_TRUE(IsOk(taken));
  const uint64_t take_seq = taken->take().sequence();
  auto before = cbt_info();
  ASSERT_TRUE(IsOk(before));
  const uint64_t cbt_block = before->cbt_info().block_size();
  ASSERT_GT(cbt_block, 0u);

  // Overwrite: the first half entirely; then one 4 KiB block in every third
  // CBT block of the second half (some chunks copied, some not).
  std::map<uint64_t, uint64_t> written;  // block offset -> generation
  stamp_range(buf.data(), 0, kSize / 2, 2);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), kSize / 2, 0), "");
  for (uint64_t b = 0; b < kSize / 2; b += kBlock) written[b] = 2;
  for (uint64_t cb = kSize / 2; cb < kSize; cb += 3 * cbt_block) {
    uint64_t b = cb + (cb / cbt_block % 4) * kBlock;
    stamp_block(buf.data(), b, 2);
    ASSERT_NE(nbd_pwrite(h.get(), buf.data(), kBlock, b, 0), -1) << nbd_get_error();
    written[b] = 2;
  }
  ASSERT_NE(nbd_flush(h.get(), 0), -1) << nbd_get_error();  // acknowledged
  h.reset();
  auto seq_before = cbt_info();
  ASSERT_TRUE(IsOk(seq_before));

  if (crash) {
    kill_server();
  } else {
    ASSERT_TRUE(stop());
  }
  ASSERT_TRUE(restart());

  auto i = info("s1");
  ASSERT_TRUE(IsOk(i));
  EXPECT_EQ(i->info().snapshot().state(), link::TAKEN) << i->info().snapshot().error();
  EXPECT_EQ(i->info().snapshot().sequence(), take_seq);
  ASSERT_EQ(i->info().snapshot().exports_size(), 1);
  EXPECT_EQ(i->info().snapshot().exports(0), "vol0@s1");

  auto after = cbt_info();
  ASSERT_TRUE(IsOk(after));
  EXPECT_EQ(after->cbt_info().generation(), before->cbt_info().generation()) << "CBT history was reset";
  EXPECT_EQ(after->cbt_info().sequence(), seq_before->cbt_info().sequence());
  if (!link_tool_.empty()) {
    EXPECT_EQ(cli_generation(), before->cbt_info().generation());
  }

  NbdPtr snap = open("vol0@s1", {}, &err);
  ASSERT_TRUE(snap) << err;
  EXPECT_EQ(check_blocks(snap.get(), kSize, [](uint64_t) { return 1; }, "snapshot"), "");
  NbdPtr origin = open(kVolume, {}, &err);
  ASSERT_TRUE(origin) << err;
  auto seq_of = [&](uint64_t b) { return written.count(b) ? written[b] : 1; };
  EXPECT_EQ(check_blocks(origin.get(), kSize, seq_of, "origin"), "");

  // CBT since the take: exactly the CBT blocks that were written.
  auto changes = cbt_changes(after->cbt_info().generation(), take_seq);
  ASSERT_TRUE(IsOk(changes));
  std::vector<std::pair<uint64_t, uint64_t>> expected;
  for (const auto& [b, seq] : written) {
    uint64_t start = b / cbt_block * cbt_block;
    if (!expected.empty() && expected.back().first + expected.back().second >= start) {
      expected.back().second = std::max(expected.back().second, start + cbt_block - expected.back().first);
    } else {
      expected.push_back({start, cbt_block});
    }
  }
  std::vector<std::pair<uint64_t, uint64_t>> got;
  for (const auto& r : changes->cbt_changes().ranges()) got.push_back({r.offset(), r.length()});
  EXPECT_EQ(got, expected);

  // Copy-before-write still works for the restored snapshot: a chunk that
  // was not copied before the restart gets copied now.
  uint64_t fresh = kSize / 2 + cbt_block;  // a CBT block skipped above
  ASSERT_FALSE(written.count(fresh));
  stamp_block(buf.data(), fresh, 3);
  ASSERT_NE(nbd_pwrite(origin.get(), buf.data(), kBlock, fresh, 0), -1) << nbd_get_error();
  ASSERT_EQ(nbd_read_all(snap.get(), buf.data(), kBlock, fresh), "");
  EXPECT_EQ(check_block(buf.data(), fresh, 1), "");
  ASSERT_EQ(nbd_read_all(origin.get(), buf.data(), kBlock, fresh), "");
  EXPECT_EQ(check_block(buf.data(), fresh, 3), "");
}

TEST_F(Persistence, CleanRestartKeepsSnapshotExportDataAndCbtGeneration) {
  restart_keeps_snapshot_and_cbt(false);
}

TEST_F(Persistence, KillNineAfterAcknowledgedWritesKeepsSnapshotOriginAndCbtGeneration) {
  restart_keeps_snapshot_and_cbt(true);
}

TEST_F(Persistence, KillNineDuringConcurrentWritesLosesNoAcknowledgedWriteAndKeepsTheSnapshot) {
  // Two clients write generation-2 blocks in random order, without flush;
  // nbdkit is killed in the middle. Every acknowledged write must be on the
  // origin after restart, every other block is old or new but intact, and
  // the snapshot is exactly the pre-take data.
  ASSERT_NO_FATAL_FAILURE(start_stamped(kSize, 1));
  std::string err;
  auto taken = snapshot("s1", kSize);
  ASSERT_TRUE(IsOk(taken));
  auto before = cbt_info();
  ASSERT_TRUE(IsOk(before));

  std::vector<uint64_t> blocks;
  for (uint64_t b = 0; b < kSize; b += kBlock) blocks.push_back(b);
  std::mt19937_64 rng(std::random_device{}());
  std::shuffle(blocks.begin(), blocks.end(), rng);
  constexpr int kWriters = 2;
  std::atomic<int> acked{0};
  std::vector<std::vector<uint64_t>> acked_by(kWriters);
  std::vector<std::thread> writers;
  for (int t = 0; t < kWriters; ++t) {
    writers.emplace_back([&, t] {
      NbdPtr h = nbd_open(nbd_socket_, kVolume);
      if (!h) return;
      std::vector<char> block(kBlock);
      for (size_t i = t; i < blocks.size(); i += kWriters) {
        stamp_block(block.data(), blocks[i], 2);
        if (nbd_pwrite(h.get(), block.data(), kBlock, blocks[i], 0) == -1) return;  // killed
        acked_by[t].push_back(blocks[i]);
        ++acked;
      }
    });
  }
  auto deadline = Clock::now() + std::chrono::seconds(30);
  while (acked < static_cast<int>(blocks.size() / 16) && Clock::now() < deadline)
    std::this_thread::yield();
  kill_server();
  for (auto& w : writers) w.join();
  std::map<uint64_t, bool> acknowledged;
  for (const auto& list : acked_by)
    for (uint64_t b : list) acknowledged[b] = true;
  std::printf("%zu of %zu writes acknowledged before kill -9\n", acknowledged.size(), blocks.size());
  ASSERT_GT(acknowledged.size(), 0u);
  ASSERT_LT(acknowledged.size(), blocks.size()) << "the writers finished before the kill";

  ASSERT_TRUE(restart());
  auto i = info("s1");
  ASSERT_TRUE(IsOk(i));
  EXPECT_EQ(i->info().snapshot().state(), link::TAKEN) << i->info().snapshot().error();
  NbdPtr snap = open("vol0@s1", {}, &err);
  ASSERT_TRUE(snap) << err;
  EXPECT_EQ(check_blocks(snap.get(), kSize, [](uint64_t) { return 1; }, "snapshot"), "");

  NbdPtr origin = open(kVolume, {}, &err);
  ASSERT_TRUE(origin) << err;
  std::vector<char> got(kSize);
  ASSERT_EQ(nbd_read_all(origin.get(), got.data(), kSize, 0), "");
  int bad = 0;
  for (uint64_t b = 0; b < kSize; b += kBlock) {
    std::string why = check_block(got.data() + b, b, 2);
    if (!why.empty() && !acknowledged.count(b)) why = check_block(got.data() + b, b, 1).empty() ? "" : why;
    if (!why.empty() && ++bad <= 8) ADD_FAILURE() << "origin block at " << b << (acknowledged.count(b) ? " (acknowledged)" : "") << ": " << why;
  }
  EXPECT_EQ(bad, 0);

  // CBT: same generation, and every acknowledged write is a change.
  auto after = cbt_info();
  ASSERT_TRUE(IsOk(after));
  ASSERT_EQ(after->cbt_info().generation(), before->cbt_info().generation()) << "CBT history was reset";
  auto changes = cbt_changes(after->cbt_info().generation(), taken->take().sequence());
  ASSERT_TRUE(IsOk(changes));
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& r : changes->cbt_changes().ranges()) ranges.push_back({r.offset(), r.length()});
  int missing = 0;
  for (const auto& [b, yes] : acknowledged) {
    bool in = std::any_of(ranges.begin(), ranges.end(),
                          [&](const auto& r) { return b >= r.first && b + kBlock <= r.first + r.second; });
    if (!in && ++missing <= 8) ADD_FAILURE() << "acknowledged write at " << b << " missing from CBT changes";
  }
  EXPECT_EQ(missing, 0);
}

}  // namespace
}  // namespace nbdsnap::it
