// Command table and argument parsing of the `nbdsnap` CLI. Every command is
// one CommandSpec: its words, positional arguments, options and help text.
// The parser, the usage lines, every --help page and the argument counts are
// all generated from that table, so the help cannot drift from the code.
// Pure functions over constant data: thread-safe.
//
// Command line: nbdsnap [GLOBAL...] COMMAND [SUBCOMMAND] [ARG | OPTION]...
// Global options (--api PATH, --json, --help/-h, --version) may appear
// anywhere before "--"; a command's options anywhere after its words, as
// "--opt VALUE" or "--opt=VALUE". After "--" every word is positional.
#pragma once

#include <map>
#include <optional>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace nbdsnap::cli {

struct CommandContext;  // cli.h
using Handler = int (*)(CommandContext& ctx);

struct OptionSpec {
  std::string_view name;   // "--name"
  std::string_view value;  // "NAME"; empty: a flag that takes no value (stored as "")
  std::string_view help;
  bool required = false;
};

struct CommandSpec {
  std::string_view group;  // "snapshot", "volume", "cbt"; "" for top-level commands
  std::string_view name;   // "create"
  // Positional arguments as shown in the usage: "ID PATH OFFSET:LENGTH...".
  // Each word is one argument; a final word ending in "..." repeats (one or
  // more); words in brackets ("[SNAPSHOT]") are optional and come last. The
  // argument count checks come from this string.
  std::string_view args;
  std::vector<OptionSpec> options;
  std::string_view summary;  // one line, for command lists
  std::string_view details;  // paragraphs of --help
  std::string output;        // what it prints: text, then --json keys
  Handler handler = nullptr;

  std::string path() const;      // "snapshot create"
  std::string synopsis() const;  // "snapshot create VOLUME... [--name NAME] ..."
  size_t min_args() const;
  size_t max_args() const;  // SIZE_MAX if the last argument repeats
  const OptionSpec* option(std::string_view name) const;
};

struct GroupSpec {
  std::string_view name;
  std::string_view summary;
};

// The tables (cli_commands.cc).
const std::vector<CommandSpec>& commands();
const std::vector<GroupSpec>& groups();
const CommandSpec* find_command(std::string_view group, std::string_view name);
const GroupSpec* find_group(std::string_view name);

constexpr std::string_view kDefaultApiSocket = "/run/nbdsnap/api.sock";

// The result of parsing a command line (without argv[0]).
struct ParsedArgs {
  enum class Action {
    kRun,           // run `command`
    kHelp,          // print help_text() to stdout, exit 0
    kVersion,       // --version: print the client version, exit 0
    kUsageError,    // print `error` and usage_text() to stderr, exit 2
  };
  Action action = Action::kUsageError;
  std::string error;                 // kUsageError: what is wrong
  const CommandSpec* command = nullptr;  // kRun; kHelp/kUsageError: the command concerned, if known
  const GroupSpec* group = nullptr;      // kHelp/kUsageError on a group ("nbdsnap snapshot")
  std::optional<std::string> api;    // --api
  bool json = false;
  std::vector<std::string> args;                      // positional arguments
  std::map<std::string, std::string, std::less<>> options;  // "--name" -> value
};

ParsedArgs parse_args(const std::vector<std::string>& argv);

// Help pages (stdout) and short usages (stderr, after a usage error) for the
// whole tool (command and group null), a group, or a command.
std::string help_text(const GroupSpec* group, const CommandSpec* command);
std::string usage_text(const GroupSpec* group, const CommandSpec* command);

}  // namespace nbdsnap::cli
