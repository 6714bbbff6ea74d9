#include "options.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "engine.h"
#include "params.h"

namespace nbdsnap::daemon {
namespace {

namespace fs = std::filesystem;

std::string absolute(const std::string& p) {
  std::error_code ec;
  fs::path a = fs::absolute(p, ec);
  if (ec) return p;
  return a.lexically_normal().string();
}

bool file_exists(const std::string& p) { return ::access(p.c_str(), F_OK) == 0; }

std::string self_dir() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  return exe.parent_path().string();
}

std::string run_pkg_config() {
  std::unique_ptr<FILE, int (*)(FILE*)> p(::popen("pkg-config --variable=plugindir nbdkit 2>/dev/null", "r"),
                                          ::pclose);
  if (!p) return "";
  char buf[4096];
  std::string out;
  while (std::fgets(buf, sizeof buf, p.get())) out += buf;
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

}  // namespace

std::string usage_text() {
  return R"(Usage: nbdsnapd [OPTION]...
The nbdsnap control-plane daemon: serves the public API on a Unix socket,
runs and supervises nbdkit with the nbdsnap plugin (the data plane), keeps
the registry of volumes and managed difference storage.

  --state-dir DIR        state directory (default /var/lib/nbdsnap): registry,
                         data plane state (DIR/data), managed storage
                         (DIR/storage), control link socket, log
  --api-socket PATH      Unix socket of the public API
                         (default /run/nbdsnap/api.sock)
  --nbd-socket PATH      Unix socket serving NBD (default /run/nbdsnap/nbd.sock)
  --nbd-listen HOST:PORT also serve NBD on TCP (IPv6: [ADDR]:PORT; port 0 picks
                         a free port, shown in the volume URIs)
  --tls-psk FILE         require TLS with this PSK file on every NBD connection
  --volume NAME=PATH     serve PATH as volume NAME (repeatable); added to the
                         registry if NAME is not known yet
  --api-group GROUP      API and NBD socket mode 0660 with this group
                         (default: mode 0600, owner only)
  --param KEY=VALUE      data plane parameter (repeatable), for example
                         diff_storage_minimum=2097152 (sectors; growth step of
                         managed storage), chunk_minimum_shift=18; see
                         nbdkit-nbdsnap-plugin(1) for every key
  --plugin PATH          the nbdkit plugin (default: $NBDSNAP_PLUGIN, else the
                         build tree's, else nbdkit's plugin directory)
  --nbdkit PATH          the nbdkit program (default: nbdkit from PATH)
  --foreground           do not daemonize; log to stderr
  --help                 show this help and exit
  --version              show the version and exit

Without --foreground the daemon detaches (fork, setsid), logs to
DIR/nbdsnapd.log, and the starting process exits 0 once the API socket is
ready (1 with the error otherwise).

Exit status: 0 ok (stopped by SIGTERM or SIGINT), 1 startup failed (the message
names the operation and the cause), 2 usage error.
)";
}

bool split_host_port(const std::string& text, std::string* host, std::string* port) {
  std::string h, p;
  if (!text.empty() && text[0] == '[') {
    auto close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') return false;
    h = text.substr(1, close - 1);
    p = text.substr(close + 2);
    if (h.empty()) return false;
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string::npos) return false;
    h = text.substr(0, colon);
    p = text.substr(colon + 1);
    if (h.find(':') != std::string::npos) return false;  // IPv6 needs brackets
  }
  if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos) return false;
  if (std::stoul(p) > 65535) return false;
  *host = h;
  *port = p;
  return true;
}

