// Copy-before-write through nbdkit, end to end: the snapshot export keeps
// the pre-take data while several NBD clients overwrite the origin; QEMU's
// tools agree; base:allocation extents of the snapshot keep pre-take holes.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>

#include "nbdkit_fixture.h"
#include "stamp.h"

namespace nbdsnap::it {
namespace {

class CbwData : public NbdkitTest {};

uint64_t test_seed() {
  const char* env = std::getenv("NBDSNAP_SEED");
  uint64_t seed = env && *env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (NBDSNAP_SEED=%llu repeats this run)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  return seed;
}

// Writes the stamps of generation `sequence` over [0, size) and flushes.
std::string stamp_volume(nbd_handle* h, uint64_t size, uint64_t sequence) {
  std::vector<char> buf(kMaxRequest);
  for (uint64_t off = 0; off < size; off += buf.size()) {
    uint64_t n = std::min<uint64_t>(buf.size(), size - off);
    stamp_range(buf.data(), off, n, sequence);
    std::string e = nbd_write_all(h, buf.data(), n, off);
    if (!e.empty()) return e;
  }
  return nbd_flush(h, 0) == -1 ? nbd_failure("flush", 0) : "";
}

// Checks that [0, size) read through h carries the stamps of `sequence`.
// Returns the first few problems ("" if none).
std::string check_volume(nbd_handle* h, uint64_t size, uint64_t sequence, const char* what) {
  std::vector<char> buf(kMaxRequest);
  std::string problems;
  int bad = 0;
  for (uint64_t off = 0; off < size; off += buf.size()) {
    uint64_t n = std::min<uint64_t>(buf.size(), size - off);
    std::string e = nbd_read_all(h, buf.data(), n, off);
    if (!e.empty()) return problems + what + ": " + e;
    for (uint64_t b = 0; b < n; b += kBlock) {
      std::string why = check_block(buf.data() + b, off + b, sequence);
      if (why.empty()) continue;
      if (++bad <= 8) problems += std::string(what) + ": block at " + std::to_string(off + b) + ": " + why + "\n";
    }
  }
  if (bad > 8) problems += std::string(what) + ": ... " + std::to_string(bad) + " bad blocks in all\n";
  return problems;
}

TEST_F(CbwData, SnapshotKeepsEveryPreTakeStampWhileFourClientsOverwriteTheOrigin) {
  constexpr uint64_t kSize = 64 * MiB, kChunk = 64 * KiB, kChunks = kSize / kChunk;
  constexpr int kWriters = 4;
  make_volume(kSize);
  ASSERT_TRUE(start({"chunk_minimum_shift=16"}));
  link::Request lv;
  lv.mutable_list_volumes();
  auto vols = call(lv);
  ASSERT_TRUE(IsOk(vols));
  ASSERT_EQ(vols->list_volumes().volumes_size(), 1);
  ASSERT_EQ(vols->list_volumes().volumes(0).chunk_size(), kChunk);

  std::string err;
  {
    NbdPtr h = open(kVolume, {}, &err);
    ASSERT_TRUE(h) << err;
    ASSERT_EQ(stamp_volume(h.get(), kSize, 1), "");
  }
  auto taken = snapshot("s1", kSize + 8 * MiB);
  ASSERT_TRUE(IsOk(taken));
  const uint64_t take_sequence = taken->take().sequence();

  // Each writer owns the blocks i with i % 4 == its number, so all four
  // share every chunk; each shuffles its blocks, and also gets unaligned
  // writes straddling chunk boundaries (one boundary, or three chunks). The
  // unaligned writes carry generation-2 bytes, so the final origin content
  // does not depend on the order.
  const uint64_t seed = test_seed();
  std::mt19937_64 rng(seed);
  struct Op {
    uint64_t offset, length;
  };
  std::vector<std::vector<Op>> ops(kWriters);
  for (uint64_t i = 0; i < kSize / kBlock; ++i) ops[i % kWriters].push_back({i * kBlock, kBlock});
  int unaligned = 0;
  for (uint64_t c = 1; c < kChunks; c += 3) {
    uint64_t boundary = c * kChunk;
    uint64_t before = 1 + rng() % 6000, after = 1 + rng() % 6000;
    if (c % 30 == 1 && boundary + 2 * kChunk < kSize) after += 2 * kChunk;  // spans three chunks
    ops[rng() % kWriters].push_back({boundary - before, before + after});
    ++unaligned;
  }
  for (auto& list : ops) std::shuffle(list.begin(), list.end(), rng);

  std::mutex mu;
  std::vector<std::string> errors;
  auto record = [&](const std::string& e) {
    std::lock_guard lk(mu);
    if (errors.size() < 20) errors.push_back(e);
  };
  std::atomic<int> writers_left{kWriters};
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      std::string e;
      NbdPtr h = nbd_open(nbd_socket_, kVolume, {}, &e);
      if (!h) {
        record("writer " + std::to_string(t) + ": connect: " + e);
      } else {
        std::vector<char> buf(4 * kChunk);
        for (const Op& op : ops[t]) {
          stamp_range(buf.data(), op.offset, op.length, 2);
          if (nbd_pwrite(h.get(), buf.data(), op.length, op.offset, 0) == -1) {
            record("writer " + std::to_string(t) + ": " + nbd_failure("pwrite", op.offset));
            break;
          }
        }
        if (nbd_flush(h.get(), 0) == -1) record(nbd_failure("flush", 0));
        nbd_shutdown(h.get(), 0);
      }
      --writers_left;
    });
  }
  // Meanwhile a fifth client reads the snapshot export from start to end,
  // repeatedly until the writers are done.
  std::atomic<int> reader_passes{0};
  threads.emplace_back([&] {
    std::string e;
    NbdPtr h = nbd_open(nbd_socket_, "vol0@s1", {}, &e);
    if (!h) return record("reader: connect: " + e);
    std::vector<char> buf(256 * KiB);
    do {
      for (uint64_t off = 0; off < kSize; off += buf.size()) {
        if (nbd_pread(h.get(), buf.data(), buf.size(), off, 0) == -1)
          return record("reader: " + nbd_failure("pread", off));
        for (uint64_t b = 0; b < buf.size(); b += kBlock) {
          std::string why = check_block(buf.data() + b, off + b, 1);
          if (!why.empty()) record("reader during overwrite: block at " + std::to_string(off + b) + ": " + why);
        }
      }
      ++reader_passes;
    } while (writers_left > 0);
  });
  for (auto& th : threads) th.join();
  for (const auto& e : errors) ADD_FAILURE() << e;
  ASSERT_TRUE(errors.empty());
  std::printf("%d unaligned writes, %d concurrent snapshot read passes\n", unaligned, reader_passes.load());

  NbdPtr snap = open("vol0@s1", {}, &err);
  ASSERT_TRUE(snap) << err;
  EXPECT_EQ(check_volume(snap.get(), kSize, 1, "snapshot vol0@s1"), "");
  NbdPtr origin = open(kVolume, {}, &err);
  ASSERT_TRUE(origin) << err;
  EXPECT_EQ(check_volume(origin.get(), kSize, 2, "origin vol0"), "");

  // Exactly one copy per chunk, and CBT saw the whole volume change.
  auto i = info("s1");
  ASSERT_TRUE(IsOk(i));
  EXPECT_EQ(i->info().snapshot().state(), link::TAKEN);
  EXPECT_EQ(i->info().snapshot().chunks_copied(), kChunks);
  auto ci = cbt_info();
  ASSERT_TRUE(IsOk(ci));
  auto changes = cbt_changes(ci->cbt_info().generation(), take_sequence);
  ASSERT_TRUE(IsOk(changes));
  EXPECT_EQ(changes->cbt_changes().changed_bytes(), kSize);
}

