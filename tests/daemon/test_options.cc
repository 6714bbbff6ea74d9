// nbdsnapd's command line: --help is true to the flags and the defaults,
// usage errors exit 2, start-up failures exit 1 with a message naming the
// operation and the cause; without --foreground the starting process exits
// 0 once the API socket answers; socket modes; SIGTERM removes the sockets.
#include <grp.h>
#include <sys/stat.h>

#include "daemon_fixture.h"

namespace nbdsnap::dt {
namespace {

class Options : public DaemonTest {
 protected:
  CommandResult run(std::vector<std::string> args, int timeout_s = 30) {
    args.insert(args.begin(), daemon_bin_);
    return run_command(args, timeout_s);
  }
};

TEST_F(Options, HelpMentionsEveryFlagAndTheDefaults) {
  auto r = run({"--help"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  for (const char* flag : {"--state-dir", "--api-socket", "--nbd-socket", "--nbd-listen", "--tls-psk", "--volume",
                           "--foreground", "--api-group", "--param", "--plugin", "--nbdkit", "--help", "--version"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << "--help does not mention " << flag;
  for (const char* def : {"/var/lib/nbdsnap", "/run/nbdsnap/api.sock", "/run/nbdsnap/nbd.sock", "0600", "0660"})
    EXPECT_NE(r.out.find(def), std::string::npos) << "--help does not mention the default " << def;
  auto v = run({"--version"});
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_NE(v.out.find(NBDSNAP_VERSION), std::string::npos) << v.out;
}

TEST_F(Options, UsageErrorsExit2) {
  const std::vector<std::vector<std::string>> bad = {
      {"--no-such-flag"},
      {"positional"},
      {"--state-dir"},
      {"--state-dir="},
      {"--volume", "novalue"},
      {"--volume", "=x"},
      {"--volume", "bad/name=" + volume_path_},
      {"--volume", "v=" + volume_path_, "--volume", "v=" + volume_path_},
      {"--param", "no_such_key=1"},
      {"--param", "chunk_minimum_shift=99"},
      {"--param", "diff_storage_minimum=abc"},
      {"--param", "volume=x=y"},
      {"--param", "state=/tmp"},
      {"--nbd-listen", "nocolon"},
      {"--nbd-listen", "127.0.0.1:99999"},
      {"--nbd-listen", "::1:10809"},
      {"--foreground=yes"},
  };
  for (const auto& args : bad) {
    auto r = run(args);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.exit_code, 2) << joined << ": " << r.err;
    EXPECT_NE(r.err.find("nbdsnapd: "), std::string::npos) << joined << ": " << r.err;
  }
}

TEST_F(Options, StartupFailuresExit1WithTheCause) {
  make_sparse_file(volume_path_, MiB);
  make_sparse_file(path("a-file"), 1);
  auto base = base_args();
  // The state directory cannot be created.
  {
    auto args = base;
    args[2] = path("a-file") + "/state";
    auto r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("create state directory"), std::string::npos) << r.err;
  }
  // No such plugin.
  {
    auto args = base;
    args[8] = path("no-plugin.so");
    auto r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("no-plugin.so"), std::string::npos) << r.err;
  }
  // No such nbdkit.
  {
    auto args = base;
    args.push_back("--nbdkit");
    args.push_back(path("no-nbdkit"));
    auto r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("no-nbdkit"), std::string::npos) << r.err;
  }
  // A volume file that does not exist.
  {
    auto args = base;
    args.push_back("--volume");
    args.push_back("vol0=" + path("missing.img"));
    auto r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("missing.img"), std::string::npos) << r.err;
  }
  // The data plane refuses to start (here: the volume is a directory, which
  // only the plugin finds out): exit 1 with nbdkit's words in the message,
  // sockets removed, registry unchanged.
  {
    fs::create_directories(path("adir"));
    auto args = base;
    args.push_back("--volume");
    args.push_back("vol0=" + path("adir"));
    auto r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("start data plane: nbdkit"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("adir"), std::string::npos) << "nbdkit's message is missing: " << r.err;
    EXPECT_NE(::access(nbd_socket_.c_str(), F_OK), 0) << "NBD socket left behind";
    EXPECT_NE(::access(api_socket_.c_str(), F_OK), 0) << "API socket left behind";
    EXPECT_EQ(read_text(state_dir_ + "/nbdsnapd.registry").find("adir"), std::string::npos)
        << "a volume that never started was registered";
  }
  // The API socket is in use by another daemon (another state directory).
  {
    ASSERT_TRUE(start_daemon());
    auto args = base;
    args[2] = path("state2");
    args[6] = path("nbd2.sock");
    auto r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("in use"), std::string::npos) << r.err;
    // The same state directory.
    args = base;
    args[4] = path("api2.sock");
    args[6] = path("nbd2.sock");
    r = run(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("in use by another nbdsnapd"), std::string::npos) << r.err;
    ASSERT_TRUE(daemon_.alive());
    EXPECT_TRUE(IsOk(version()));
  }
}

