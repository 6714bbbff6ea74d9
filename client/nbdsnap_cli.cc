// nbdsnap: the management CLI of nbdsnapd (see docs/nbdsnap.md). The work is
// in cli.cc; this is main(): arguments, streams, NBDSNAP_API.
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>

#include "cli.h"

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);  // a closed stdout or socket is an error, not a kill
  std::vector<std::string> args(argv + 1, argv + argc);
  const char* env = std::getenv("NBDSNAP_API");
  nbdsnap::cli::CliIo io{std::cout, std::cerr, env ? env : "", nbdsnap::cli::unix_connector(), ::isatty(2) == 1};
  return nbdsnap::cli::run(args, io);
}
