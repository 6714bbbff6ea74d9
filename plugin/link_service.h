// LinkService: answers one control-link Request with one Response by calling
// the Engine. No sockets and no nbdkit here (ControlLink carries the frames),
// so it is unit-testable. Safe for concurrent use (the Engine is).
#pragma once

#include "engine.h"
#include "link.pb.h"

namespace nbdsnap {

link::Response handle_request(Engine& engine, const link::Request& request);

}  // namespace nbdsnap