TEST_F(Options, DaemonizesOnceReadyAndStopsCleanly) {
  make_sparse_file(volume_path_, MiB);
  auto args = base_args();
  args.erase(args.begin());  // no --foreground
  args.push_back("--volume");
  args.push_back("vol0=" + volume_path_);
  auto r = run(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Ready at once: the API answers without waiting.
  ApiClient a;
  ASSERT_TRUE(IsOk(a.connect(api_socket_)));
  api::Request q;
  q.mutable_volume_list();
  auto v = a.call(q);
  ASSERT_TRUE(IsOk(v));
  ASSERT_EQ(v->volume_list().volumes_size(), 1);
  // The daemon's pid, from the API socket's peer credentials.
  int fd = unix_connect(api_socket_);
  ASSERT_GE(fd, 0);
  ucred cred{};
  socklen_t len = sizeof cred;
  ASSERT_EQ(::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len), 0);
  ::close(fd);
  a.close();
  pid_t pid = cred.pid;
  ASSERT_GT(pid, 1);
  EXPECT_EQ(::getsid(pid), pid) << "the daemon is not a session leader (setsid)";
  struct stat st;
  ASSERT_EQ(::stat(api_socket_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(nbd_socket_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_NE(read_text(state_dir_ + "/nbdsnapd.log").find("ready"), std::string::npos);
  auto kids = children_of(pid);
  ASSERT_EQ(kids.size(), 1u);
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  EXPECT_TRUE(wait_gone(pid)) << "the daemon did not stop";
  EXPECT_TRUE(wait_gone(kids[0], 5)) << "nbdkit outlived the daemon";
  EXPECT_NE(::access(api_socket_.c_str(), F_OK), 0);
  EXPECT_NE(::access(nbd_socket_.c_str(), F_OK), 0);
}

TEST_F(Options, ApiGroupMakesTheSocketsGroupAccessible) {
  make_sparse_file(volume_path_, MiB);
  group* g = ::getgrgid(::getgid());
  ASSERT_TRUE(g);
  ASSERT_TRUE(start_daemon({"--api-group", g->gr_name}));
  struct stat st;
  ASSERT_EQ(::stat(api_socket_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_gid, ::getgid());
  ASSERT_EQ(::stat(nbd_socket_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  ASSERT_TRUE(daemon_.stop());
  auto r = run({"--foreground", "--state-dir", state_dir_, "--api-socket", api_socket_, "--nbd-socket", nbd_socket_,
                "--plugin", plugin_, "--api-group", "no-such-group-nbdsnap"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("no-such-group-nbdsnap"), std::string::npos) << r.err;
}

// nbdkit killed repeatedly: restarts back off, and the daemon keeps serving.
TEST_F(Options, DataPlaneRestartsWithBackoff) {
  make_sparse_file(volume_path_, MiB);
  ASSERT_TRUE(start_daemon());
  pid_t last = 0;
  // Waits for a new nbdkit (not `last`) with the data plane running.
  auto wait_new = [&](pid_t* nk) {
    auto deadline = Clock::now() + std::chrono::seconds(20);
    for (;;) {
      *nk = daemon_.nbdkit_pid();
      auto v = version();
      if (*nk > 0 && *nk != last && v && v->version().data_plane() == "running") return;
      ASSERT_LT(Clock::now(), deadline) << "data plane not back";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  };
  for (int i = 0; i < 3; ++i) {
    pid_t nk = 0;
    ASSERT_NO_FATAL_FAILURE(wait_new(&nk));
    last = nk;
    ASSERT_EQ(::kill(nk, SIGKILL), 0);
  }
  pid_t nk = 0;
  ASSERT_NO_FATAL_FAILURE(wait_new(&nk));
  auto v = version();
  ASSERT_TRUE(IsOk(v));
  EXPECT_EQ(v->version().data_plane_restarts(), 3u);
  EXPECT_TRUE(IsOk(volume_list()));
  std::string log = read_text(log_path_);
  EXPECT_NE(log.find("restarting nbdkit in 200 ms"), std::string::npos) << log;
  EXPECT_NE(log.find("restarting nbdkit in 400 ms"), std::string::npos) << log;
}

}  // namespace
}  // namespace nbdsnap::dt
