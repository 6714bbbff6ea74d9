// The `nbdsnap` binary (NBDSNAP_CLI, set by meson) against a fake nbdsnapd:
// a thread serving the API socket with canned replies. Checks the requests
// the CLI sends (operation, fields, absolute paths, parsed sizes, protocol),
// its stdout (text and JSON, parsed), exit codes and stderr, and that the
// help of every command exits 0 and shows the command's options.
#include <gtest/gtest.h>

#include <functional>

#include "canned.h"
#include "cli_args.h"
#include "cli_test_util.h"
#include "frame.h"
#include "json_parse.h"

namespace nbdsnap::test {
namespace {
using json::JValue;
using json::parse_json;

bool contains(const std::string& s, std::string_view w) { return s.find(w) != std::string::npos; }

ToolOptions with_env(const std::string& key, const std::string& value) {
  ToolOptions o;
  o.set_env.emplace_back(key, value);
  return o;
}

class CliBinary : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* exe = std::getenv("NBDSNAP_CLI");
    if (!exe || !*exe) GTEST_SKIP() << "NBDSNAP_CLI is not set (run through `meson test`)";
    exe_ = exe;
    ASSERT_FALSE(tmp_.path().empty());
    server_ = std::make_unique<FakeApiServer>(tmp_ / "api.sock");
    ASSERT_TRUE(server_->ok()) << "fake API server on " << server_->path();
    server_->set_handler(canned_reply);
  }

  // Runs nbdsnap --api SOCKET ARGS... in the temporary directory.
  ToolResult cli(std::vector<std::string> args, ToolOptions opt = {}) {
    args.insert(args.begin(), {"--api", server_->path()});
    if (opt.cwd.empty()) opt.cwd = tmp_.path();
    return run_tool(exe_, args, opt);
  }
  ToolResult cli_raw(const std::vector<std::string>& args, ToolOptions opt = {}) {
    if (opt.cwd.empty()) opt.cwd = tmp_.path();
    return run_tool(exe_, args, opt);
  }

  JValue json_of(const ToolResult& r) {
    std::string error;
    auto v = parse_json(r.out, &error);
    EXPECT_TRUE(v) << error << "\n" << describe(r);
    EXPECT_TRUE(!r.out.empty() && r.out.back() == '\n' && r.out.find('\n') == r.out.size() - 1)
        << "one JSON object on one line:\n" << r.out;
    return v ? *v : JValue();
  }

  std::string exe_;
  TempDir tmp_;
  std::unique_ptr<FakeApiServer> server_;
};

