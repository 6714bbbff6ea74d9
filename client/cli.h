// The `nbdsnap` CLI as a library: run() takes the command line (without
// argv[0]) and streams, parses it against the command table (cli_args.h),
// sends the command's requests to nbdsnapd and prints the result as text or
// as one JSON object. It returns the exit status: 0 ok, 1 the operation
// failed (message on stderr), 2 usage error (message and usage on stderr).
//
// The connection to the daemon is opened through an ApiConnector on the first
// request only, after every argument has been checked: a usage error never
// needs the daemon. Tests pass a fake connector; main() uses the real one
// (ApiClient on a Unix socket). Not thread-safe: one run() per CliIo.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "api.pb.h"
#include "cli_args.h"
#include "cli_json.h"
#include "status.h"

namespace nbdsnap::cli {

// One connection to nbdsnapd: one request at a time, in order.
class ApiConnection {
 public:
  virtual ~ApiConnection() = default;
  // An error reply is an error Status with the daemon's errno and message.
  virtual Result<api::Response> call(const api::Request& request) = 0;
};

using ApiConnector = std::function<Result<std::unique_ptr<ApiConnection>>(const std::string& api_path)>;

// ApiClient over the Unix socket API_PATH.
ApiConnector unix_connector();

struct CliIo {
  std::ostream& out;
  std::ostream& err;
  std::string env_api;  // NBDSNAP_API, "" if unset
  ApiConnector connector;
  bool err_is_tty = false;  // progress lines of long commands go to `err`
};

int run(const std::vector<std::string>& args, CliIo& io);

// What a command handler sees (cli_commands.cc).
struct CommandContext {
  const CommandSpec& command;
  const ParsedArgs& parsed;
  CliIo& io;
  std::string api_path;
  std::unique_ptr<ApiConnection> connection;  // opened by call()

  bool json() const { return parsed.json; }
  const std::vector<std::string>& args() const { return parsed.args; }
  // The value of an option, or nullptr when it was not given.
  const std::string* option(std::string_view name) const;

  // Sends REQUEST (connecting first if needed). On failure, prints
  // "nbdsnap: MESSAGE" and sets *exit_code = 1.
  std::optional<api::Response> call(const api::Request& request, int* exit_code);
  // Prints "nbdsnap: COMMAND: MESSAGE" and the command's usage; returns 2.
  int usage_error(const std::string& message);
  // Prints "nbdsnap: MESSAGE"; returns 1.
  int failure(const std::string& message);
  // Prints one JSON object and a newline on stdout; returns 0.
  int print_json(const Json& value);
};

// Handlers of backup, restore and verify (cli_backup.cc).
int cmd_backup(CommandContext& ctx);
int cmd_restore(CommandContext& ctx);
int cmd_verify(CommandContext& ctx);

// "." and "" components dropped, ".." kept (symlinks), made absolute
// against the current directory.
std::string absolute_path(const std::string& path);

}  // namespace nbdsnap::cli
