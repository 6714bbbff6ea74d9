// Fixture of the backup tests: a real nbdsnapd (DaemonTest) driven through
// the real `nbdsnap` binary (NBDSNAP_CLI) for snapshots, backup, restore and
// verify, with libnbd for the workload and an in-memory model of the volume
// as the reference: what each snapshot must contain.
// Not thread-safe: one fixture per test.
#pragma once

#include <random>

#include "daemon_fixture.h"
#include "json_parse.h"

namespace nbdsnap::bt {

using namespace nbdsnap::dt;  // NOLINT: shared test helpers
using json::JValue;

class BackupTest : public DaemonTest {
 protected:
  void SetUp() override {
    DaemonTest::SetUp();
    if (IsSkipped()) return;
    const char* c = std::getenv("NBDSNAP_CLI");
    // scripts/test.sh runs this suite again with a sanitizer build of the CLI.
    if (const char* s = std::getenv("NBDSNAP_CLI_SANITIZED"); s && *s) c = s;
    if (!c || !*c || ::access(c, X_OK) != 0) GTEST_SKIP() << "NBDSNAP_CLI is not set or not built";
    cli_ = c;
    for (const char* tool : {"qemu-img", "qemu-nbd"})
      if (find_program(tool).empty()) GTEST_SKIP() << tool << " is not installed (Debian package qemu-utils)";
  }

  // A sparse volume file of SIZE bytes, the daemon serving it as vol0, and
  // the model all zeros.
  ::testing::AssertionResult start_volume(uint64_t size, std::vector<std::string> daemon_args = {}) {
    make_sparse_file(volume_path_, size);
    model_.assign(size, 0);
    return start_daemon(std::move(daemon_args));
  }

  // nbdsnap --api SOCKET ARGS...
  CommandResult nbdsnap(std::vector<std::string> args, int timeout_s = 120) {
    std::vector<std::string> argv = {cli_, "--api", api_socket_};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, timeout_s);
  }
  // nbdsnap --json ...: exit 0 and one JSON object, else a test failure.
  JValue nbdsnap_json(std::vector<std::string> args, CommandResult* raw = nullptr) {
    args.insert(args.begin(), "--json");
    CommandResult r = nbdsnap(args);
    if (raw) *raw = r;
    std::string cmd;
    for (const auto& a : args) cmd += " " + a;
    EXPECT_EQ(r.exit_code, 0) << "nbdsnap" << cmd << ":\n" << r.err;
    std::string err;
    auto v = json::parse_json(r.out, &err);
    EXPECT_TRUE(v) << "nbdsnap" << cmd << ": not JSON (" << err << "): " << r.out;
    return v ? *v : JValue();
  }

  // Creates and takes snapshot NAME of vol0; returns its sequence.
  uint64_t snapshot(const std::string& name) {
    auto c = create({kVolume}, name);
    EXPECT_TRUE(IsOk(c));
    auto t = take(name);
    EXPECT_TRUE(IsOk(t));
    return t ? t->take().snapshot().sequence() : 0;
  }

  // The volume model: every write goes to the volume and to `model_`.
  void write(nbd_handle* h, uint64_t offset, const std::vector<char>& data) {
    ASSERT_EQ(nbd_write_all(h, data.data(), data.size(), offset), "");
    std::memcpy(model_.data() + offset, data.data(), data.size());
  }
  void zero(nbd_handle* h, uint64_t offset, uint64_t length) {
    ASSERT_NE(nbd_zero(h, length, offset, 0), -1) << nbd_get_error();
    std::memset(model_.data() + offset, 0, length);
  }

  // The first byte offset where file PATH differs from EXPECTED, or "".
  static std::string compare_file(const std::string& path, const std::vector<char>& expected) {
    std::string data = read_text(path);
    if (data.size() != expected.size())
      return path + ": " + std::to_string(data.size()) + " bytes, expected " + std::to_string(expected.size());
    for (size_t i = 0; i < data.size(); ++i)
      if (data[i] != expected[i]) return path + ": first difference at offset " + std::to_string(i);
    return "";
  }

  std::string cli_;
  std::vector<char> model_;
};

// Another NBD server for a test (nbdkit with a stock plugin, qemu-nbd):
// started with its output in LOG, ready once SOCKET accepts; SIGTERM and
// reaped when it goes.
class ServerProcess {
 public:
  ~ServerProcess() { stop(); }
  ::testing::AssertionResult start(const std::vector<std::string>& argv, const std::string& socket,
                                   const std::string& log) {
    ::unlink(socket.c_str());
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
    ::close(fd);
    for (int i = 0; i < 2000; ++i) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure() << argv[0] << " exited: " << read_text(log);
      }
      int c = unix_connect(socket);
      if (c >= 0) {
        ::close(c);
        return ::testing::AssertionSuccess();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return ::testing::AssertionFailure() << argv[0] << " did not listen on " << socket << " within 20 s";
  }
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    int status;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

// Random bytes (not compressible, never all zero in a 4 KiB run).
inline std::vector<char> random_bytes(std::mt19937_64* rng, size_t n) {
  std::vector<char> v(n);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = (*rng)() | 1;
    std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return v;
}

}  // namespace nbdsnap::bt
