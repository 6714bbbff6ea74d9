// Concurrency: the read/copy race of DESIGN 4.3, one copy per chunk under
// concurrent first writes, atomic takes over several volumes (4.6), and a
// stress run of writers, takes/destroys and snapshot readers with
// self-describing blocks. Seeds are printed; NBDSNAP_SEED=N reproduces the
// random choices (thread interleaving is up to the scheduler).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "test_util.h"

namespace nbdsnap {
namespace {

using test::Harness;
using test::kChunk;
using test::kKiB;
using test::kMiB;
using namespace std::chrono_literals;

// A start line for threads, so that they really run at the same time.
class StartLine {
 public:
  explicit StartLine(int n) : waiting_(n) {}
  void arrive() {
    waiting_.fetch_sub(1);
    while (waiting_.load() > 0) std::this_thread::yield();
  }

 private:
  std::atomic<int> waiting_;
};

// ------------------------------------------------- DESIGN 4.3: read vs copy

// A 2 MiB volume of 4 KiB chunks: many chunks, so races on many of them.
constexpr uint64_t kRaceSize = 2 * kMiB, kSmallChunk = 4 * kKiB, kChunks = kRaceSize / kSmallChunk;
Harness::Options small_chunks() {
  Harness::Options o;
  o.volumes = {{"vol", kRaceSize}};
  test::must(o.params.set("chunk_minimum_shift", "12"), "chunk_minimum_shift");
  return o;
}

TEST(Concurrency, SnapshotReadersNeverSeeDataWrittenAfterTheTake) {
  uint64_t seed = test::test_seed("SnapshotReadersNeverSeeDataWrittenAfterTheTake");
  // 4 KiB chunks: 512 first writes racing with readers per iteration.
  Harness h(small_chunks());
  std::atomic<uint64_t> bad{0}, checked{0};
  for (int iter = 0; iter < 60 && bad == 0; ++iter) {
    const char old_byte = static_cast<char>(2 * (iter % 100) + 1), new_byte = static_cast<char>(old_byte + 1);
    ASSERT_OK(h.write(0, std::vector<char>(kRaceSize, old_byte)));
    std::string name = "race" + std::to_string(iter);
    h.snapshot(name, kRaceSize);
    auto ref = test::must(h.engine().open_export("vol@" + name));
    std::atomic<bool> writers_done{false};
    StartLine line(4);
    auto writer = [&](int w) {
      std::mt19937_64 rng(seed + iter * 16 + w);
      line.arrive();
      // Every chunk gets its first write from one of the two writers, in
      // opposite orders, with unaligned pieces that may span two chunks.
      for (uint64_t k = 0; k < kChunks; ++k) {
        uint64_t c = w == 0 ? k : kChunks - 1 - k;
        uint64_t off = c * kSmallChunk + rng() % kSmallChunk;
        uint64_t len = std::min<uint64_t>(1 + rng() % kSmallChunk, kRaceSize - off);
        std::vector<char> data(len, new_byte);
        if (!h.vol()->write(data.data(), len, off, false)) bad += 1000;
      }
    };
    auto reader = [&](int r) {
      std::mt19937_64 rng(seed + iter * 16 + 8 + r);
      std::vector<char> buf(4 * kSmallChunk);
      line.arrive();
      do {
        uint64_t off = rng() % kRaceSize;
        uint64_t len = std::min<uint64_t>(1 + rng() % buf.size(), kRaceSize - off);
        if (!ref.volume->read_snapshot(*ref.part, buf.data(), len, off)) {
          bad += 1000;
          return;
        }
        for (uint64_t i = 0; i < len; ++i)
          if (buf[i] != old_byte) {
            ++bad;
            break;
          }
        ++checked;
      } while (!writers_done.load());
    };
    std::thread w0(writer, 0), w1(writer, 1), r0(reader, 0), r1(reader, 1);
    w0.join();
    w1.join();
    writers_done = true;
    r0.join();
    r1.join();
    EXPECT_EQ(h.snap_read(name, 0, kRaceSize), std::vector<char>(kRaceSize, old_byte)) << "iteration " << iter;
    ASSERT_OK(h.engine().destroy(name));
  }
  EXPECT_EQ(bad.load(), 0u) << "a snapshot read returned data written after the take";
  EXPECT_GT(checked.load(), 0u);
}

// Extents of a snapshot come from one walk of the origin's allocation plus a
// per-chunk table check: trims that punch holes in the origin after the take
// must never show up as holes of the snapshot, whatever the interleaving.
TEST(Concurrency, SnapshotExtentsNeverShowHolesPunchedAfterTheTake) {
  uint64_t seed = test::test_seed("SnapshotExtentsNeverShowHolesPunchedAfterTheTake");
  Harness h(small_chunks());
  std::atomic<uint64_t> bad{0}, checked{0};
  for (int iter = 0; iter < 30 && bad == 0; ++iter) {
    ASSERT_OK(h.write(0, std::vector<char>(kRaceSize, static_cast<char>(1 + iter % 200))));
    std::string name = "holes" + std::to_string(iter);
    h.snapshot(name, kRaceSize);
    auto ref = test::must(h.engine().open_export("vol@" + name));
    std::atomic<bool> trimmers_done{false};
    StartLine line(4);
    auto trimmer = [&](int w) {
      line.arrive();
      for (uint64_t k = 0; k < kChunks; ++k) {
        uint64_t c = w == 0 ? k : kChunks - 1 - k;
        if (!h.vol()->trim(kSmallChunk, c * kSmallChunk, false)) bad += 1000;
      }
    };
    auto reader = [&](int r) {
      std::mt19937_64 rng(seed + iter * 16 + r);
      line.arrive();
      do {
        uint64_t off = (rng() % kChunks) * kSmallChunk;
        uint64_t len = std::min<uint64_t>((1 + rng() % 64) * kSmallChunk, kRaceSize - off);
        std::vector<Extent> ext;
        if (!ref.volume->snapshot_extents(*ref.part, len, off, &ext)) {
          bad += 1000;
          return;
        }
        uint64_t pos = off;
        for (const Extent& e : ext) {
          if (e.offset != pos || e.hole) ++bad;
          pos += e.length;
        }
        if (pos != off + len) ++bad;
        ++checked;
      } while (!trimmers_done.load());
    };
    std::thread t0(trimmer, 0), t1(trimmer, 1), r0(reader, 0), r1(reader, 1);
    t0.join();
    t1.join();
    trimmers_done = true;
    r0.join();
    r1.join();
    std::vector<Extent> after;
    ASSERT_OK(h.vol()->extents(kRaceSize, 0, &after));
    ASSERT_EQ(after.size(), 1u);
    EXPECT_TRUE(after[0].hole) << "the trims really punched the origin (iteration " << iter << ")";
    ASSERT_OK(h.engine().destroy(name));
  }
  EXPECT_EQ(bad.load(), 0u) << "snapshot extents showed a hole punched after the take";
  EXPECT_GT(checked.load(), 0u);
}

TEST(Concurrency, ConcurrentFirstWritesToOneChunkCopyItExactlyOnce) {
  Harness h;
  for (int iter = 0; iter < 40; ++iter) {
    auto old = test::pattern(kChunk, iter);
    ASSERT_OK(h.write(5 * kChunk, old));
    std::string name = "once" + std::to_string(iter);
    h.snapshot(name, 1 * kMiB);
    StartLine line(4);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        auto data = test::pattern(16 * kKiB, 1000 + t);
        line.arrive();
        EXPECT_OK(h.vol()->write(data.data(), data.size(), 5 * kChunk + t * 16 * kKiB, false));
      });
    for (auto& th : threads) th.join();
    auto info = test::must(h.engine().info(name));
    EXPECT_EQ(info.chunks_copied, 1u) << "iteration " << iter;
    EXPECT_EQ(info.storage.used, kChunk) << "iteration " << iter;
    EXPECT_EQ(h.snap_read(name, 5 * kChunk, kChunk), old) << "iteration " << iter;
    ASSERT_OK(h.engine().destroy(name));
  }
}

