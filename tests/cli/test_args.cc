// Argument parsing and help of the CLI (client/cli_args.h): the command
// table drives the parser and every help page, so these check the table
// against the contract (DESIGN.md section 8) and the parser's rules.
#include <gtest/gtest.h>

#include <set>

#include "cli.h"
#include "cli_args.h"

namespace nbdsnap::cli {
namespace {

using Action = ParsedArgs::Action;

ParsedArgs parse(std::vector<std::string> args) { return parse_args(args); }

bool contains(const std::string& text, std::string_view what) { return text.find(what) != std::string::npos; }

// TEXT with every run of spaces and newlines as one space (long synopses
// are wrapped in command lists).
std::string squash(const std::string& text) {
  std::string out;
  for (char c : text) {
    bool space = c == ' ' || c == '\n';
    if (space && !out.empty() && out.back() == ' ') continue;
    out += space ? ' ' : c;
  }
  return out;
}

TEST(CommandTable, HasExactlyTheCommandsOfTheContract) {
  std::set<std::string> have;
  for (const auto& c : commands()) {
    EXPECT_TRUE(have.insert(c.path()).second) << "twice: " << c.path();
    EXPECT_NE(c.handler, nullptr) << c.path();
    EXPECT_FALSE(c.summary.empty()) << c.path();
    EXPECT_FALSE(c.details.empty()) << c.path();
    EXPECT_TRUE(contains(c.output, "--json")) << c.path() << ": help must say what --json prints";
  }
  std::set<std::string> want = {"version",         "volume add",          "volume list",
                                "volume remove",   "snapshot create",     "snapshot append-storage",
                                "snapshot take",   "snapshot list",       "snapshot info",
                                "snapshot wait-event", "snapshot destroy", "cbt info",
                                "cbt map",         "cbt changes",         "cbt mark-dirty",
                                "backup",          "restore",             "verify"};
  EXPECT_EQ(have, want);
}

TEST(CommandTable, SynopsesMatchTheContract) {
  EXPECT_EQ(find_command("snapshot", "create")->synopsis(),
            "snapshot create VOLUME... [--name NAME] [--storage PATH] [--limit SIZE]");
  EXPECT_EQ(find_command("snapshot", "append-storage")->synopsis(), "snapshot append-storage ID PATH OFFSET:LENGTH...");
  EXPECT_EQ(find_command("snapshot", "wait-event")->synopsis(), "snapshot wait-event ID --timeout MS");
  EXPECT_EQ(find_command("cbt", "map")->synopsis(), "cbt map VOLUME [--snapshot ID] [--output FILE]");
  EXPECT_EQ(find_command("cbt", "changes")->synopsis(),
            "cbt changes VOLUME --since GENERATION:SEQUENCE [--snapshot ID]");
  EXPECT_EQ(find_command("cbt", "mark-dirty")->synopsis(), "cbt mark-dirty VOLUME OFFSET:LENGTH...");
  EXPECT_EQ(find_command("volume", "add")->synopsis(), "volume add NAME PATH");
  EXPECT_EQ(find_command("", "backup")->synopsis(),
            "backup [SNAPSHOT] --to DIR [--uri URI] [--volume NAME] [--full] [--connections N] [--tls-psk FILE] "
            "[--tls-username NAME] [--block-size SIZE]");
  EXPECT_EQ(find_command("", "verify")->synopsis(), "verify DIR [--backup NAME] [--connections N]");
}

TEST(CommandTable, OptionalArgumentsAndFlags) {
  auto* backup = find_command("", "backup");
  EXPECT_EQ(backup->min_args(), 0u);
  EXPECT_EQ(backup->max_args(), 1u);
  auto p = parse({"backup", "--to", "d", "--full"});
  ASSERT_EQ(p.action, ParsedArgs::Action::kRun) << p.error;
  EXPECT_TRUE(p.args.empty());
  EXPECT_EQ(p.options.at("--full"), "");
  p = parse({"backup", "snap", "--full", "--to", "d"});
  ASSERT_EQ(p.action, ParsedArgs::Action::kRun) << p.error;
  EXPECT_EQ(p.args, std::vector<std::string>{"snap"});
  EXPECT_EQ(p.options.at("--to"), "d");
  // A flag takes no value, an option needs one, neither twice.
  p = parse({"backup", "--to", "d", "--full=yes"});
  EXPECT_EQ(p.action, ParsedArgs::Action::kUsageError);
  EXPECT_EQ(p.error, "--full takes no value");
  p = parse({"backup", "--to", "d", "--full", "--full"});
  EXPECT_EQ(p.error, "--full given twice");
  p = parse({"backup", "a", "b", "--to", "d"});
  EXPECT_EQ(p.error, "unexpected argument 'b'");
  p = parse({"backup", "a"});
  EXPECT_EQ(p.error, "--to DIR is required");
  p = parse({"restore"});
  EXPECT_EQ(p.error, "missing DIR");
}

TEST(CommandTable, ArgumentCountsComeFromTheSynopsis) {
  auto* create = find_command("snapshot", "create");
  EXPECT_EQ(create->min_args(), 1u);
  EXPECT_EQ(create->max_args(), SIZE_MAX);
  auto* add = find_command("volume", "add");
  EXPECT_EQ(add->min_args(), 2u);
  EXPECT_EQ(add->max_args(), 2u);
  auto* list = find_command("snapshot", "list");
  EXPECT_EQ(list->min_args(), 0u);
  EXPECT_EQ(list->max_args(), 0u);
  auto* append = find_command("snapshot", "append-storage");
  EXPECT_EQ(append->min_args(), 3u);
  EXPECT_EQ(append->max_args(), SIZE_MAX);
}

TEST(Help, EveryCommandPageShowsItsSynopsisOptionsAndOutput) {
  for (const auto& c : commands()) {
    std::string h = help_text(nullptr, &c);
    EXPECT_TRUE(contains(h, "usage: nbdsnap [--api PATH] [--json] " + c.synopsis())) << h;
    for (const auto& o : c.options) {
      EXPECT_TRUE(contains(h, std::string(o.name) + " " + std::string(o.value))) << c.path() << "\n" << h;
      EXPECT_TRUE(contains(h, o.help.substr(0, 20))) << c.path() << "\n" << h;
    }
    EXPECT_TRUE(contains(h, "output:")) << h;
    std::string u = usage_text(nullptr, &c);
    EXPECT_TRUE(contains(u, c.synopsis())) << u;
    EXPECT_TRUE(contains(u, "nbdsnap " + c.path() + " --help")) << u;
  }
}

TEST(Help, GroupAndTopPagesListTheirCommands) {
  std::string top = help_text(nullptr, nullptr);
  for (const auto& c : commands()) {
    EXPECT_TRUE(contains(squash(top), c.synopsis())) << top;
    if (!c.group.empty()) {
      std::string g = help_text(find_group(c.group), nullptr);
      EXPECT_TRUE(contains(g, c.synopsis())) << g;
      EXPECT_TRUE(contains(usage_text(find_group(c.group), nullptr), c.synopsis()));
    }
  }
  for (const char* word : {"--api PATH", "--json", "--help", "--version", "NBDSNAP_API", "/run/nbdsnap/api.sock",
                           "Exit status", "K, M, G"})
    EXPECT_TRUE(contains(top, word)) << word;
  for (const char* word : {"backup [SNAPSHOT] --to DIR", "restore DIR", "verify DIR"})
    EXPECT_TRUE(contains(top, word)) << word;
}

TEST(Help, NoLineIsWiderThan79Columns) {
  std::vector<std::string> pages = {help_text(nullptr, nullptr)};
  for (const auto& g : groups()) pages.push_back(help_text(&g, nullptr));
  for (const auto& c : commands()) pages.push_back(help_text(nullptr, &c));
  for (const auto& page : pages) {
    size_t start = 0;
    while (start < page.size()) {
      size_t nl = page.find('\n', start);
      std::string line = page.substr(start, nl - start);
      // The usage line carries the whole synopsis and may be longer.
      if (line.rfind("usage:", 0) != 0) {
        EXPECT_LE(line.size(), 79u) << line;
      }
      start = nl + 1;
    }
  }
}

TEST(Parse, CommandWithArgumentsAndOptions) {
  auto p = parse({"snapshot", "create", "vm1", "--name", "nightly", "vm2", "--limit=1G"});
  ASSERT_EQ(p.action, Action::kRun) << p.error;
  EXPECT_EQ(p.command, find_command("snapshot", "create"));
  EXPECT_EQ(p.args, (std::vector<std::string>{"vm1", "vm2"}));
  EXPECT_EQ(p.options.at("--name"), "nightly");
  EXPECT_EQ(p.options.at("--limit"), "1G");
  EXPECT_FALSE(p.json);
  EXPECT_FALSE(p.api);
}

TEST(Parse, GlobalOptionsBeforeOrAfterTheCommand) {
  auto a = parse({"--json", "--api", "/x.sock", "snapshot", "list"});
  ASSERT_EQ(a.action, Action::kRun) << a.error;
  EXPECT_TRUE(a.json);
  EXPECT_EQ(a.api.value_or(""), "/x.sock");
  auto b = parse({"snapshot", "list", "--api=/y.sock", "--json"});
  ASSERT_EQ(b.action, Action::kRun) << b.error;
  EXPECT_TRUE(b.json);
  EXPECT_EQ(b.api.value_or(""), "/y.sock");
}

TEST(Parse, DoubleDashMakesTheRestPositional) {
  auto p = parse({"volume", "add", "--", "-odd", "--json"});
  ASSERT_EQ(p.action, Action::kRun) << p.error;
  EXPECT_EQ(p.args, (std::vector<std::string>{"-odd", "--json"}));
  EXPECT_FALSE(p.json);
}

TEST(Parse, HelpWinsAnywhereAndNamesTheDeepestCommand) {
  auto a = parse({"snapshot", "create", "--help"});
  EXPECT_EQ(a.action, Action::kHelp);
  EXPECT_EQ(a.command, find_command("snapshot", "create"));
  auto b = parse({"snapshot", "-h"});
  EXPECT_EQ(b.action, Action::kHelp);
  EXPECT_EQ(b.command, nullptr);
  EXPECT_EQ(b.group, find_group("snapshot"));
  auto c = parse({"--help"});
  EXPECT_EQ(c.action, Action::kHelp);
  EXPECT_EQ(c.command, nullptr);
  EXPECT_EQ(c.group, nullptr);
  auto d = parse({"cbt", "changes", "--help"});  // required --since is not needed for help
  EXPECT_EQ(d.action, Action::kHelp);
  EXPECT_EQ(d.command, find_command("cbt", "changes"));
  auto e = parse({"snapshot", "take", "a", "b", "-h"});
  EXPECT_EQ(e.action, Action::kHelp);
}

TEST(Parse, VersionOption) {
  EXPECT_EQ(parse({"--version"}).action, Action::kVersion);
  auto j = parse({"--json", "--version"});
  EXPECT_EQ(j.action, Action::kVersion);
  EXPECT_TRUE(j.json);
}

struct BadCase {
  std::vector<std::string> args;
  std::string error;
  const CommandSpec* command;
};

TEST(Parse, UsageErrorsNameTheProblem) {
  auto* create = find_command("snapshot", "create");
  auto* take = find_command("snapshot", "take");
  auto* add = find_command("volume", "add");
  auto* wait = find_command("snapshot", "wait-event");
  std::vector<BadCase> cases = {
      {{}, "no command given", nullptr},
      {{"frobnicate"}, "unknown command 'frobnicate'", nullptr},
      {{"snapshot"}, "missing command", nullptr},
      {{"snapshot", "frob"}, "unknown command 'frob'", nullptr},
      {{"snapshot", "create"}, "missing VOLUME", create},
      {{"volume", "add", "vm1"}, "missing PATH", add},
      {{"snapshot", "take", "a", "b"}, "unexpected argument 'b'", take},
      {{"snapshot", "create", "vm1", "--bogus"}, "unknown option --bogus", create},
      {{"snapshot", "create", "vm1", "--name"}, "--name needs a value", create},
      {{"snapshot", "create", "vm1", "--name="}, "--name needs a value", create},
      {{"snapshot", "create", "vm1", "--name", "a", "--name", "b"}, "--name given twice", create},
      {{"snapshot", "wait-event", "s1"}, "--timeout MS is required", wait},
      {{"snapshot", "take", ""}, "empty argument", take},
      {{"--api"}, "--api needs a value", nullptr},
      {{"--json=yes", "version"}, "--json takes no value", find_command("", "version")},
      {{"--name", "x", "snapshot", "list"}, "unknown option --name", nullptr},
      {{"snapshot", "list", "--timeout", "5"}, "unknown option --timeout", find_command("snapshot", "list")},
  };
  for (const auto& c : cases) {
    auto p = parse(c.args);
    std::string line;
    for (const auto& a : c.args) line += a + " ";
    EXPECT_EQ(p.action, Action::kUsageError) << line;
    EXPECT_EQ(p.error, c.error) << line;
    EXPECT_EQ(p.command, c.command) << line;
  }
}

TEST(AbsolutePath, IsMadeAbsoluteAgainstTheWorkingDirectory) {
  char* cwd = ::getcwd(nullptr, 0);
  std::string here = cwd;
  std::free(cwd);
  if (here == "/") here = "";
  EXPECT_EQ(absolute_path("diff.img"), here + "/diff.img");
  EXPECT_EQ(absolute_path("./a/./b/"), here + "/a/b");
  EXPECT_EQ(absolute_path("/x//y/."), "/x/y");
  EXPECT_EQ(absolute_path("/x/../y"), "/x/../y");  // ".." is left to the kernel (symlinks)
  EXPECT_EQ(absolute_path("/"), "/");
}

}  // namespace
}  // namespace nbdsnap::cli
