// ApiClient: blocking client of nbdsnapd's public API (proto/api.proto); it
// also fills in `protocol` (kApiProtocol). See framed_client.h.
#pragma once

#include "api.pb.h"
#include "framed_client.h"

namespace nbdsnap {

using ApiClient = FramedClient<api::Request, api::Response>;

}  // namespace nbdsnap