TEST_F(CliBinary, HelpOfEveryCommandExitsZeroAndShowsItsOptions) {
  for (const auto& c : cli::commands()) {
    std::vector<std::string> args;
    if (!c.group.empty()) args.emplace_back(c.group);
    args.emplace_back(c.name);
    for (const char* flag : {"--help", "-h"}) {
      auto with = args;
      with.emplace_back(flag);
      auto r = cli_raw(with);
      EXPECT_EQ(r.exit_code, 0) << c.path() << " " << flag << "\n" << describe(r);
      EXPECT_EQ(r.err, "");
      EXPECT_TRUE(contains(r.out, "usage: nbdsnap [--api PATH] [--json] " + c.path())) << r.out;
      for (const auto& o : c.options)
        EXPECT_TRUE(contains(r.out, std::string(o.name) + " " + std::string(o.value))) << c.path() << "\n" << r.out;
    }
  }
  for (const char* group : {"volume", "snapshot", "cbt"}) {
    auto r = cli_raw({group, "--help"});
    EXPECT_EQ(r.exit_code, 0) << describe(r);
    for (const auto& c : cli::commands())
      if (c.group == group) {
        EXPECT_TRUE(contains(r.out, c.synopsis())) << r.out;
      }
  }
  auto top = cli_raw({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  // Long synopses are wrapped in the list: compare with runs of blanks squashed.
  std::string flat;
  for (char ch : top.out) {
    bool blank = ch == ' ' || ch == '\n';
    if (!(blank && !flat.empty() && flat.back() == ' ')) flat += blank ? ' ' : ch;
  }
  for (const auto& c : cli::commands()) EXPECT_TRUE(contains(flat, c.synopsis())) << top.out;
  EXPECT_EQ(server_->connections(), 0);
}

TEST_F(CliBinary, VersionFlagPrintsTheClientVersionWithoutADaemon) {
  auto r = cli_raw({"--version"}, with_env("NBDSNAP_API", tmp_ / "missing.sock"));
  EXPECT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, std::string("nbdsnap ") + NBDSNAP_VERSION + " (API protocol 1)\n");
}

TEST_F(CliBinary, UsageErrorsExitTwoWithoutConnecting) {
  std::vector<std::vector<std::string>> lines = {
      {},
      {"frobnicate"},
      {"snapshot"},
      {"snapshot", "create"},
      {"snapshot", "take", "a", "b"},
      {"snapshot", "create", "vm1", "--limit", "12Q"},
      {"snapshot", "create", "vm1", "--bogus"},
      {"snapshot", "wait-event", "s1"},
      {"cbt", "changes", "vm1"},
      {"cbt", "changes", "vm1", "--since", "nope"},
      {"cbt", "mark-dirty", "vm1", "5"},
      {"snapshot", "append-storage", "s1", "diff.img", "0:0"},
      {"backup", "vm1"},
  };
  for (const auto& line : lines) {
    for (bool json : {false, true}) {
      auto args = line;
      if (json) args.insert(args.begin(), "--json");
      auto r = cli(args);
      EXPECT_EQ(r.exit_code, 2) << describe(r);
      EXPECT_EQ(r.out, "");
      EXPECT_EQ(r.err.rfind("nbdsnap: ", 0), 0u) << r.err;
      EXPECT_TRUE(contains(r.err, "usage: nbdsnap [--api PATH] [--json]")) << r.err;
    }
  }
  EXPECT_EQ(server_->connections(), 0);
  auto r = cli({"snapshot", "take", "a", "b"});
  EXPECT_EQ(r.err,
            "nbdsnap: snapshot take: unexpected argument 'b'\n"
            "usage: nbdsnap [--api PATH] [--json] snapshot take ID\n"
            "Try 'nbdsnap snapshot take --help'.\n");
}

TEST_F(CliBinary, ConnectFailureExitsOneAndSaysWhatToCheck) {
  std::string missing = tmp_ / "missing.sock";
  auto r = cli_raw({"--api", missing, "snapshot", "list"});
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, "nbdsnap: connect " + missing + ": No such file or directory (is nbdsnapd running? --api PATH)\n");
}

