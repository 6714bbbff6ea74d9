// End to end: the `nbdsnap` binary (NBDSNAP_CLI) against a real nbdsnapd
// (NBDSNAPD) with its nbdkit data plane, in a temporary directory: volumes,
// create / take / info / list / wait-event / destroy, CBT info, changes and
// map, and the errors for unknown names. Skips when nbdsnapd or the plugin
// (NBDSNAP_PLUGIN, which nbdsnapd runs) is not built, or nbdkit is missing.
#include <gtest/gtest.h>

#include <regex>

#include "cli_test_util.h"
#include "json_parse.h"

namespace nbdsnap::test {
namespace {
using json::JValue;
using json::parse_json;

bool contains(const std::string& s, std::string_view w) { return s.find(w) != std::string::npos; }

bool on_path(const std::string& name) {
  std::string path = std::getenv("PATH") ? std::getenv("PATH") : "";
  path += ":/usr/bin:/usr/sbin";
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':'))
    if (!dir.empty() && ::access((dir + "/" + name).c_str(), X_OK) == 0) return true;
  return false;
}

class CliDaemon : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* cli = std::getenv("NBDSNAP_CLI");
    const char* daemon = std::getenv("NBDSNAPD");
    if (!cli || !*cli) GTEST_SKIP() << "NBDSNAP_CLI is not set (run through `meson test`)";
    if (!daemon || ::access(daemon, X_OK) != 0) GTEST_SKIP() << "nbdsnapd is not built (NBDSNAPD)";
    const char* plugin = std::getenv("NBDSNAP_PLUGIN");  // nbdsnapd runs this plugin
    if (!plugin || ::access(plugin, R_OK) != 0) GTEST_SKIP() << "the nbdkit plugin is not built (NBDSNAP_PLUGIN)";
    if (!on_path("nbdkit")) GTEST_SKIP() << "nbdkit is not installed";
    cli_ = cli;
    daemon_ = daemon;
    api_ = tmp_ / "api.sock";
    volume_ = tmp_ / "vm1.img";
    {
      std::ofstream f(volume_, std::ios::binary);
      ASSERT_TRUE(f);
    }
    fs::resize_file(volume_, 8 << 20);
    start();
  }

  void TearDown() override { stop(); }

  void start() {
    std::string log = tmp_ / "nbdsnapd.log";
    std::vector<std::string> argv = {daemon_,          "--state-dir", tmp_ / "state",
                                     "--api-socket",   api_,          "--nbd-socket",
                                     tmp_ / "nbd.sock", "--volume",    "vm1=" + volume_,
                                     "--foreground"};
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    ASSERT_GT(pid_, 0);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    ToolResult last;
    while (std::chrono::steady_clock::now() < deadline) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL() << "nbdsnapd exited during start-up:\n" << read_text(log);
      }
      last = nbdsnap({"--json", "version"});
      if (last.exit_code == 0) {
        std::string err;
        auto v = parse_json(last.out, &err);
        if (v && (*v)["data_plane"].str() == "running") return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL() << "nbdsnapd did not answer `nbdsnap version` with a running data plane in 30 s:\n"
           << describe(last) << read_text(log);
  }

  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    int status = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (::waitpid(pid_, &status, WNOHANG) != pid_) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        ADD_FAILURE() << "nbdsnapd did not exit within 30 s of SIGTERM";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
  }

  ToolResult nbdsnap(std::vector<std::string> args) {
    args.insert(args.begin(), {"--api", api_});
    ToolOptions opt;
    opt.cwd = tmp_.path();
    return run_tool(cli_, args, opt);
  }

  // Runs a --json command that must succeed; returns its object.
  JValue ok_json(std::vector<std::string> args) {
    args.insert(args.begin(), "--json");
    auto r = nbdsnap(args);
    EXPECT_EQ(r.exit_code, 0) << describe(r) << read_text(tmp_ / "nbdsnapd.log");
    std::string err;
    auto v = parse_json(r.out, &err);
    EXPECT_TRUE(v) << err << "\n" << r.out;
    return v ? *v : JValue();
  }

  TempDir tmp_;
  std::string cli_, daemon_, api_, volume_;
  pid_t pid_ = -1;
};

