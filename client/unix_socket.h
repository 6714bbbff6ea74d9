// Connects a stream socket to a Unix socket path. Returns the descriptor
// (close-on-exec) or an error naming the path. Thread-safe.
#pragma once

#include <string>

#include "status.h"

namespace nbdsnap {

Result<int> connect_unix(const std::string& path);

}  // namespace nbdsnap