TEST_F(CbwData, QemuImgCompareSeesTheSnapshotEqualToTheVolumeAtTake) {
  std::string qemu_img = find_program("qemu-img");
  if (qemu_img.empty()) GTEST_SKIP() << "qemu-img is not installed (apt-get install qemu-utils)";
  if (link_tool_.empty()) GTEST_SKIP() << "NBDSNAP_LINK is not set (run through `meson test`)";
  constexpr uint64_t kSize = 8 * MiB;
  make_volume(kSize);
  ASSERT_TRUE(start({"chunk_minimum_shift=16"}));
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  ASSERT_EQ(stamp_volume(h.get(), kSize, 1), "");

  // The operator's way: nbdsnap-link create / append-storage / take.
  std::string diff = path("s1.diff");
  make_sparse_file(diff, kSize);
  auto link_cmd = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {link_tool_, "--socket", control_socket_});
    return run_command(args);
  };
  auto r = link_cmd({"create", kVolume, "--name", "s1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = link_cmd({"append-storage", "s1", diff, "0:8M"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = link_cmd({"take", "s1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("taken: sequence"), std::string::npos) << r.out;

  std::string copy = path("copy-at-take.img");
  fs::copy_file(volume_path_, copy);

  // Overwrite a few chunks, one write unaligned across a chunk boundary.
  std::vector<char> buf(3 * 64 * KiB);
  stamp_range(buf.data(), 100 * KiB, 150 * KiB, 2);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), 150 * KiB, 100 * KiB), "");
  stamp_range(buf.data(), 5 * MiB - 1000, 3000, 2);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), 3000, 5 * MiB - 1000), "");
  ASSERT_NE(nbd_flush(h.get(), 0), -1);

  auto same = run_command({qemu_img, "compare", "-f", "raw", "-F", "raw", copy, uri("vol0@s1")});
  EXPECT_EQ(same.exit_code, 0) << same.out << same.err;
  EXPECT_NE(same.out.find("Images are identical"), std::string::npos) << same.out << same.err;

  auto differ = run_command({qemu_img, "compare", "-f", "raw", "-F", "raw", copy, uri(kVolume)});
  EXPECT_EQ(differ.exit_code, 1) << differ.out << differ.err;
  EXPECT_NE(differ.out.find("Content mismatch"), std::string::npos) << differ.out << differ.err;
}

