// cli::run() in process against a fake connection: which socket it uses,
// that usage errors never connect, error messages and exit codes, the
// paging of `cbt map`, and the text output for people.
#include <gtest/gtest.h>

#include <sstream>

#include "canned.h"
#include "cli.h"
#include "cli_test_util.h"
#include "json_parse.h"

namespace nbdsnap::cli {
namespace {

using test::canned_reply;

// Answers through `handler` (canned replies by default) and records what
// the CLI sent.
struct FakeDaemon {
  std::function<api::Response(const api::Request&)> handler = canned_reply;
  std::vector<api::Request> requests;
  std::vector<std::string> connect_paths;
  Status connect_error = Status::ok();

  class Connection : public ApiConnection {
   public:
    explicit Connection(FakeDaemon* d) : d_(d) {}
    Result<api::Response> call(const api::Request& request) override {
      d_->requests.push_back(request);
      api::Response r = d_->handler(request);
      if (r.error_code()) return Status::error(r.error_code(), r.error());
      return r;
    }

   private:
    FakeDaemon* d_;
  };

  ApiConnector connector() {
    return [this](const std::string& path) -> Result<std::unique_ptr<ApiConnection>> {
      connect_paths.push_back(path);
      if (!connect_error) return connect_error;
      return std::unique_ptr<ApiConnection>(new Connection(this));
    };
  }
};

struct RunResult {
  int rc;
  std::string out, err;
};

RunResult run_cli(FakeDaemon& d, const std::vector<std::string>& args, const std::string& env_api = "") {
  std::ostringstream out, err;
  CliIo io{out, err, env_api, d.connector()};
  int rc = run(args, io);
  return {rc, out.str(), err.str()};
}

std::string describe(const RunResult& r) { return "rc " + std::to_string(r.rc) + "\n" + r.out + "---\n" + r.err; }

json::JValue json_of(const RunResult& r) {
  std::string error;
  auto v = json::parse_json(r.out, &error);
  EXPECT_TRUE(v) << error << "\n" << r.out;
  return v ? *v : json::JValue();
}

bool contains(const std::string& s, std::string_view w) { return s.find(w) != std::string::npos; }

TEST(Run, UsageErrorsExitTwoAndNeverConnect) {
  std::vector<std::vector<std::string>> lines = {
      {},
      {"bogus"},
      {"snapshot"},
      {"snapshot", "create"},
      {"snapshot", "create", "vm1", "--limit", "12Q"},
      {"snapshot", "create", "vm1", "--limit", "0"},
      {"snapshot", "wait-event", "s1", "--timeout", "abc"},
      {"snapshot", "wait-event", "s1", "--timeout", "4294967296"},
      {"snapshot", "wait-event", "s1", "--timeout", "-1"},
      {"snapshot", "append-storage", "s1", "diff.img", "0:0"},
      {"snapshot", "append-storage", "s1", "diff.img", "4096"},
      {"cbt", "changes", "vm1", "--since", "nope"},
      {"cbt", "changes", "vm1", "--since", ":5"},
      {"cbt", "changes", "vm1", "--since", "gen:x"},
      {"cbt", "mark-dirty", "vm1", "4K:1Z"},
      {"cbt", "map", "vm1", "extra"},
  };
  for (const auto& line : lines) {
    FakeDaemon d;
    auto r = run_cli(d, line);
    std::string text;
    for (const auto& a : line) text += a + " ";
    EXPECT_EQ(r.rc, 2) << text << describe(r);
    EXPECT_TRUE(d.connect_paths.empty()) << text;
    EXPECT_TRUE(r.out.empty()) << text;
    EXPECT_EQ(r.err.rfind("nbdsnap: ", 0), 0u) << r.err;
    EXPECT_TRUE(contains(r.err, "\nusage: nbdsnap [--api PATH] [--json] ")) << r.err;
  }
}

TEST(Run, UsageErrorShowsTheCommandsUsage) {
  FakeDaemon d;
  auto r = run_cli(d, {"snapshot", "create", "vm1", "--limit", "12Q"});
  EXPECT_EQ(r.err,
            "nbdsnap: snapshot create: --limit '12Q': expected a size > 0 (K/M/G/T suffixes)\n"
            "usage: nbdsnap [--api PATH] [--json] snapshot create VOLUME... [--name NAME] [--storage PATH] "
            "[--limit SIZE]\n"
            "Try 'nbdsnap snapshot create --help'.\n");
}

TEST(Run, ApiSocketIsTheOptionElseTheEnvironmentElseTheDefault) {
  FakeDaemon d;
  EXPECT_EQ(run_cli(d, {"version"}).rc, 0);
  EXPECT_EQ(run_cli(d, {"version"}, "/env/api.sock").rc, 0);
  EXPECT_EQ(run_cli(d, {"--api", "/opt/api.sock", "version"}, "/env/api.sock").rc, 0);
  EXPECT_EQ(d.connect_paths, (std::vector<std::string>{"/run/nbdsnap/api.sock", "/env/api.sock", "/opt/api.sock"}));
}

TEST(Run, ConnectFailureExitsOneWithAHint) {
  FakeDaemon d;
  d.connect_error = Status::error(ENOENT, "connect /run/nbdsnap/api.sock: No such file or directory");
  for (bool json : {false, true}) {
    std::vector<std::string> args = {"snapshot", "list"};
    if (json) args.push_back("--json");
    auto r = run_cli(d, args);
    EXPECT_EQ(r.rc, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err,
              "nbdsnap: connect /run/nbdsnap/api.sock: No such file or directory (is nbdsnapd running? --api "
              "PATH)\n");
  }
}

TEST(Run, DaemonErrorExitsOneWithTheDaemonsMessage) {
  FakeDaemon d;
  d.handler = [](const api::Request&) {
    return test::error_response(ENOENT, "take: snapshot nope: no such snapshot");
  };
  for (bool json : {false, true}) {
    std::vector<std::string> args = {"snapshot", "take", "nope"};
    if (json) args.insert(args.begin(), "--json");
    auto r = run_cli(d, args);
    EXPECT_EQ(r.rc, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err, "nbdsnap: take: snapshot nope: no such snapshot\n");
  }
}

TEST(Run, TransportErrorsNameTheCommand) {
  FakeDaemon d;
  d.handler = [](const api::Request&) {
    return test::error_response(ECONNRESET, "reply from /x.sock: connection closed");
  };
  auto r = run_cli(d, {"snapshot", "info", "s1"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.err, "nbdsnap: snapshot info: reply from /x.sock: connection closed\n");
  d.handler = [](const api::Request&) { return test::error_response(EIO, ""); };
  r = run_cli(d, {"snapshot", "info", "s1"});
  EXPECT_EQ(r.err, "nbdsnap: snapshot info: Input/output error\n");
}

TEST(Run, AReplyOfTheWrongKindIsAnError) {
  FakeDaemon d;
  d.handler = [](const api::Request&) {
    api::Response r;
    r.mutable_destroy();
    return r;
  };
  auto r = run_cli(d, {"snapshot", "info", "s1"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(contains(r.err, "nbdsnap: snapshot info: unexpected reply from nbdsnapd")) << r.err;
}

TEST(Run, CbtMapFetchesEveryPage) {
  FakeDaemon d;
  auto r = run_cli(d, {"--json", "cbt", "map", "vm1", "--snapshot", "nightly"});
  ASSERT_EQ(r.rc, 0) << describe(r);
  auto j = json_of(r);
  EXPECT_EQ(j["generation"].str(), test::kGeneration);
  EXPECT_EQ(j["block_size"].u64(), 65536u);
  ASSERT_EQ(j["stamps"].size(), test::kCbtBlocks);
  for (uint64_t b = 0; b < test::kCbtBlocks; ++b) EXPECT_EQ(j["stamps"][b].u64(), test::canned_stamp(b));
  // cbt info (block size), then pages at 0, 4, 8 and the empty one at 10.
  ASSERT_EQ(d.requests.size(), 5u);
  EXPECT_EQ(d.requests[0].cbt_info().volume(), "vm1");
  std::vector<uint64_t> firsts;
  for (size_t k = 1; k < d.requests.size(); ++k) {
    EXPECT_EQ(d.requests[k].cbt_map().volume(), "vm1");
    EXPECT_EQ(d.requests[k].cbt_map().snapshot(), "nightly");
    EXPECT_GT(d.requests[k].cbt_map().block_count(), 0u);
    firsts.push_back(d.requests[k].cbt_map().first_block());
  }
  EXPECT_EQ(firsts, (std::vector<uint64_t>{0, 4, 8, 10}));
}

TEST(Run, CbtMapTextShowsRunsOfEqualStamps) {
  FakeDaemon d;
  auto r = run_cli(d, {"cbt", "map", "vm1"});
  ASSERT_EQ(r.rc, 0) << describe(r);
  EXPECT_EQ(r.out, "# cbt map of vm1: generation " + std::string(test::kGeneration) +
                       ", block size 65536, 10 blocks\n"
                       "# FIRST_BLOCK BLOCK_COUNT STAMP (runs of equal stamps)\n"
                       "0 3 0\n3 3 1\n6 3 2\n9 1 3\n");
}

TEST(Run, CbtMapFailsWhenTheGenerationChangesBetweenPages) {
  FakeDaemon d;
  d.handler = [](const api::Request& q) {
    api::Response r = canned_reply(q);
    if (q.has_cbt_map() && q.cbt_map().first_block() > 0) r.mutable_cbt_map()->set_generation("other");
    return r;
  };
  auto r = run_cli(d, {"cbt", "map", "vm1"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_TRUE(contains(r.err, "nbdsnap: cbt map: vm1: the CBT generation changed")) << r.err;
}

TEST(Run, CbtMapStopsAMapLongerThanItsBlockCount) {
  FakeDaemon d;
  d.handler = [](const api::Request& q) {
    api::Response r = canned_reply(q);
    if (q.has_cbt_map()) r.mutable_cbt_map()->add_stamps(1);  // never an empty page
    return r;
  };
  auto r = run_cli(d, {"cbt", "map", "vm1"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(contains(r.err, "more stamps than the 10 blocks")) << r.err;
}

TEST(Run, CbtMapOutputGoesToTheFile) {
  test::TempDir tmp;
  FakeDaemon d;
  std::string file = tmp / "map.json";
  auto r = run_cli(d, {"--json", "cbt", "map", "vm1", "--output", file});
  ASSERT_EQ(r.rc, 0) << describe(r);
  auto summary = json_of(r);
  EXPECT_EQ(summary["output"].str(), file);
  EXPECT_EQ(summary["block_count"].u64(), test::kCbtBlocks);
  std::string err;
  auto map = json::parse_json(test::read_text(file), &err);
  ASSERT_TRUE(map) << err;
  EXPECT_EQ((*map)["stamps"].size(), test::kCbtBlocks);

  std::string text_file = tmp / "map.txt";
  r = run_cli(d, {"cbt", "map", "vm1", "--output", text_file});
  ASSERT_EQ(r.rc, 0) << describe(r);
  EXPECT_EQ(r.out, "cbt map of vm1: 10 blocks written to " + text_file + "\n");
  EXPECT_TRUE(contains(test::read_text(text_file), "\n9 1 3\n"));

  r = run_cli(d, {"cbt", "map", "vm1", "--output", tmp / "no/such/dir/map"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(contains(r.err, "nbdsnap: cbt map: " + (tmp / "no/such/dir/map") + ": ")) << r.err;
}

TEST(Run, SnapshotInfoTextShowsStateSequenceUrisAndStorage) {
  FakeDaemon d;
  auto r = run_cli(d, {"snapshot", "info", "nightly"});
  ASSERT_EQ(r.rc, 0) << describe(r);
  for (const char* want : {"state:     taken", "sequence:  7", "name:      nightly",
                           "exports:   nbd+unix:///vm1@nightly?socket=/run/nbdsnap/nbd.sock",
                           "\n           nbd+unix:///vm2@nightly?socket=/run/nbdsnap/nbd.sock",
                           "storage:   3.0 MiB used of 2.0 GiB, limit 16.0 GiB", "chunks:    12 copied"})
    EXPECT_TRUE(contains(r.out, want)) << want << "\n" << r.out;
  EXPECT_FALSE(contains(r.out, "error:"));
}

TEST(Run, SnapshotInfoTextShowsTheErrorOfACorruptedSnapshot) {
  FakeDaemon d;
  d.handler = [](const api::Request&) {
    api::Response r;
    *r.mutable_snapshot_info()->mutable_snapshot() = test::sample_snapshot(api::CORRUPTED);
    return r;
  };
  auto r = run_cli(d, {"snapshot", "info", "nightly"});
  ASSERT_EQ(r.rc, 0) << describe(r);
  EXPECT_TRUE(contains(r.out, "state:     corrupted")) << r.out;
  EXPECT_TRUE(contains(r.out,
                       "error:     copy-before-write: volume vm1: chunk 17: no difference storage left "
                       "[No space left on device (ENOSPC)]"))
      << r.out;
}

TEST(Run, SnapshotCreatePrintsOnlyTheId) {
  FakeDaemon d;
  auto r = run_cli(d, {"snapshot", "create", "vm1"});
  ASSERT_EQ(r.rc, 0) << describe(r);
  EXPECT_EQ(r.out, std::string(test::kSnapId) + "\n");
  EXPECT_EQ(r.err, "");
}

TEST(Run, TextOutputOfTheOtherCommands) {
  struct Case {
    std::vector<std::string> args;
    std::vector<std::string> want;
  };
  std::vector<Case> cases = {
      {{"version"}, {"nbdsnap 0.1.0 (API protocol 1)\n", "nbdsnapd 0.1.0 (API protocol 1), data plane running, 2 restarts"}},
      {{"volume", "list"}, {"vm1: /srv/vm1.img, 8.0 GiB, chunk 256.0 KiB, CBT block 64.0 KiB\n",
                            "  nbd+unix:///vm1?socket=/run/nbdsnap/nbd.sock\n", "vm2: /dev/vg0/vm2"}},
      {{"volume", "add", "vm3", "/srv/vm3.img"}, {"volume vm3: /srv/vm3.img, 8.0 GiB\n", "  nbd://192.0.2.1:10809/vm3\n"}},
      {{"snapshot", "take", "nightly"},
       {"taken: nightly (" + std::string(test::kSnapId) + "), sequence 7, writes paused 850 us\n",
        "  nbd+unix:///vm2@nightly?socket=/run/nbdsnap/nbd.sock\n"}},
      {{"snapshot", "list"}, {"ID", "NAME", "STATE", "SEQUENCE", "nightly", "taken", "corrupted", "vm1,vm2"}},
      {{"snapshot", "wait-event", "nightly", "--timeout", "10"},
       {"2025-11-24T16:00:00.123Z low-free-space: 1.0 GiB more storage requested\n"}},
      {{"cbt", "info", "vm1"}, {"generation:  " + std::string(test::kGeneration), "sequence:    8",
                                "block size:  64.0 KiB (65536)", "blocks:      10"}},
      {{"cbt", "changes", "vm1", "--since", std::string(test::kGeneration) + ":3"},
       {"sequence 3 to 8: 192.0 KiB changed in 2 ranges", "\n0:65536\n1073741824:131072\n"}},
  };
  for (const auto& c : cases) {
    FakeDaemon d;
    auto r = run_cli(d, c.args);
    ASSERT_EQ(r.rc, 0) << c.args[0] << describe(r);
    for (const auto& w : c.want) EXPECT_TRUE(contains(r.out, w)) << w << "\n" << r.out;
  }
  for (std::vector<std::string> silent : std::vector<std::vector<std::string>>{
           {"volume", "remove", "vm1"},
           {"snapshot", "append-storage", "s1", "/d.img", "0:1G"},
           {"snapshot", "destroy", "s1"},
           {"cbt", "mark-dirty", "vm1", "0:4K"}}) {
    FakeDaemon d;
    auto r = run_cli(d, silent);
    EXPECT_EQ(r.rc, 0) << describe(r);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err, "");
  }
}

TEST(Run, WaitEventTextForTimeoutAndCorruption) {
  FakeDaemon d;
  d.handler = [](const api::Request&) {
    api::Response r;
    r.mutable_wait_event();
    return r;
  };
  auto r = run_cli(d, {"snapshot", "wait-event", "s1", "--timeout", "250"});
  EXPECT_EQ(r.rc, 0);
  EXPECT_EQ(r.out, "no event within 250 ms\n");
  d.handler = [](const api::Request&) {
    api::Response r;
    auto* e = r.mutable_wait_event()->mutable_event();
    e->set_code(link::CORRUPTED_EVENT);
    e->set_time_ms(0);
    e->set_volume("vm1");
    e->set_error_code(ENOSPC);
    e->set_error("copy-before-write: no difference storage left");
    return r;
  };
  r = run_cli(d, {"snapshot", "wait-event", "s1", "--timeout", "0"});
  EXPECT_EQ(r.out,
            "1970-01-01T00:00:00.000Z corrupted: volume vm1: copy-before-write: no difference storage left "
            "[No space left on device (ENOSPC)]\n");
}

TEST(Run, HelpAndVersionGoToStdoutAndNeedNoDaemon) {
  FakeDaemon d;
  auto h = run_cli(d, {"cbt", "changes", "--help"});
  EXPECT_EQ(h.rc, 0);
  EXPECT_TRUE(contains(h.out, "--since GENERATION:SEQUENCE")) << h.out;
  EXPECT_EQ(h.err, "");
  auto v = run_cli(d, {"--version"});
  EXPECT_EQ(v.rc, 0);
  EXPECT_EQ(v.out, std::string("nbdsnap ") + NBDSNAP_VERSION + " (API protocol 1)\n");
  auto vj = run_cli(d, {"--version", "--json"});
  EXPECT_EQ(json_of(vj)["version"].str(), NBDSNAP_VERSION);
  EXPECT_TRUE(d.connect_paths.empty());
}

TEST(Run, AnOutputThatCannotBeWrittenIsAFailure) {
  FakeDaemon d;
  for (std::vector<std::string> args : std::vector<std::vector<std::string>>{{"--help"}, {"snapshot", "list"}}) {
    std::ostringstream out, err;
    out.setstate(std::ios::badbit);  // as a full disk or a closed pipe would
    CliIo io{out, err, "", d.connector()};
    EXPECT_EQ(run(args, io), 1) << args[0];
    EXPECT_TRUE(contains(err.str(), "cannot write the output")) << err.str();
  }
}

}  // namespace
}  // namespace nbdsnap::cli
