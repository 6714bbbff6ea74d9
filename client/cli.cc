#include "cli.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "api_client.h"
#include "frame.h"

namespace nbdsnap::cli {
namespace {

class UnixConnection : public ApiConnection {
 public:
  Status connect(const std::string& path) { return client_.connect(path); }
  Result<api::Response> call(const api::Request& request) override { return client_.call(request); }

 private:
  ApiClient client_;
};

std::string version_line() {
  return std::string("nbdsnap ") + NBDSNAP_VERSION + " (API protocol " + std::to_string(kApiProtocol) + ")";
}

}  // namespace

ApiConnector unix_connector() {
  return [](const std::string& path) -> Result<std::unique_ptr<ApiConnection>> {
    auto c = std::make_unique<UnixConnection>();
    Status st = c->connect(path);
    if (!st) return st;
    return std::unique_ptr<ApiConnection>(std::move(c));
  };
}

std::string absolute_path(const std::string& path) {
  std::string full = path;
  if (path.empty() || path[0] != '/') {
    std::string cwd;
    if (char* d = ::getcwd(nullptr, 0)) {
      cwd = d;
      std::free(d);
    }
    full = cwd + "/" + path;
  }
  std::string out;
  size_t i = 0;
  while (i < full.size()) {
    size_t j = full.find('/', i);
    if (j == std::string::npos) j = full.size();
    std::string_view part(full.data() + i, j - i);
    if (!part.empty() && part != ".") {
      out += '/';
      out += part;
    }
    i = j + 1;
  }
  return out.empty() ? "/" : out;
}

const std::string* CommandContext::option(std::string_view name) const {
  auto it = parsed.options.find(name);
  return it == parsed.options.end() ? nullptr : &it->second;
}

std::optional<api::Response> CommandContext::call(const api::Request& request, int* exit_code) {
  if (!connection) {
    auto c = io.connector(api_path);
    if (!c) {
      *exit_code = failure(c.status().message() + " (is nbdsnapd running? --api PATH)");
      return std::nullopt;
    }
    connection = std::move(*c);
  }
  auto r = connection->call(request);
  if (!r) {
    Status st = r.status();
    std::string msg = st.message();
    // Transport errors ("reply from PATH: connection closed") do not name the
    // operation; the daemon's own messages do.
    if (msg.empty() || msg.rfind("reply from ", 0) == 0 || msg.rfind("request to ", 0) == 0)
      msg = command.path() + ": " + (msg.empty() ? std::strerror(st.code()) : msg);
    *exit_code = failure(msg);
    return std::nullopt;
  }
  if (r->reply_case() != static_cast<api::Response::ReplyCase>(request.op_case())) {
    *exit_code = failure(command.path() + ": unexpected reply from nbdsnapd (reply " +
                         std::to_string(r->reply_case()) + " to request " + std::to_string(request.op_case()) +
                         ")");
    return std::nullopt;
  }
  return std::move(*r);
}

int CommandContext::usage_error(const std::string& message) {
  io.err << "nbdsnap: " << command.path() << ": " << message << "\n" << usage_text(nullptr, &command);
  return 2;
}

int CommandContext::failure(const std::string& message) {
  io.err << "nbdsnap: " << message << "\n";
  return 1;
}

int CommandContext::print_json(const Json& value) {
  io.out << value.dump() << "\n";
  return 0;
}

namespace {

int dispatch(const ParsedArgs& p, CliIo& io) {
  switch (p.action) {
    case ParsedArgs::Action::kHelp:
      io.out << help_text(p.group, p.command);
      return 0;
    case ParsedArgs::Action::kVersion:
      if (p.json)
        io.out << Json::object({{"version", NBDSNAP_VERSION}, {"protocol", kApiProtocol}}).dump() << "\n";
      else
        io.out << version_line() << "\n";
      return 0;
    case ParsedArgs::Action::kUsageError: {
      std::string where = p.command ? p.command->path() + ": " : p.group ? std::string(p.group->name) + ": " : "";
      io.err << "nbdsnap: " << where << p.error << "\n" << usage_text(p.group, p.command);
      return 2;
    }
    case ParsedArgs::Action::kRun: break;
  }
  CommandContext ctx{*p.command, p, io, "", nullptr};
  ctx.api_path = p.api ? *p.api : !io.env_api.empty() ? io.env_api : std::string(kDefaultApiSocket);
  return p.command->handler(ctx);
}

}  // namespace

int run(const std::vector<std::string>& args, CliIo& io) {
  ParsedArgs p = parse_args(args);
  int rc = dispatch(p, io);
  io.out.flush();
  if (!io.out && rc == 0) {
    io.err << "nbdsnap: " << (p.command ? p.command->path() + ": " : "") << "cannot write the output\n";
    return 1;
  }
  return rc;
}

}  // namespace nbdsnap::cli
