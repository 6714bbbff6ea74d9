// Helpers of the CLI tests: a temporary directory, a fake nbdsnapd API
// server (a thread accepting on a Unix socket, reading api::Request frames
// and answering with a handler's canned api::Response frames, recording
// every request), and a runner that executes the `nbdsnap` binary with given
// arguments, environment and working directory, capturing exit code, stdout
// and stderr. FakeApiServer is thread-safe (the handler runs on its thread;
// requests() may be called from the test thread).
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "api.pb.h"
#include "frame.h"

namespace nbdsnap::test {

namespace fs = std::filesystem;

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "nbdsnap-cli-XXXXXX").string();
    char* d = ::mkdtemp(tmpl.data());
    if (d) path_ = d;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty() && !std::getenv("NBDSNAP_KEEP_TMP")) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// An api::Response with the given error.
inline api::Response error_response(int code, const std::string& message) {
  api::Response r;
  r.set_error_code(code);
  r.set_error(message);
  return r;
}

class FakeApiServer {
 public:
  using Handler = std::function<api::Response(const api::Request&)>;
  // What to do with a connection after a request: keep serving or close it
  // without replying (to test a daemon that goes away).
  enum class Mode { kReply, kCloseWithoutReply };

  explicit FakeApiServer(std::string path) : path_(std::move(path)) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    ::unlink(path_.c_str());
    ok_ = listen_fd_ >= 0 && ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
          ::listen(listen_fd_, 16) == 0 && ::pipe2(stop_pipe_, O_CLOEXEC) == 0;
    if (ok_) thread_ = std::thread([this] { loop(); });
  }
  ~FakeApiServer() {
    if (thread_.joinable()) {
      char b = 1;
      (void)!::write(stop_pipe_[1], &b, 1);
      thread_.join();
    }
    for (int fd : {listen_fd_, stop_pipe_[0], stop_pipe_[1]})
      if (fd >= 0) ::close(fd);
    ::unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  const std::string& path() const { return path_; }

  void set_handler(Handler h) {
    std::lock_guard<std::mutex> l(mu_);
    handler_ = std::move(h);
  }
  void set_mode(Mode m) { mode_ = m; }
  std::vector<api::Request> requests() const {
    std::lock_guard<std::mutex> l(mu_);
    return requests_;
  }
  int connections() const { return connections_; }

 private:
  void loop() {
    for (;;) {
      pollfd p[2] = {{listen_fd_, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (p[1].revents) return;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      ++connections_;
      serve(fd);
      ::close(fd);
    }
  }
  // One client at a time: the CLI uses one connection per run.
  void serve(int fd) {
    for (;;) {
      pollfd p[2] = {{fd, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
      if (::poll(p, 2, 10000) <= 0 || p[1].revents) return;
      api::Request req;
      if (read_frame(fd, &req) != FrameResult::kOk) return;
      Handler h;
      {
        std::lock_guard<std::mutex> l(mu_);
        requests_.push_back(req);
        h = handler_;
      }
      if (mode_ == Mode::kCloseWithoutReply) return;
      api::Response resp = h ? h(req) : error_response(ENOTSUP, "fake server: no handler");
      if (resp.tag() == 0) resp.set_tag(req.tag());
      if (!write_frame(fd, resp)) return;
    }
  }

  std::string path_;
  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};
  bool ok_ = false;
  std::thread thread_;
  mutable std::mutex mu_;
  Handler handler_;                  // guarded by mu_
  std::vector<api::Request> requests_;  // guarded by mu_
  std::atomic<Mode> mode_{Mode::kReply};
  std::atomic<int> connections_{0};
};

struct ToolResult {
  int exit_code = -1;  // -1: did not exit normally (signal, timeout)
  std::string out, err;
};

struct ToolOptions {
  std::vector<std::pair<std::string, std::string>> set_env;
  std::vector<std::string> unset_env = {"NBDSNAP_API"};
  std::string cwd;
  int timeout_s = 30;
};

// Runs EXE ARGS... and captures its output (through temporary files).
inline ToolResult run_tool(const std::string& exe, const std::vector<std::string>& args,
                           const ToolOptions& opt = {}) {
  ToolResult res;
  TempDir tmp;
  std::string out_path = tmp / "stdout", err_path = tmp / "stderr";
  std::vector<std::string> argv = {exe};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargs;
  for (auto& a : argv) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  // The environment is built before fork: the child only calls
  // async-signal-safe functions (the test process has threads).
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string kv = *e, key = kv.substr(0, kv.find('='));
    bool drop = false;
    for (const auto& u : opt.unset_env) drop |= key == u;
    for (const auto& s : opt.set_env) drop |= key == s.first;
    if (!drop) env.push_back(kv);
  }
  for (const auto& [k, v] : opt.set_env) env.push_back(k + "=" + v);
  std::vector<char*> cenv;
  for (auto& e : env) cenv.push_back(e.data());
  cenv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int n = ::open("/dev/null", O_RDONLY);
    if (o < 0 || e < 0 || n < 0) ::_exit(126);
    ::dup2(n, 0);
    ::dup2(o, 1);
    ::dup2(e, 2);
    if (!opt.cwd.empty() && ::chdir(opt.cwd.c_str()) != 0) ::_exit(126);
    ::execve(exe.c_str(), cargs.data(), cenv.data());
    ::_exit(127);
  }
  if (pid < 0) return res;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(opt.timeout_s);
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      res.err = "(killed after " + std::to_string(opt.timeout_s) + " s)\n";
      status = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (status != -1 && WIFEXITED(status)) res.exit_code = WEXITSTATUS(status);
  res.out = read_text(out_path);
  res.err += read_text(err_path);
  return res;
}

// "rc=N\nstdout:\n...\nstderr:\n..." for assertion messages.
inline std::string describe(const ToolResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout:\n" + r.out + "--- stderr:\n" + r.err;
}

}  // namespace nbdsnap::test
