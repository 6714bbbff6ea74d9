// LinkClient: blocking client of the plugin's control link (proto/link.proto).
// See framed_client.h for the contract.
#pragma once

#include "framed_client.h"
#include "link.pb.h"

namespace nbdsnap {

using LinkClient = FramedClient<link::Request, link::Response>;

}  // namespace nbdsnap
