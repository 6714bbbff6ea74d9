// Command line of nbdsnapd (DESIGN section 8): parsing, validation and the
// --help text. Pure functions apart from resolving relative paths against
// the current directory; no threads.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace nbdsnap::daemon {

struct Options {
  std::string state_dir = "/var/lib/nbdsnap";
  std::string api_socket = "/run/nbdsnap/api.sock";
  std::string nbd_socket = "/run/nbdsnap/nbd.sock";
  std::string nbd_listen;            // HOST:PORT as given ("" = no TCP)
  std::string listen_host, listen_port;
  std::string tls_psk;               // PSK file ("" = no TLS)
  std::vector<std::pair<std::string, std::string>> volumes;  // --volume NAME=PATH
  bool foreground = false;
  std::string api_group;             // "" = API socket mode 0600
  std::vector<std::pair<std::string, std::string>> params;   // --param KEY=VALUE, plugin keys
  uint64_t diff_storage_minimum_bytes = 2097152ull * 512;
  std::string plugin;                // "" = default (see resolve_plugin)
  std::string nbdkit = "nbdkit";
};

enum class ParseOutcome {
  kRun,    // options are valid
  kExit,   // --help or --version printed to stdout: exit 0
  kUsage,  // *error holds the message: exit 2
};

ParseOutcome parse_options(int argc, char** argv, Options* out, std::string* error);
std::string usage_text();

// The plugin to run: --plugin, else $NBDSNAP_PLUGIN, else
// ../plugin/nbdkit-nbdsnap-plugin.so next to this binary (build tree), else
// `pkg-config --variable=plugindir nbdkit`/nbdkit-nbdsnap-plugin.so, else the
// plugin name "nbdsnap" (nbdkit looks in its own plugin directory).
std::string resolve_plugin(const Options& o);

// Splits "HOST:PORT", "[V6]:PORT" or ":PORT". False if malformed.
bool split_host_port(const std::string& text, std::string* host, std::string* port);

}  // namespace nbdsnap::daemon
