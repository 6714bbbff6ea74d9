#include "qemu_tools.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

namespace nbdsnap {
namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The last few non-empty lines of TEXT, joined by "; ".
std::string tail_lines(const std::string& text, int n = 3) {
  std::vector<std::string> lines;
  std::stringstream ss(text);
  std::string l;
  while (std::getline(ss, l))
    if (!l.empty()) lines.push_back(l);
  std::string out;
  for (size_t i = lines.size() > static_cast<size_t>(n) ? lines.size() - n : 0; i < lines.size(); ++i)
    out += (out.empty() ? "" : "; ") + lines[i];
  return out;
}

std::string make_temp_dir() {
  const char* t = std::getenv("TMPDIR");
  // Unix socket paths are short (108 bytes): fall back to /tmp for long TMPDIRs.
  std::string base = t && *t && std::strlen(t) < 60 ? t : "/tmp";
  std::string templ = base + "/nbdsnap-qemu-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!::mkdtemp(buf.data())) return "";
  return buf.data();
}

// fork + exec with stdout to OUT_FD (or /dev/null) and stderr to ERR_FD.
pid_t spawn(const std::string& program, const std::vector<std::string>& args, int out_fd, int err_fd) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(program.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    // A server child (qemu-nbd) must not outlive us if we are killed.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(127);
    int devnull = ::open("/dev/null", O_RDWR);
    ::dup2(devnull, 0);
    ::dup2(out_fd >= 0 ? out_fd : devnull, 1);
    ::dup2(err_fd >= 0 ? err_fd : devnull, 2);
    ::execvp(program.c_str(), argv.data());
    std::fprintf(stderr, "%s: %s\n", program.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

int wait_status(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

std::string exit_text(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by ") + ::strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

}  // namespace

Status run_tool(const std::string& program, const std::vector<std::string>& args, std::string* out) {
  std::string dir = make_temp_dir();
  if (dir.empty()) return Status::from_errno("run " + program + ": temporary directory");
  std::string err_path = dir + "/stderr", out_path = dir + "/stdout";
  int err_fd = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  int out_fd = out ? ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600) : -1;
  pid_t pid = spawn(program, args, out_fd, err_fd);
  if (err_fd >= 0) ::close(err_fd);
  if (out_fd >= 0) ::close(out_fd);
  int status = pid > 0 ? wait_status(pid) : -1;
  std::string err = read_file(err_path);
  if (out) *out = read_file(out_path);
  ::unlink(err_path.c_str());
  ::unlink(out_path.c_str());
  ::rmdir(dir.c_str());
  if (pid < 0) return Status::from_errno("run " + program);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127 && err.find(std::strerror(ENOENT)) != std::string::npos)
    return Status::error(ENOENT, program + " not found (install qemu-utils)");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return Status::error(EIO, program + " failed (" + exit_text(status) + ")" +
                                  (err.empty() ? "" : ": " + tail_lines(err)));
  return Status::ok();
}

Status qcow2_create(const std::string& path, uint64_t size, const std::string& backing,
                    const std::string& backing_format) {
  std::vector<std::string> args = {"create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"};
  if (!backing.empty()) {
    args.insert(args.end(), {"-b", backing, "-F", backing_format});
  }
  args.push_back(path);
  args.push_back(std::to_string(size));
  return run_tool("qemu-img", args).with_context("create " + path);
}

Result<QemuNbd> QemuNbd::serve(const std::string& path, bool read_only, int connections) {
  QemuNbd q;
  q.image_ = path;
  q.dir_ = make_temp_dir();
  if (q.dir_.empty()) return Status::from_errno("serve " + path + ": temporary directory");
  q.socket_ = q.dir_ + "/nbd.sock";
  q.log_ = q.dir_ + "/qemu-nbd.log";
  int log_fd = ::open(q.log_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  std::vector<std::string> args = {"--format=qcow2", "--socket=" + q.socket_, "--persistent",
                                   "--shared=" + std::to_string(std::max(1, connections)), "--cache=writeback",
                                   "--aio=threads"};
  if (read_only) args.push_back("--read-only");
  else args.push_back("--discard=unmap");
  args.push_back(path);
  q.pid_ = spawn("qemu-nbd", args, -1, log_fd);
  if (log_fd >= 0) ::close(log_fd);
  if (q.pid_ < 0) return Status::from_errno("serve " + path + ": start qemu-nbd");
  // Ready when the socket accepts a connection.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    int status = 0;
    if (::waitpid(q.pid_, &status, WNOHANG) == q.pid_) {
      q.pid_ = -1;
      std::string err = tail_lines(read_file(q.log_));
      if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
        return Status::error(ENOENT, "serve " + path + ": qemu-nbd not found (install qemu-utils)");
      return Status::error(EIO, "serve " + path + ": qemu-nbd failed (" + exit_text(status) + ")" +
                                    (err.empty() ? "" : ": " + err));
    }
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", q.socket_.c_str());
    bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    if (ok) break;
    if (std::chrono::steady_clock::now() > deadline)
      return Status::error(ETIMEDOUT, "serve " + path + ": qemu-nbd did not start listening within 30 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return q;
}

QemuNbd::QemuNbd(QemuNbd&& o) noexcept
    : image_(std::move(o.image_)), dir_(std::move(o.dir_)), socket_(std::move(o.socket_)), log_(std::move(o.log_)),
      pid_(o.pid_) {
  o.pid_ = -1;
  o.dir_.clear();
}

QemuNbd::~QemuNbd() { stop(); }

Status QemuNbd::stop() {
  Status st = Status::ok();
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);
    int status = wait_status(pid_);
    pid_ = -1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::string err = tail_lines(read_file(log_));
      st = Status::error(EIO, "qemu-nbd serving " + image_ + " ended with " + exit_text(status) +
                                  (err.empty() ? "" : ": " + err));
    }
  }
  if (!dir_.empty()) {
    ::unlink(socket_.c_str());
    ::unlink(log_.c_str());
    ::rmdir(dir_.c_str());
    dir_.clear();
  }
  return st;
}

}  // namespace nbdsnap