// ------------------------------------------- DESIGN 4.6: one point in time

TEST(Concurrency, TakeOverTwoVolumesIsOneAtomicPoint) {
  Harness::Options o;
  o.volumes = {{"a", 1 * kMiB}, {"b", 1 * kMiB}};
  Harness h(o);
  constexpr int kWriters = 2;
  std::atomic<bool> stop{false};
  // Writer k stores an increasing counter in block k of a, then of b. At
  // any single point in time, a's counter is b's or b's + 1.
  std::vector<std::thread> writers;
  for (int k = 0; k < kWriters; ++k)
    writers.emplace_back([&, k] {
      for (uint64_t n = 1; !stop.load(); ++n) {
        std::vector<char> block(4096);
        std::memcpy(block.data(), &n, sizeof n);
        EXPECT_OK(h.write(k * 4096, block, "a"));
        EXPECT_OK(h.write(k * 4096, block, "b"));
      }
    });
  int takes = 0;
  auto until = std::chrono::steady_clock::now() + 1000ms;
  while (std::chrono::steady_clock::now() < until) {
    std::string name = "t" + std::to_string(takes++);
    h.snapshot(name, 2 * kMiB, {"a", "b"});
    for (int k = 0; k < kWriters; ++k) {
      uint64_t va, vb;
      auto ba = h.snap_read(name, k * 4096, 8, "a"), bb = h.snap_read(name, k * 4096, 8, "b");
      std::memcpy(&va, ba.data(), 8);
      std::memcpy(&vb, bb.data(), 8);
      EXPECT_TRUE(va == vb || va == vb + 1) << name << " writer " << k << ": a=" << va << " b=" << vb;
    }
    ASSERT_OK(h.engine().destroy(name));
    std::this_thread::sleep_for(2ms);
  }
  stop = true;
  for (auto& th : writers) th.join();
  EXPECT_GT(takes, 5);
}

