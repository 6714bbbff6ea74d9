// Shared helpers for the engine unit tests: a temporary directory removed at
// the end of the test, sparse temp files, byte patterns, and a small harness
// around an in-memory Engine with one volume.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "diff_storage.h"
#include "engine.h"
#include "params.h"
#include "status.h"
#include "volume.h"

namespace nbdsnap::test {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

// Throws (gtest reports the test as failed) unless the status is ok.
inline void must(const Status& st, const std::string& what = "") {
  if (!st) throw std::runtime_error((what.empty() ? "" : what + ": ") + st.message());
}
template <typename T>
T must(Result<T> r, const std::string& what = "") {
  must(r.status(), what);
  return std::move(r.value());
}

inline Status status_of(const Status& s) { return s; }
template <typename T>
Status status_of(const Result<T>& r) { return r.status(); }

template <typename S>
::testing::AssertionResult is_ok_fmt(const char* expr, const S& s) {
  Status st = status_of(s);
  if (st) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << expr << " failed (errno " << st.code() << "): " << st.message();
}
template <typename S>
::testing::AssertionResult errno_fmt(const char* expr, const char*, const S& s, int code) {
  Status st = status_of(s);
  if (st.code() == code) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << expr << ": expected errno " << code << ", got " << st.code()
                                       << " \"" << st.message() << "\"";
}
inline ::testing::AssertionResult contains_fmt(const char* text_expr, const char*, const std::string& text,
                                               const std::string& sub) {
  if (text.find(sub) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << text_expr << " = \"" << text << "\" does not contain \"" << sub
                                       << "\"";
}
#define EXPECT_OK(expr) EXPECT_PRED_FORMAT1(::nbdsnap::test::is_ok_fmt, expr)
#define ASSERT_OK(expr) ASSERT_PRED_FORMAT1(::nbdsnap::test::is_ok_fmt, expr)
// Expects failure with this errno.
#define EXPECT_ERRNO(expr, code) EXPECT_PRED_FORMAT2(::nbdsnap::test::errno_fmt, expr, code)
#define ASSERT_ERRNO(expr, code) ASSERT_PRED_FORMAT2(::nbdsnap::test::errno_fmt, expr, code)
// Expects `text` to contain `sub`.
#define EXPECT_CONTAINS(text, sub) EXPECT_PRED_FORMAT2(::nbdsnap::test::contains_fmt, text, sub)

// A directory made with mkdtemp() under $TMPDIR (or /tmp), removed with all
// its contents when the object goes away.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/nbdsnap-unit-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp " + tmpl + " failed");
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Creates `path` (or cuts/extends it) as a sparse file of `size` bytes.
inline std::string make_file(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) throw std::runtime_error("open " + path + " failed");
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    ::close(fd);
    throw std::runtime_error("ftruncate " + path + " failed");
  }
  ::close(fd);
  return path;
}

inline std::vector<char> read_raw(const std::string& path, uint64_t offset, uint64_t length) {
  std::vector<char> out(length);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("open " + path + " failed");
  ssize_t n = ::pread(fd, out.data(), length, static_cast<off_t>(offset));
  ::close(fd);
  if (n < 0) throw std::runtime_error("pread " + path + " failed");
  out.resize(static_cast<size_t>(n));
  return out;
}

inline void write_raw(const std::string& path, uint64_t offset, const void* data, uint64_t length) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("open " + path + " failed");
  ssize_t n = ::pwrite(fd, data, length, static_cast<off_t>(offset));
  ::close(fd);
  if (n != static_cast<ssize_t>(length)) throw std::runtime_error("pwrite " + path + " failed");
}

// `length` deterministic bytes, different for each seed, never all zero.
inline std::vector<char> pattern(uint64_t length, uint64_t seed) {
  std::vector<char> out(length);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e5ull;
  for (uint64_t i = 0; i < length; ++i) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    out[i] = static_cast<char>(((x * 0x2545f4914f6cdd1dull) >> 56) | 1);
  }
  return out;
}

// Small units keep test volumes small: 64 KiB chunks, 4 KiB CBT blocks,
// low-space threshold 32 KiB (64 sectors, event when free < 16 KiB).
inline Params small_params() {
  Params p;
  must(p.set("chunk_minimum_shift", "16"));
  must(p.set("tracking_block_minimum_shift", "12"));
  must(p.set("diff_storage_minimum", "64"));
  return p;
}