bool all_holes(const std::vector<NbdExtent>& ex) {
  for (const auto& e : ex)
    if ((e.flags & (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO)) != (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO)) return false;
  return !ex.empty();
}
bool all_data(const std::vector<NbdExtent>& ex) {
  for (const auto& e : ex)
    if (e.flags & LIBNBD_STATE_HOLE) return false;
  return !ex.empty();
}
std::string show(const std::vector<NbdExtent>& ex) {
  std::string s;
  for (const auto& e : ex)
    s += "[" + std::to_string(e.offset) + "+" + std::to_string(e.length) + " flags " + std::to_string(e.flags) + "] ";
  return s;
}

TEST_F(CbwData, SnapshotExtentsKeepAPreTakeHoleAfterTheOriginFillsIt) {
  constexpr uint64_t kSize = 8 * MiB;
  make_volume(kSize);  // sparse: all hole
  ASSERT_TRUE(start({"chunk_minimum_shift=16"}));
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> buf(MiB);
  stamp_range(buf.data(), 0, MiB, 1);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), MiB, 0), "");  // [0, 1M) data before the take
  ASSERT_NE(nbd_flush(h.get(), 0), -1);
  ASSERT_TRUE(IsOk(snapshot("s1", kSize)));

  stamp_range(buf.data(), 4 * MiB, MiB, 2);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), MiB, 4 * MiB), "");  // fill the hole [4M, 5M)
  ASSERT_NE(nbd_flush(h.get(), 0), -1);

  NbdPtr snap = open("vol0@s1", {.base_allocation = true}, &err);
  ASSERT_TRUE(snap) << err;
  ASSERT_EQ(nbd_can_meta_context(snap.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 1);
  NbdPtr origin = open(kVolume, {.base_allocation = true}, &err);
  ASSERT_TRUE(origin) << err;

  std::vector<NbdExtent> ex;
  ASSERT_EQ(nbd_extents(snap.get(), MiB, 4 * MiB, &ex), "");
  EXPECT_TRUE(all_holes(ex)) << "snapshot [4M,5M): " << show(ex);
  ex.clear();
  ASSERT_EQ(nbd_extents(snap.get(), MiB, 0, &ex), "");
  EXPECT_TRUE(all_data(ex)) << "snapshot [0,1M): " << show(ex);
  ex.clear();
  ASSERT_EQ(nbd_extents(snap.get(), 2 * MiB, 6 * MiB, &ex), "");
  EXPECT_TRUE(all_holes(ex)) << "snapshot [6M,8M): " << show(ex);

  ex.clear();
  ASSERT_EQ(nbd_extents(origin.get(), MiB, 4 * MiB, &ex), "");
  EXPECT_TRUE(all_data(ex)) << "origin [4M,5M): " << show(ex);
  ex.clear();
  ASSERT_EQ(nbd_extents(origin.get(), kSize, 0, &ex), "");
  uint64_t covered = 0;
  for (const auto& e : ex) covered += e.length;
  EXPECT_EQ(covered, kSize) << show(ex);

  // And the data agrees with the extents: the snapshot reads zeros there.
  std::vector<char> got(MiB, 'x');
  ASSERT_EQ(nbd_read_all(snap.get(), got.data(), MiB, 4 * MiB), "");
  EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](char c) { return c == 0; }));
}