TEST(Concurrency, AWriteRequestIsEntirelyBeforeOrEntirelyAfterTheTake) {
  constexpr uint64_t kSize = 4 * kMiB;
  Harness::Options o;
  o.volumes = {{"vol", kSize}};
  Harness h(o);
  std::atomic<bool> stop{false};
  // One writer rewrites the whole volume per request, cycling through four
  // byte values (prepared beforehand, so that a request is nearly always in flight).
  std::thread writer([&] {
    std::vector<std::vector<char>> data;
    for (char v = 1; v <= 4; ++v) data.emplace_back(kSize, v);
    for (uint64_t n = 0; !stop.load(); ++n) EXPECT_OK(h.write(0, data[n % 4]));
  });
  std::mt19937_64 rng(test::test_seed("AWriteRequestIsEntirelyBeforeOrEntirelyAfterTheTake"));
  for (int i = 0; i < 40; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
    std::string name = "w" + std::to_string(i);
    h.snapshot(name, kSize);
    // Read backwards: a request still landing front to back would show up torn.
    std::vector<char> first(kSize);
    for (uint64_t off = kSize; off > 0; off -= kChunk) {
      auto piece = h.snap_read(name, off - kChunk, kChunk);
      std::copy(piece.begin(), piece.end(), first.begin() + static_cast<long>(off - kChunk));
    }
    std::this_thread::sleep_for(5ms);
    auto second = h.snap_read(name, 0, kSize);
    char v = first[0];
    auto other = std::find_if(first.begin(), first.end(), [v](char c) { return c != v; });
    EXPECT_TRUE(other == first.end()) << name << ": byte " << (other - first.begin())
                                      << " is from another write request than byte 0";
    EXPECT_TRUE(first == second) << name << " changed after the take";
    ASSERT_OK(h.engine().destroy(name));
  }
  stop = true;
  writer.join();
}

// ------------------------------------------------------------- stress run

// A 4 KiB block that says which block it is and which version, with a CRC.
struct BlockHeader {
  uint32_t block;
  uint32_t version;
  uint32_t crc;  // CRC-32C of the whole block with this field 0
  uint32_t pad;
};

void make_block(uint32_t block, uint32_t version, char* out) {
  uint64_t x = (uint64_t{block} << 32 | version) * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = sizeof(BlockHeader); i < 4096; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(out + i, &x, 8);
  }
  BlockHeader h{block, version, 0, 0};
  std::memcpy(out, &h, sizeof h);
  h.crc = crc32c(out, 4096);
  std::memcpy(out, &h, sizeof h);
}

