// OriginWriter: every caller's bytes land at its offset, errors come back to
// the caller that asked, one thread serves many callers in batches, and the
// destructor lets queued writes finish.
#include "origin_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.h"

namespace nbdsnap::test {
namespace {

class Fd {
 public:
  Fd(const std::string& path, int flags) : fd_(::open(path.c_str(), flags | O_CLOEXEC)) {
    if (fd_ < 0) throw std::runtime_error("open " + path + " failed");
  }
  ~Fd() { ::close(fd_); }
  int get() const { return fd_; }

 private:
  int fd_;
};

TEST(OriginWriter, WritesLandAtTheirOffsets) {
  TempDir dir;
  std::string path = make_file(dir.file("origin"), 1 * kMiB);
  Fd fd(path, O_RDWR);
  OriginWriter w(fd.get(), "write origin");
  auto a = pattern(4096, 1), b = pattern(10000, 2);
  ASSERT_OK(w.write(a.data(), a.size(), 0));
  ASSERT_OK(w.write(b.data(), b.size(), 512 * kKiB + 7));
  EXPECT_EQ(read_raw(path, 0, a.size()), a);
  EXPECT_EQ(read_raw(path, 512 * kKiB + 7, b.size()), b);
  EXPECT_EQ(read_raw(path, 4096, 4096), std::vector<char>(4096, 0));  // nothing else written
  EXPECT_EQ(w.writes(), 2u);
}

TEST(OriginWriter, ManyThreadsEachGetTheirOwnBytesAndResult) {
  TempDir dir;
  constexpr int kThreads = 8, kPerThread = 200;
  constexpr uint64_t kBlock = 4096;
  std::string path = make_file(dir.file("origin"), kThreads * kPerThread * kBlock);
  Fd fd(path, O_RDWR);
  OriginWriter w(fd.get(), "write origin");
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        uint64_t block = static_cast<uint64_t>(i) * kThreads + t;  // interleaved
        auto data = pattern(kBlock, block + 1);
        if (!w.write(data.data(), data.size(), block * kBlock)) failures.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  for (uint64_t block = 0; block < kThreads * kPerThread; ++block)
    ASSERT_EQ(read_raw(path, block * kBlock, kBlock), pattern(kBlock, block + 1)) << "block " << block;
  EXPECT_EQ(w.writes(), static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_GE(w.batches(), 1u);
  EXPECT_LE(w.batches(), w.writes());
}

TEST(OriginWriter, LaterWritesToTheSameBytesWin) {
  TempDir dir;
  std::string path = make_file(dir.file("origin"), 64 * kKiB);
  Fd fd(path, O_RDWR);
  OriginWriter w(fd.get(), "write origin");
  for (uint64_t seed = 1; seed <= 50; ++seed) {
    auto d = pattern(8192, seed);
    ASSERT_OK(w.write(d.data(), d.size(), 4096));
  }
  EXPECT_EQ(read_raw(path, 4096, 8192), pattern(8192, 50));
}

TEST(OriginWriter, AnErrorGoesToTheCallerAndNamesTheOperation) {
  TempDir dir;
  std::string path = make_file(dir.file("origin"), 64 * kKiB);
  Fd fd(path, O_RDONLY);  // every write fails with EBADF
  OriginWriter w(fd.get(), "write origin");
  auto d = pattern(4096, 3);
  Status st = w.write(d.data(), d.size(), 0);
  EXPECT_ERRNO(st, EBADF);
  EXPECT_CONTAINS(st.message(), "write origin");
  // The writer goes on serving after a failure.
  Fd rw(path, O_RDWR);
  OriginWriter w2(rw.get(), "write origin");
  EXPECT_OK(w2.write(d.data(), d.size(), 0));
  EXPECT_EQ(read_raw(path, 0, 4096), d);
}

TEST(OriginWriter, DestructionWaitsForWritesInProgress) {
  TempDir dir;
  constexpr int kThreads = 4, kPerThread = 100;
  std::string path = make_file(dir.file("origin"), kThreads * kPerThread * 4096);
  Fd fd(path, O_RDWR);
  std::atomic<int> ok{0};
  {
    OriginWriter w(fd.get(), "write origin");
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPerThread; ++i) {
          uint64_t block = static_cast<uint64_t>(t) * kPerThread + i;
          auto d = pattern(4096, block + 7);
          if (w.write(d.data(), d.size(), block * 4096)) ok.fetch_add(1);
        }
      });
    for (auto& th : threads) th.join();
  }
  EXPECT_EQ(ok.load(), kThreads * kPerThread);
  for (uint64_t block = 0; block < kThreads * kPerThread; ++block)
    ASSERT_EQ(read_raw(path, block * 4096, 4096), pattern(4096, block + 7));
}

}  // namespace
}  // namespace nbdsnap::test