constexpr uint64_t kChunk = 64 * kKiB;                  // with small_params()
constexpr uint64_t kVolumeSize = 4 * kMiB + 4 * kKiB;   // 65 chunks, the last one short

// An Engine with volumes made of sparse temp files. With state_dir "" nothing
// is persisted and snapshots use memory storage unless told otherwise.
class Harness {
 public:
  struct Options {
    std::vector<std::pair<std::string, uint64_t>> volumes{{"vol", kVolumeSize}};
    Params params = small_params();
    std::function<std::unique_ptr<DiffStorage>()> storage_factory = make_memory_storage;
    bool persistent = false;  // state_dir inside the temp dir, file storage by default
  };

  Harness() : Harness(Options{}) {}
  explicit Harness(Options o) : opts_(std::move(o)) {
    for (const auto& [name, size] : opts_.volumes) make_file(dir_.file(name + ".img"), size);
    if (opts_.persistent) std::filesystem::create_directories(dir_.file("state"));
    restart_engine();
  }
  ~Harness() { engine_.reset(); }

  // Destroys the engine (stop) and starts a new one on the same files.
  void restart_engine() {
    engine_.reset();
    engine_ = std::make_unique<Engine>(engine_options());
    must(engine_->start(), "engine start");
  }
  EngineOptions engine_options() {
    EngineOptions eo;
    eo.state_dir = opts_.persistent ? dir_.file("state") : "";
    eo.params = opts_.params;
    for (const auto& [name, size] : opts_.volumes) eo.volumes.emplace_back(name, dir_.file(name + ".img"));
    eo.storage_factory = opts_.storage_factory;
    eo.log = [this](const std::string& m) { log_.push_back(m); };
    return eo;
  }
  void drop_engine() { engine_.reset(); }

  Engine& engine() { return *engine_; }
  std::shared_ptr<Volume> vol(const std::string& name = "vol") { return engine_->volume(name); }
  const TempDir& dir() const { return dir_; }
  std::string volume_path(const std::string& name = "vol") const { return dir_.file(name + ".img"); }
  std::vector<std::string>& log() { return log_; }

  // create + append-storage (memory: `storage` bytes) + take; returns the sequence.
  uint64_t snapshot(const std::string& name, uint64_t storage = 8 * kMiB,
                    std::vector<std::string> vols = {"vol"}) {
    must(engine_->create_snapshot(vols, name, 0), "create " + name);
    must(engine_->append_storage(name, {StorageRange{"", 0, storage}}), "append-storage " + name);
    return must(engine_->take(name), "take " + name).sequence;
  }

  Status write(uint64_t offset, const std::vector<char>& data, const std::string& v = "vol") {
    return vol(v)->write(data.data(), data.size(), offset, false);
  }
  std::vector<char> read(uint64_t offset, uint64_t length, const std::string& v = "vol") {
    std::vector<char> out(length);
    must(vol(v)->read(out.data(), length, offset), "read origin");
    return out;
  }
  Status read_snapshot(const std::string& snap, uint64_t offset, uint64_t length, std::vector<char>* out,
                       const std::string& v = "vol") {
    auto ref = engine_->open_export(v + "@" + snap);
    if (!ref) return ref.status();
    out->assign(length, '\0');
    return ref->volume->read_snapshot(*ref->part, out->data(), length, offset);
  }
  std::vector<char> snap_read(const std::string& snap, uint64_t offset, uint64_t length,
                              const std::string& v = "vol") {
    std::vector<char> out;
    must(read_snapshot(snap, offset, length, &out, v), "read " + v + "@" + snap);
    return out;
  }

 private:
  TempDir dir_;
  Options opts_;
  std::unique_ptr<Engine> engine_;
  std::vector<std::string> log_;
};

// Seed for randomized tests: $NBDSNAP_SEED if set, else random. Printed.
inline uint64_t test_seed(const char* test) {
  uint64_t seed;
  if (const char* env = std::getenv("NBDSNAP_SEED"); env && *env) {
    seed = std::strtoull(env, nullptr, 0);
  } else {
    std::random_device rd;
    seed = (uint64_t{rd()} << 32) | rd();
  }
  std::printf("[ seed     ] %s: NBDSNAP_SEED=%llu\n", test, static_cast<unsigned long long>(seed));
  std::fflush(stdout);
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

}  // namespace nbdsnap::test