// Returns "" if the block is valid and its version is within [lo, hi].
std::string check_block(const char* data, uint32_t block, uint32_t lo, uint32_t hi) {
  BlockHeader h;
  std::memcpy(&h, data, sizeof h);
  BlockHeader zero = h;
  zero.crc = 0;
  std::vector<char> copy(data, data + 4096);
  std::memcpy(copy.data(), &zero, sizeof zero);
  if (crc32c(copy.data(), 4096) != h.crc) return "bad CRC (torn or mixed block)";
  if (h.block != block) return "holds block " + std::to_string(h.block);
  if (h.version < lo || h.version > hi)
    return "version " + std::to_string(h.version) + " not in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return "";
}

TEST(Concurrency, WritersTakesDestroysAndReadersKeepEverySnapshotConsistent) {
  uint64_t seed = test::test_seed("WritersTakesDestroysAndReadersKeepEverySnapshotConsistent");
  constexpr uint64_t kSize = 8 * kMiB;
  constexpr uint32_t kBlocks = kSize / 4096;  // 2048 blocks, 4 per chunk
  constexpr int kWriters = 3, kReaders = 2;
  constexpr auto kDuration = 2500ms;
  Harness::Options o;
  o.volumes = {{"vol", kSize}};
  ASSERT_OK(o.params.set("chunk_minimum_shift", "14"));  // 16 KiB: many first writes per take
  Harness h(o);
  {
    std::vector<char> all(kSize);
    for (uint32_t b = 0; b < kBlocks; ++b) make_block(b, 0, all.data() + b * 4096);
    ASSERT_OK(h.write(0, all));
  }
  // Block b belongs to writer b % kWriters: every chunk is shared by all
  // writers, and the versions of one block are written in order.
  std::vector<std::atomic<uint32_t>> started(kBlocks), completed(kBlocks);
  struct Snap {
    std::string name;
    ExportRef ref;
    std::vector<uint32_t> lo, hi;
    std::vector<std::atomic<uint32_t>> seen = std::vector<std::atomic<uint32_t>>(kBlocks);  // version + 1
    std::atomic<bool> destroying{false};
  };
  std::mutex mu;
  std::vector<std::shared_ptr<Snap>> live;  // guarded by mu
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0}, blocks_checked{0}, takes{0}, destroys{0};
  std::atomic<bool> failed{false};
  std::mutex report_mu;
  std::string report;  // first failure
  auto fail = [&](const std::string& what) {
    std::lock_guard lk(report_mu);
    if (!failed.exchange(true)) report = what;
  };

  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w)
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(seed * 31 + w);
      std::vector<char> block(4096);
      std::vector<uint32_t> version(kBlocks, 0);
      while (!stop.load() && !failed.load()) {
        uint32_t b = static_cast<uint32_t>(rng() % (kBlocks / kWriters)) * kWriters + w;
        if (b >= kBlocks) continue;
        uint32_t v = ++version[b];
        make_block(b, v, block.data());
        started[b].store(v);
        Status st = h.vol()->write(block.data(), 4096, uint64_t{b} * 4096, false);
        if (!st) fail("write block " + std::to_string(b) + ": " + st.message());
        completed[b].store(v);
        ++writes;
      }
    });
  for (int r = 0; r < kReaders; ++r)
    threads.emplace_back([&, r] {
      std::mt19937_64 rng(seed * 37 + r);
      std::vector<char> first, second;
      while (!stop.load() && !failed.load()) {
        std::shared_ptr<Snap> s;
        {
          std::lock_guard lk(mu);
          if (!live.empty()) s = live[rng() % live.size()];
        }
        if (!s) {
          std::this_thread::yield();
          continue;
        }
        uint32_t first_block = static_cast<uint32_t>(rng() % kBlocks);
        uint32_t n = std::min<uint32_t>(1 + static_cast<uint32_t>(rng() % 64), kBlocks - first_block);
        first.assign(uint64_t{n} * 4096, 0);
        second.assign(uint64_t{n} * 4096, 0);
        Status st1 = s->ref.volume->read_snapshot(*s->ref.part, first.data(), first.size(), uint64_t{first_block} * 4096);
        Status st2 = s->ref.volume->read_snapshot(*s->ref.part, second.data(), second.size(), uint64_t{first_block} * 4096);
        if (!st1 || !st2) {
          if (s->destroying.load()) continue;  // destroyed under us: EIO is right
          fail("read " + s->name + ": " + (st1 ? st2 : st1).message());
          return;
        }
        if (first != second) {
          fail("two reads of " + s->name + " at block " + std::to_string(first_block) + " differ");
          return;
        }
        for (uint32_t i = 0; i < n; ++i) {
          uint32_t b = first_block + i;
          std::string why = check_block(first.data() + uint64_t{i} * 4096, b, s->lo[b], s->hi[b]);
          if (!why.empty()) {
            fail(s->name + " block " + std::to_string(b) + ": " + why);
            return;
          }
          // Every read of a snapshot, by any reader at any time, sees the same version.
          BlockHeader bh;
          std::memcpy(&bh, first.data() + uint64_t{i} * 4096, sizeof bh);
          uint32_t expect = 0;
          if (!s->seen[b].compare_exchange_strong(expect, bh.version + 1) && expect != bh.version + 1) {
            fail(s->name + " block " + std::to_string(b) + ": version " + std::to_string(bh.version) +
                 " after an earlier read saw " + std::to_string(expect - 1));
            return;
          }
          ++blocks_checked;
        }
      }
    });
  threads.emplace_back([&] {  // takes and destroys
    std::mt19937_64 rng(seed * 41);
    int next = 0;
    while (!stop.load() && !failed.load()) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
      auto s = std::make_shared<Snap>();
      s->name = "c" + std::to_string(next++);
      s->lo.resize(kBlocks);
      s->hi.resize(kBlocks);
      Status st = h.engine().create_snapshot({"vol"}, s->name, 0).status();
      if (st) st = h.engine().append_storage(s->name, {StorageRange{"", 0, kSize}});
      if (!st) return fail("create " + s->name + ": " + st.message());
      for (uint32_t b = 0; b < kBlocks; ++b) s->lo[b] = completed[b].load();
      st = h.engine().take(s->name).status();
      for (uint32_t b = 0; b < kBlocks; ++b) s->hi[b] = started[b].load();
      if (!st) return fail("take " + s->name + ": " + st.message());
      ++takes;
      auto ref = h.engine().open_export("vol@" + s->name);
      if (!ref) return fail("open " + s->name + ": " + ref.status().message());
      s->ref = *ref;
      std::shared_ptr<Snap> victim;
      {
        std::lock_guard lk(mu);
        live.push_back(s);
        if (live.size() > 3) {
          size_t i = rng() % live.size();  // oldest, middle or newest
          victim = live[i];
          live.erase(live.begin() + static_cast<long>(i));
        }
      }
      if (victim) {
        victim->destroying = true;
        st = h.engine().destroy(victim->name);
        if (!st) return fail("destroy " + victim->name + ": " + st.message());
        ++destroys;
      }
    }
  });
  std::this_thread::sleep_for(kDuration);
  stop = true;
  for (auto& th : threads) th.join();
  std::printf("[ stats    ] %llu writes, %llu takes, %llu destroys, %llu snapshot blocks checked\n",
              static_cast<unsigned long long>(writes.load()), static_cast<unsigned long long>(takes.load()),
              static_cast<unsigned long long>(destroys.load()),
              static_cast<unsigned long long>(blocks_checked.load()));
  EXPECT_FALSE(failed.load()) << report << " (NBDSNAP_SEED=" << seed << ")";
  EXPECT_GT(takes.load(), 3u);
  EXPECT_GT(blocks_checked.load(), 1000u);
  // After the storm: every live snapshot reads fully valid, twice the same.
  for (const auto& s : live) {
    auto a = h.snap_read(s->name, 0, kSize), b = h.snap_read(s->name, 0, kSize);
    EXPECT_EQ(a, b);
    for (uint32_t blk = 0; blk < kBlocks; ++blk) {
      std::string why = check_block(a.data() + uint64_t{blk} * 4096, blk, s->lo[blk], s->hi[blk]);
      ASSERT_EQ(why, "") << s->name << " block " << blk;
    }
  }
}

}  // namespace
}  // namespace nbdsnap