TEST_F(CliBinary, ApiSocketComesFromTheEnvironmentUnlessGiven) {
  auto r = cli_raw({"version"}, with_env("NBDSNAP_API", server_->path()));
  EXPECT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(server_->requests().size(), 1u);
  std::string missing = tmp_ / "missing.sock";
  r = cli_raw({"--api", missing, "version"}, with_env("NBDSNAP_API", server_->path()));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "connect " + missing)) << r.err;
  if (!fs::exists("/run/nbdsnap/api.sock")) {
    r = cli_raw({"version"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(contains(r.err, "nbdsnap: connect /run/nbdsnap/api.sock: ")) << r.err;
  }
}

// One command line with --json: what the CLI must send and print.
struct Case {
  std::vector<std::string> args;
  api::Request::OpCase op;
  std::function<void(const api::Request&)> check_request;
  std::function<void(const JValue&)> check_json;
};

void expect_snapshot_object(const JValue& s) {
  for (const char* key : {"id", "name", "state", "sequence", "volumes", "exports", "uris", "storage"})
    EXPECT_TRUE(s.has(key)) << key;
  EXPECT_EQ(s["id"].str(), kSnapId);
  for (const char* key : {"capacity", "used", "limit", "path"}) EXPECT_TRUE(s["storage"].has(key)) << key;
  EXPECT_EQ(s["storage"]["capacity"].u64(), 2ull << 30);
  EXPECT_EQ(s["storage"]["used"].u64(), 3ull << 20);
  EXPECT_EQ(s["storage"]["limit"].u64(), 16ull << 30);
}

TEST_F(CliBinary, EveryCommandSendsItsRequestAndPrintsOneJsonObject) {
  const std::string dir = tmp_.path();
  std::vector<Case> cases = {
      {{"version"}, api::Request::kVersion, nullptr,
       [](const JValue& j) {
         EXPECT_EQ(j["version"].str(), NBDSNAP_VERSION);
         EXPECT_EQ(j["protocol"].u64(), 1u);
         EXPECT_EQ(j["daemon_version"].str(), "0.1.0");
         EXPECT_EQ(j["data_plane"].str(), "running");
       }},
      {{"volume", "add", "vm3", "img/vm3.img"}, api::Request::kVolumeAdd,
       [&](const api::Request& q) {
         EXPECT_EQ(q.volume_add().name(), "vm3");
         EXPECT_EQ(q.volume_add().path(), dir + "/img/vm3.img");
       },
       [&](const JValue& j) {
         EXPECT_EQ(j["name"].str(), "vm3");
         EXPECT_EQ(j["path"].str(), dir + "/img/vm3.img");
         EXPECT_EQ(j["size"].u64(), 8ull << 30);
         EXPECT_EQ(j["chunk_size"].u64(), 256u << 10);
         EXPECT_EQ(j["cbt_block_size"].u64(), 64u << 10);
         EXPECT_EQ(j["uris"][0].str(), "nbd+unix:///vm3?socket=/run/nbdsnap/nbd.sock");
       }},
      {{"volume", "list"}, api::Request::kVolumeList, nullptr,
       [](const JValue& j) {
         ASSERT_EQ(j["volumes"].size(), 2u);
         for (const char* key : {"name", "path", "size", "chunk_size", "cbt_block_size", "uris"})
           EXPECT_TRUE(j["volumes"][0].has(key)) << key;
         EXPECT_EQ(j["volumes"][1]["path"].str(), "/dev/vg0/vm2");
       }},
      {{"volume", "remove", "vm2"}, api::Request::kVolumeRemove,
       [](const api::Request& q) { EXPECT_EQ(q.volume_remove().name(), "vm2"); },
       [](const JValue& j) { EXPECT_EQ(j.size(), 0u); }},
      {{"snapshot", "create", "vm1", "vm2", "--name", "nightly", "--storage", "./diff/s.img", "--limit", "2G"},
       api::Request::kSnapshotCreate,
       [&](const api::Request& q) {
         const auto& c = q.snapshot_create();
         ASSERT_EQ(c.volumes_size(), 2);
         EXPECT_EQ(c.volumes(0), "vm1");
         EXPECT_EQ(c.volumes(1), "vm2");
         EXPECT_EQ(c.name(), "nightly");
         EXPECT_EQ(c.storage_path(), dir + "/diff/s.img");
         EXPECT_EQ(c.storage_limit(), 2ull << 30);
       },
       [](const JValue& j) {
         expect_snapshot_object(j);
         EXPECT_EQ(j["state"].str(), "created");
         EXPECT_EQ(j["name"].str(), "nightly");
         EXPECT_EQ(j["exports"].size(), 0u);
         EXPECT_FALSE(j.has("error"));
       }},
      {{"snapshot", "create", "vm1"}, api::Request::kSnapshotCreate,
       [](const api::Request& q) {
         EXPECT_EQ(q.snapshot_create().name(), "");
         EXPECT_EQ(q.snapshot_create().storage_path(), "");
         EXPECT_EQ(q.snapshot_create().storage_limit(), 0u);
       },
       [](const JValue& j) { EXPECT_EQ(j["state"].str(), "created"); }},
      {{"snapshot", "append-storage", "nightly", "diff.img", "0:1G", "1G:512M", "4096:4K"},
       api::Request::kAppendStorage,
       [&](const api::Request& q) {
         const auto& a = q.append_storage();
         EXPECT_EQ(a.id(), "nightly");
         EXPECT_EQ(a.path(), dir + "/diff.img");
         ASSERT_EQ(a.ranges_size(), 3);
         EXPECT_EQ(a.ranges(0).offset(), 0u);
         EXPECT_EQ(a.ranges(0).length(), 1ull << 30);
         EXPECT_EQ(a.ranges(1).offset(), 1ull << 30);
         EXPECT_EQ(a.ranges(1).length(), 512ull << 20);
         EXPECT_EQ(a.ranges(2).offset(), 4096u);
         EXPECT_EQ(a.ranges(2).length(), 4096u);
       },
       [](const JValue& j) { EXPECT_EQ(j.size(), 0u); }},
      {{"snapshot", "take", "nightly"}, api::Request::kTake,
       [](const api::Request& q) { EXPECT_EQ(q.take().id(), "nightly"); },
       [](const JValue& j) {
         expect_snapshot_object(j);
         EXPECT_EQ(j["state"].str(), "taken");
         EXPECT_EQ(j["sequence"].u64(), 7u);
         EXPECT_EQ(j["exports"][0].str(), "vm1@nightly");
         EXPECT_EQ(j["uris"][1].str(), "nbd+unix:///vm2@nightly?socket=/run/nbdsnap/nbd.sock");
         EXPECT_EQ(j["pause_us"].u64(), 850u);
       }},
      {{"snapshot", "list"}, api::Request::kSnapshotList, nullptr,
       [](const JValue& j) {
         ASSERT_EQ(j["snapshots"].size(), 2u);
         expect_snapshot_object(j["snapshots"][0]);
         EXPECT_EQ(j["snapshots"][0]["state"].str(), "taken");
         EXPECT_FALSE(j["snapshots"][0].has("error"));
         const JValue& bad = j["snapshots"][1];
         EXPECT_EQ(bad["state"].str(), "corrupted");
         EXPECT_EQ(bad["error_code"].i64(), ENOSPC);
         EXPECT_TRUE(contains(bad["error"].str(), "no difference storage left"));
       }},
      {{"snapshot", "info", kSnapId}, api::Request::kSnapshotInfo,
       [](const api::Request& q) { EXPECT_EQ(q.snapshot_info().id(), kSnapId); },
       [](const JValue& j) {
         expect_snapshot_object(j);
         EXPECT_EQ(j["volumes"][1].str(), "vm2");
         EXPECT_EQ(j["storage"]["path"].str(), "/var/lib/nbdsnap/storage/" + std::string(kSnapId) + ".diff");
       }},
      {{"snapshot", "wait-event", "nightly", "--timeout", "1500"}, api::Request::kWaitEvent,
       [](const api::Request& q) {
         EXPECT_EQ(q.wait_event().id(), "nightly");
         EXPECT_EQ(q.wait_event().timeout_ms(), 1500u);
       },
       [](const JValue& j) {
         const JValue& e = j["event"];
         EXPECT_EQ(e["code"].str(), "low-free-space");
         EXPECT_EQ(e["time_ms"].u64(), 1764000000123ull);
         EXPECT_EQ(e["requested"].u64(), 1ull << 30);
         for (const char* key : {"volume", "error_code", "error"}) EXPECT_TRUE(e.has(key)) << key;
       }},
      {{"snapshot", "destroy", "nightly"}, api::Request::kDestroy,
       [](const api::Request& q) { EXPECT_EQ(q.destroy().id(), "nightly"); },
       [](const JValue& j) { EXPECT_EQ(j.size(), 0u); }},
      {{"cbt", "info", "vm1"}, api::Request::kCbtInfo,
       [](const api::Request& q) { EXPECT_EQ(q.cbt_info().volume(), "vm1"); },
       [](const JValue& j) {
         EXPECT_EQ(j["generation"].str(), kGeneration);
         EXPECT_EQ(j["sequence"].u64(), 8u);
         EXPECT_EQ(j["block_size"].u64(), 65536u);
         EXPECT_EQ(j["block_count"].u64(), kCbtBlocks);
         EXPECT_EQ(j["capacity"].u64(), kCbtBlocks * 65536);
       }},
      {{"cbt", "changes", "vm1", "--since", std::string(kGeneration) + ":5", "--snapshot", "nightly"},
       api::Request::kCbtChanges,
       [](const api::Request& q) {
         const auto& c = q.cbt_changes();
         EXPECT_EQ(c.volume(), "vm1");
         EXPECT_EQ(c.generation(), kGeneration);
         EXPECT_EQ(c.since_sequence(), 5u);
         EXPECT_EQ(c.snapshot(), "nightly");
       },
       [](const JValue& j) {
         EXPECT_EQ(j["generation"].str(), kGeneration);
         EXPECT_EQ(j["sequence"].u64(), 8u);
         EXPECT_EQ(j["changed_bytes"].u64(), 65536u + 131072u);
         ASSERT_EQ(j["ranges"].size(), 2u);
         EXPECT_EQ(j["ranges"][1][0].u64(), 1ull << 30);
         EXPECT_EQ(j["ranges"][1][1].u64(), 131072u);
       }},
      {{"cbt", "mark-dirty", "vm1", "4K:8K", "1M:64K"}, api::Request::kCbtMarkDirty,
       [](const api::Request& q) {
         const auto& m = q.cbt_mark_dirty();
         EXPECT_EQ(m.volume(), "vm1");
         ASSERT_EQ(m.ranges_size(), 2);
         EXPECT_EQ(m.ranges(0).offset(), 4096u);
         EXPECT_EQ(m.ranges(0).length(), 8192u);
         EXPECT_EQ(m.ranges(1).offset(), 1u << 20);
         EXPECT_EQ(m.ranges(1).length(), 65536u);
       },
       [](const JValue& j) { EXPECT_EQ(j.size(), 0u); }},
      {{"cbt", "map", "vm1", "--snapshot", "nightly"}, api::Request::kCbtMap,
       [](const api::Request& q) {
         EXPECT_EQ(q.cbt_map().volume(), "vm1");
         EXPECT_EQ(q.cbt_map().snapshot(), "nightly");
       },
       [](const JValue& j) {
         EXPECT_EQ(j["generation"].str(), kGeneration);
         EXPECT_EQ(j["block_size"].u64(), 65536u);
         ASSERT_EQ(j["stamps"].size(), kCbtBlocks);
         EXPECT_EQ(j["stamps"][9].u64(), 3u);
       }},
  };

  std::vector<std::string> outputs;
  for (const auto& c : cases) {
    std::string line;
    for (const auto& a : c.args) line += a + " ";
    SCOPED_TRACE(line);
    size_t before = server_->requests().size();
    auto args = c.args;
    args.push_back("--json");  // global options may follow the command
    auto r = cli(args);
    ASSERT_EQ(r.exit_code, 0) << describe(r);
    EXPECT_EQ(r.err, "");
    auto reqs = server_->requests();
    ASSERT_GT(reqs.size(), before);
    const api::Request* main = nullptr;
    for (size_t k = before; k < reqs.size(); ++k) {
      EXPECT_EQ(reqs[k].protocol(), kApiProtocol);
      EXPECT_NE(reqs[k].tag(), 0u);
      if (reqs[k].op_case() == c.op && !main) main = &reqs[k];
    }
    ASSERT_NE(main, nullptr) << "no request of kind " << c.op;
    if (c.check_request) c.check_request(*main);
    JValue j = json_of(r);
    EXPECT_TRUE(j.is_object());
    c.check_json(j);
    outputs.push_back(r.out);
  }

  // Every output also parses with python3's json module.
  if (std::system("python3 -c 'import json' >/dev/null 2>&1") == 0) {
    std::string all = tmp_ / "outputs.jsonl";
    {
      std::ofstream f(all, std::ios::binary);
      for (const auto& o : outputs) f << o;
    }
    auto r = run_tool("/bin/sh", {"-c",
                                  "exec python3 -c 'import json,sys\n"
                                  "n=0\n"
                                  "for line in open(sys.argv[1],\"rb\"):\n"
                                  "  assert isinstance(json.loads(line.decode(\"utf-8\")), dict); n+=1\n"
                                  "print(n)' \"$0\"",
                                  all});
    EXPECT_EQ(r.exit_code, 0) << describe(r);
    EXPECT_EQ(r.out, std::to_string(outputs.size()) + "\n");
  }
}

TEST_F(CliBinary, WaitEventTimeoutIsANullEvent) {
  server_->set_handler([](const api::Request&) {
    api::Response r;
    r.mutable_wait_event();
    return r;
  });
  auto r = cli({"--json", "snapshot", "wait-event", "s1", "--timeout", "0"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, "{\"event\":null}\n");
  EXPECT_EQ(server_->requests().back().wait_event().timeout_ms(), 0u);
}

TEST_F(CliBinary, CorruptedEventInJson) {
  server_->set_handler([](const api::Request&) {
    api::Response r;
    auto* e = r.mutable_wait_event()->mutable_event();
    e->set_code(link::CORRUPTED_EVENT);
    e->set_time_ms(5);
    e->set_volume("vm1");
    e->set_error_code(ENOSPC);
    e->set_error("copy-before-write: no space");
    return r;
  });
  auto r = cli({"--json", "snapshot", "wait-event", "s1", "--timeout", "100"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  auto e = json_of(r)["event"];
  EXPECT_EQ(e["code"].str(), "corrupted");
  EXPECT_EQ(e["volume"].str(), "vm1");
  EXPECT_EQ(e["error_code"].i64(), ENOSPC);
  EXPECT_EQ(e["error"].str(), "copy-before-write: no space");
}

TEST_F(CliBinary, SnapshotCreatePrintsTheIdForScripts) {
  auto r = cli({"snapshot", "create", "vm1", "--name", "nightly"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, std::string(kSnapId) + "\n");
}

TEST_F(CliBinary, SnapshotInfoTextForPeople) {
  auto r = cli({"snapshot", "info", "nightly"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_TRUE(contains(r.out, "state:     taken")) << r.out;
  EXPECT_TRUE(contains(r.out, "sequence:  7")) << r.out;
  EXPECT_TRUE(contains(r.out, "nbd+unix:///vm1@nightly?socket=/run/nbdsnap/nbd.sock")) << r.out;
  EXPECT_TRUE(contains(r.out, "3.0 MiB used of 2.0 GiB, limit 16.0 GiB")) << r.out;
}

TEST_F(CliBinary, DaemonErrorsExitOneWithTheDaemonsMessage) {
  server_->set_handler([](const api::Request&) {
    return error_response(ESTALE, "cbt changes: volume vm1: generation g1 is not the current one (take a full "
                                  "backup)");
  });
  for (bool json : {false, true}) {
    std::vector<std::string> args = {"cbt", "changes", "vm1", "--since", "g1:4"};
    if (json) args.insert(args.begin(), "--json");
    auto r = cli(args);
    EXPECT_EQ(r.exit_code, 1) << describe(r);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err,
              "nbdsnap: cbt changes: volume vm1: generation g1 is not the current one (take a full backup)\n");
  }
}

TEST_F(CliBinary, ADaemonThatHangsUpIsAnError) {
  server_->set_mode(FakeApiServer::Mode::kCloseWithoutReply);
  auto r = cli({"snapshot", "take", "s1"});
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_EQ(r.err, "nbdsnap: snapshot take: reply from " + server_->path() + ": connection closed\n");
}

TEST_F(CliBinary, StringsFromTheDaemonAreEscapedInJson) {
  const std::string odd = "a \"quoted\" \\ back\nslash\t\x01 \xC3\xA9t\xC3\xA9 \xF0\x9F\x93\xB8";
  server_->set_handler([&](const api::Request&) {
    api::Response r;
    api::Snapshot s = sample_snapshot(api::CORRUPTED);
    s.set_name(odd);
    s.set_error(odd);
    *r.mutable_snapshot_info()->mutable_snapshot() = s;
    return r;
  });
  auto r = cli({"--json", "snapshot", "info", "x"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  auto j = json_of(r);
  EXPECT_EQ(j["name"].str(), odd);
  EXPECT_EQ(j["error"].str(), odd);
}

}  // namespace
}  // namespace nbdsnap::test