TEST_F(CliDaemon, SnapshotLifeCycleThroughTheCli) {
  auto vols = ok_json({"volume", "list"});
  ASSERT_EQ(vols["volumes"].size(), 1u) << vols.keys().size();
  EXPECT_EQ(vols["volumes"][0]["name"].str(), "vm1");
  EXPECT_EQ(vols["volumes"][0]["path"].str(), volume_);
  EXPECT_EQ(vols["volumes"][0]["size"].u64(), 8u << 20);

  auto cbt0 = ok_json({"cbt", "info", "vm1"});
  for (const char* key : {"generation", "sequence", "block_size", "block_count", "capacity"})
    EXPECT_TRUE(cbt0.has(key)) << key;
  EXPECT_EQ(cbt0["capacity"].u64(), 8u << 20);

  auto created = ok_json({"snapshot", "create", "vm1", "--name", "e2e"});
  EXPECT_EQ(created["state"].str(), "created");
  EXPECT_EQ(created["name"].str(), "e2e");
  const std::string id = created["id"].str();
  EXPECT_TRUE(std::regex_match(id, std::regex("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"))) << id;
  EXPECT_EQ(created["volumes"][0].str(), "vm1");

  auto taken = ok_json({"snapshot", "take", "e2e"});
  EXPECT_EQ(taken["id"].str(), id);
  EXPECT_EQ(taken["state"].str(), "taken");
  EXPECT_GT(taken["sequence"].u64(), 0u);
  ASSERT_EQ(taken["exports"].size(), 1u);
  EXPECT_EQ(taken["exports"][0].str(), "vm1@e2e");
  ASSERT_GE(taken["uris"].size(), 1u);
  EXPECT_TRUE(contains(taken["uris"][0].str(), "vm1@e2e")) << taken["uris"][0].str();

  auto info = ok_json({"snapshot", "info", id});  // by id; the name was used above
  EXPECT_EQ(info["name"].str(), "e2e");
  EXPECT_EQ(info["state"].str(), "taken");
  EXPECT_EQ(info["sequence"].u64(), taken["sequence"].u64());
  for (const char* key : {"capacity", "used", "limit", "path"}) EXPECT_TRUE(info["storage"].has(key)) << key;
  EXPECT_FALSE(info.has("error"));

  auto text = nbdsnap({"snapshot", "info", "e2e"});
  EXPECT_EQ(text.exit_code, 0) << describe(text);
  EXPECT_TRUE(contains(text.out, "state:     taken")) << text.out;
  EXPECT_TRUE(contains(text.out, "vm1@e2e")) << text.out;

  auto list = ok_json({"snapshot", "list"});
  bool listed = false;
  for (const auto& s : list["snapshots"].items) listed |= s["id"].str() == id;
  EXPECT_TRUE(listed);

  auto cbt = ok_json({"cbt", "info", "vm1"});
  auto changes = ok_json({"cbt", "changes", "vm1", "--since",
                          cbt["generation"].str() + ":" + std::to_string(taken["sequence"].u64()),
                          "--snapshot", "e2e"});
  EXPECT_EQ(changes["generation"].str(), cbt["generation"].str());
  EXPECT_TRUE(changes["ranges"].is_array());
  EXPECT_EQ(changes["changed_bytes"].u64(), 0u);  // nothing written since the take

  // A range marked dirty now is a change since the take (of the live map).
  EXPECT_EQ(ok_json({"cbt", "mark-dirty", "vm1", "64K:64K"}).size(), 0u);
  auto live = ok_json({"cbt", "changes", "vm1", "--since",
                       cbt["generation"].str() + ":" + std::to_string(taken["sequence"].u64())});
  ASSERT_EQ(live["ranges"].size(), 1u) << live["ranges"].size();
  EXPECT_EQ(live["ranges"][0][0].u64(), 65536u);
  EXPECT_EQ(live["ranges"][0][1].u64(), 65536u);
  EXPECT_EQ(live["changed_bytes"].u64(), 65536u);

  auto map = ok_json({"cbt", "map", "vm1"});
  EXPECT_EQ(map["stamps"].size(), cbt["block_count"].u64());
  EXPECT_EQ(map["block_size"].u64(), cbt["block_size"].u64());

  // Each connection sees the snapshot's events from the start: an 8 MiB
  // volume gets an 8 MiB storage limit, below diff_storage_minimum, so a
  // storage event may already be there; otherwise the wait times out.
  auto ev = ok_json({"snapshot", "wait-event", "e2e", "--timeout", "50"});
  ASSERT_TRUE(ev.has("event"));
  if (!ev["event"].is_null()) {
    const std::string code = ev["event"]["code"].str();
    EXPECT_TRUE(code == "no-space" || code == "low-free-space") << code;
    for (const char* key : {"time_ms", "requested", "volume", "error_code", "error"})
      EXPECT_TRUE(ev["event"].has(key)) << key;
  }

  auto destroyed = ok_json({"snapshot", "destroy", "e2e"});
  EXPECT_EQ(destroyed.size(), 0u);

  auto gone = nbdsnap({"snapshot", "info", "e2e"});
  EXPECT_EQ(gone.exit_code, 1) << describe(gone);
  EXPECT_EQ(gone.out, "");
  EXPECT_EQ(gone.err.rfind("nbdsnap: ", 0), 0u) << gone.err;
}

TEST_F(CliDaemon, VolumesAddedByRelativePathAndErrorsForUnknownNames) {
  {
    std::ofstream f(tmp_ / "vm2.img", std::ios::binary);
  }
  fs::resize_file(tmp_ / "vm2.img", 4 << 20);
  auto added = ok_json({"volume", "add", "vm2", "vm2.img"});  // relative to the CLI's directory
  EXPECT_EQ(added["path"].str(), tmp_ / "vm2.img");
  EXPECT_EQ(added["size"].u64(), 4u << 20);
  EXPECT_EQ(ok_json({"volume", "list"})["volumes"].size(), 2u);
  EXPECT_EQ(ok_json({"volume", "remove", "vm2"}).size(), 0u);

  auto r = nbdsnap({"snapshot", "create", "no-such-volume"});
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_TRUE(contains(r.err, "no-such-volume")) << r.err;
  r = nbdsnap({"cbt", "info", "no-such-volume"});
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  r = nbdsnap({"snapshot", "take", "no-such-snapshot"});
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_TRUE(contains(r.err, "no-such-snapshot")) << r.err;
}

}  // namespace
}  // namespace nbdsnap::test
