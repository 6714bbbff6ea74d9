// kill -9 of the nbdkit child while a libnbd client writes (each write
// acknowledged with a flush): nbdsnapd restarts the data plane with the same
// state; API calls during the gap fail with EAGAIN instead of hanging;
// afterwards every acknowledged write is in the origin, the snapshot is
// still taken with the same sequence and its export still has the pre-take
// data, and CBT either reports every change or has a new generation.
#include <atomic>
#include <map>
#include <mutex>

#include "daemon_fixture.h"

namespace nbdsnap::dt {
namespace {

class Crash : public DaemonTest {};

TEST_F(Crash, KillNbdkitWhileWriting) {
  constexpr uint64_t kSize = 16 * MiB, kWrite = 64 * KiB;
  constexpr uint64_t kWrites = kSize / kWrite;  // each offset written once
  make_sparse_file(volume_path_, kSize);
  ASSERT_TRUE(start_daemon({"--param", "chunk_minimum_shift=16"}));

  // Generation 1 everywhere, then the snapshot.
  {
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    ASSERT_TRUE(h) << err;
    std::vector<char> buf(kSize);
    stamp_range(buf.data(), 0, kSize, 1);
    ASSERT_EQ(nbd_write_all(h.get(), buf.data(), kSize, 0), "");
    ASSERT_NE(nbd_flush(h.get(), 0), -1);
  }
  auto c = create({kVolume}, "s1");
  ASSERT_TRUE(IsOk(c));
  auto t = take("s1");
  ASSERT_TRUE(IsOk(t));
  const uint64_t take_seq = t->take().snapshot().sequence();
  ASSERT_GT(take_seq, 0u);
  auto ci = cbt_info();
  ASSERT_TRUE(IsOk(ci));
  const std::string generation = ci->cbt_info().generation();

  // The writer: blocks in a scrambled order, generation 2, flush after each;
  // reconnects when the data plane goes away.
  std::mutex mu;
  std::map<uint64_t, bool> acked;  // offset -> acknowledged (false: outcome unknown)
  std::atomic<uint64_t> acked_count{0};
  std::atomic<int> reconnects{0};
  std::atomic<bool> writer_failed{false};
  std::string writer_error;
  std::thread writer([&] {
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    std::vector<char> buf(kWrite);
    for (uint64_t i = 0; i < kWrites; ++i) {
      uint64_t off = (i * 37 % kWrites) * kWrite;
      stamp_range(buf.data(), off, kWrite, 2);
      bool ok = h && nbd_pwrite(h.get(), buf.data(), kWrite, off, 0) != -1 && nbd_flush(h.get(), 0) != -1;
      {
        std::lock_guard lk(mu);
        acked[off] = ok;
      }
      if (ok) {
        ++acked_count;
        continue;
      }
      // The data plane went away: reconnect (the NBD socket stays, held by
      // nbdsnapd, so connections queue until nbdkit is back).
      h.reset();
      auto deadline = Clock::now() + std::chrono::seconds(30);
      while (!h && Clock::now() < deadline) {
        h = open(kVolume, {}, &err);
        if (!h) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (!h) {
        writer_error = "could not reconnect: " + err;
        writer_failed = true;
        return;
      }
      ++reconnects;
    }
  });

  while (acked_count < kWrites / 4 && !writer_failed) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  pid_t nbdkit = daemon_.nbdkit_pid();
  ASSERT_GT(nbdkit, 0);
  ASSERT_EQ(::kill(nbdkit, SIGKILL), 0);

  // API calls during the gap: EAGAIN (never a hang, never another error),
  // until the data plane is back.
  int eagain = 0, ok_after = 0;
  auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline && ok_after == 0) {
    ApiClient a;
    ASSERT_TRUE(IsOk(a.connect(api_socket_)));
    api::Request q;
    q.mutable_snapshot_info()->set_id("s1");
    auto t0 = Clock::now();
    auto r = a.call(q);
    EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5)) << "an API call hung during the restart";
    if (r) {
      if (eagain > 0) ++ok_after;
    } else {
      ASSERT_EQ(r.status().code(), EAGAIN) << r.status().message();
      EXPECT_NE(r.status().message().find("data plane restarting"), std::string::npos) << r.status().message();
      ++eagain;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::fprintf(stderr, "crash: %d API calls got EAGAIN during the restart\n", eagain);
  EXPECT_GT(eagain, 0) << "no EAGAIN seen while nbdkit was down";
  ASSERT_GT(ok_after, 0) << "the data plane did not come back";
  writer.join();
  ASSERT_FALSE(writer_failed) << writer_error;
  EXPECT_GE(reconnects.load(), 1);
  std::fprintf(stderr, "crash: %llu of %llu writes acknowledged, %d reconnects\n",
               static_cast<unsigned long long>(acked_count.load()), static_cast<unsigned long long>(kWrites),
               reconnects.load());

  auto v = version();
  ASSERT_TRUE(IsOk(v));
  EXPECT_EQ(v->version().data_plane(), "running");
  EXPECT_GE(v->version().data_plane_restarts(), 1u);
  pid_t again = daemon_.nbdkit_pid();
  EXPECT_GT(again, 0);
  EXPECT_NE(again, nbdkit);

  // The snapshot: still taken, same sequence, and its export has the
  // generation-1 data everywhere.
  auto i = info("s1");
  ASSERT_TRUE(IsOk(i));
  EXPECT_EQ(i->snapshot_info().snapshot().state(), api::TAKEN) << i->snapshot_info().snapshot().error();
  EXPECT_EQ(i->snapshot_info().snapshot().sequence(), take_seq);
  {
    std::string err;
    NbdPtr s = open("vol0@s1", {}, &err);
    ASSERT_TRUE(s) << err;
    std::vector<char> buf(kSize);
    ASSERT_EQ(nbd_read_all(s.get(), buf.data(), kSize, 0), "");
    int bad = 0;
    for (uint64_t b = 0; b < kSize; b += kBlock) {
      std::string why = check_block(buf.data() + b, b, 1);
      if (!why.empty() && ++bad <= 5) ADD_FAILURE() << "snapshot block at " << b << ": " << why;
    }
  }
  // The origin: every acknowledged write; the others are old or new, whole.
  {
    std::string err;
    NbdPtr h = open(kVolume, {}, &err);
    ASSERT_TRUE(h) << err;
    std::vector<char> buf(kSize);
    ASSERT_EQ(nbd_read_all(h.get(), buf.data(), kSize, 0), "");
    int bad = 0;
    for (uint64_t b = 0; b < kSize; b += kBlock) {
      uint64_t w = b / kWrite * kWrite;
      std::string why = check_block(buf.data() + b, b, 2);
      if (!acked.at(w) && !why.empty()) why = check_block(buf.data() + b, b, 1);
      if (!why.empty() && ++bad <= 5) ADD_FAILURE() << "origin block at " << b << ": " << why;
    }
  }
  // CBT: the same history reporting every acknowledged change, or a new
  // generation (a consumer then takes a full backup).
  api::Request q;
  auto* cc = q.mutable_cbt_changes();
  cc->set_volume(kVolume);
  cc->set_generation(generation);
  cc->set_since_sequence(take_seq);
  auto changes = call(q);
  if (!changes) {
    EXPECT_EQ(changes.status().code(), ESTALE) << changes.status().message();
    auto now = cbt_info();
    ASSERT_TRUE(IsOk(now));
    EXPECT_NE(now->cbt_info().generation(), generation);
    std::fprintf(stderr, "crash: CBT has a new generation\n");
  } else {
    std::fprintf(stderr, "crash: CBT kept its generation: %d ranges\n", changes->cbt_changes().ranges_size());
    const auto& ranges = changes->cbt_changes().ranges();
    for (const auto& [off, ok] : acked) {
      if (!ok) continue;
      bool covered = false;
      for (const auto& r : ranges) covered = covered || (r.offset() <= off && off + kWrite <= r.offset() + r.length());
      EXPECT_TRUE(covered) << "CBT misses the acknowledged write at " << off;
    }
  }
  ASSERT_TRUE(IsOk(destroy("s1")));
}

}  // namespace
}  // namespace nbdsnap::dt