ParseOutcome parse_options(int argc, char** argv, Options* o, std::string* error) {
  Params params;  // validates --param values as the plugin will
  auto usage = [&](const std::string& msg) {
    *error = msg + " (see nbdsnapd --help)";
    return ParseOutcome::kUsage;
  };
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_inline = false;
    if (arg.rfind("--", 0) == 0) {
      auto eq = arg.find('=');
      if (eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_inline = true;
      }
    }
    auto flag = [&](const char* name) { return arg == name; };
    auto need_value = [&]() -> bool {
      if (has_inline) return true;
      if (i + 1 >= argc) return false;
      value = argv[++i];
      return true;
    };
    if (flag("--help") || flag("--version") || flag("--foreground")) {
      if (has_inline) return usage("option " + arg + " takes no value");
      if (flag("--help")) {
        std::fputs(usage_text().c_str(), stdout);
        return ParseOutcome::kExit;
      }
      if (flag("--version")) {
        std::printf("nbdsnapd %s (API protocol 1)\n", NBDSNAP_VERSION);
        return ParseOutcome::kExit;
      }
      o->foreground = true;
      continue;
    }
    static const char* kWithValue[] = {"--state-dir", "--api-socket", "--nbd-socket", "--nbd-listen",
                                       "--tls-psk",   "--volume",     "--api-group",  "--param",
                                       "--plugin",    "--nbdkit"};
    bool known = false;
    for (const char* k : kWithValue) known = known || flag(k);
    if (!known) {
      if (arg.rfind("-", 0) == 0) return usage("unknown option " + arg);
      return usage("unexpected argument " + arg);
    }
    if (!need_value()) return usage("option " + arg + " needs a value");
    if (value.empty()) return usage("option " + arg + ": empty value");
    if (flag("--state-dir")) {
      o->state_dir = absolute(value);
    } else if (flag("--api-socket")) {
      o->api_socket = absolute(value);
    } else if (flag("--nbd-socket")) {
      o->nbd_socket = absolute(value);
    } else if (flag("--nbd-listen")) {
      if (!split_host_port(value, &o->listen_host, &o->listen_port))
        return usage("--nbd-listen " + value + ": expected HOST:PORT, [IPV6]:PORT or :PORT");
      o->nbd_listen = value;
    } else if (flag("--tls-psk")) {
      o->tls_psk = absolute(value);
    } else if (flag("--volume")) {
      auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == value.size())
        return usage("--volume " + value + ": expected NAME=PATH");
      std::string name = value.substr(0, eq);
      Status st = check_name("volume", name);
      if (!st) return usage("--volume " + value + ": " + st.message());
      for (const auto& v : o->volumes)
        if (v.first == name) return usage("--volume " + name + " given twice");
      o->volumes.emplace_back(name, absolute(value.substr(eq + 1)));
    } else if (flag("--api-group")) {
      o->api_group = value;
    } else if (flag("--param")) {
      auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == value.size())
        return usage("--param " + value + ": expected KEY=VALUE");
      std::string key = value.substr(0, eq), v = value.substr(eq + 1);
      Status st = params.set(key, v);
      if (st.code() == ENOENT) return usage("--param " + key + ": unknown parameter");
      if (!st) return usage("--param " + value + ": " + st.message());
      bool replaced = false;
      for (auto& p : o->params)
        if (p.first == key) {
          p.second = v;
          replaced = true;
        }
      if (!replaced) o->params.emplace_back(key, v);
    } else if (flag("--plugin")) {
      o->plugin = absolute(value);
    } else if (flag("--nbdkit")) {
      o->nbdkit = value.find('/') == std::string::npos ? value : absolute(value);
    }
  }
  Status st = params.validate();
  if (!st) return usage("--param: " + st.message());
  o->diff_storage_minimum_bytes = params.diff_storage_minimum_bytes();
  return ParseOutcome::kRun;
}

std::string resolve_plugin(const Options& o) {
  if (!o.plugin.empty()) return o.plugin;
  const char* env = std::getenv("NBDSNAP_PLUGIN");
  if (env && *env) return absolute(env);
  std::string dir = self_dir();
  if (!dir.empty()) {
    std::string p = (fs::path(dir) / ".." / "plugin" / "nbdkit-nbdsnap-plugin.so").lexically_normal().string();
    if (file_exists(p)) return p;
  }
  std::string plugindir = run_pkg_config();
  if (!plugindir.empty()) {
    std::string p = plugindir + "/nbdkit-nbdsnap-plugin.so";
    if (file_exists(p)) return p;
  }
  return "nbdsnap";
}

}  // namespace nbdsnap::daemon