TEST_F(CbwData, OlderSnapshotKeepsItsDataWhenTheNewerOneIsDestroyedAndAfterRestart) {
  // Only the newest snapshot receives copies; s1 reads chunks first changed
  // after s2's take through s2's table, and must keep them when s2 goes.
  constexpr uint64_t kSize = 8 * MiB;
  make_volume(kSize);
  ASSERT_TRUE(start({"chunk_minimum_shift=16"}));
  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  ASSERT_EQ(stamp_volume(h.get(), kSize, 1), "");
  ASSERT_TRUE(IsOk(snapshot("s1", kSize)));
  std::vector<char> buf(kSize);
  stamp_range(buf.data(), 0, 2 * MiB, 2);  // [0, 2M): copied to s1
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), 2 * MiB, 0), "");
  ASSERT_TRUE(IsOk(snapshot("s2", kSize)));
  stamp_range(buf.data(), MiB, 4 * MiB, 3);  // [1M, 5M): copied to s2 only
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), 4 * MiB, MiB), "");
  ASSERT_NE(nbd_flush(h.get(), 0), -1);
  h.reset();

  auto s2_expect = [](uint64_t off) -> uint64_t { return off < 2 * MiB ? 2 : 1; };
  auto origin_expect = [](uint64_t off) -> uint64_t { return off < MiB ? 2 : off < 5 * MiB ? 3 : 1; };
  auto check = [&](const char* name, auto expect) {
    std::string e;
    NbdPtr x = open(name, {}, &e);
    if (!x) return std::string(name) + ": connect: " + e;
    std::vector<char> got(kSize);
    e = nbd_read_all(x.get(), got.data(), kSize, 0);
    if (!e.empty()) return std::string(name) + ": " + e;
    for (uint64_t b = 0; b < kSize; b += kBlock) {
      std::string why = check_block(got.data() + b, b, expect(b));
      if (!why.empty()) return std::string(name) + ": block at " + std::to_string(b) + ": " + why;
    }
    return std::string();
  };
  EXPECT_EQ(check("vol0@s1", [](uint64_t) -> uint64_t { return 1; }), "");
  EXPECT_EQ(check("vol0@s2", s2_expect), "");
  EXPECT_EQ(check(kVolume, origin_expect), "");

  ASSERT_TRUE(IsOk(destroy("s2")));
  EXPECT_EQ(check("vol0@s1", [](uint64_t) -> uint64_t { return 1; }), "");
  ASSERT_TRUE(stop());
  ASSERT_TRUE(restart());
  EXPECT_EQ(check("vol0@s1", [](uint64_t) -> uint64_t { return 1; }), "");
  EXPECT_EQ(check(kVolume, origin_expect), "");
  std::string e;
  EXPECT_FALSE(open("vol0@s2", {}, &e));
}

}  // namespace
}  // namespace nbdsnap::it
