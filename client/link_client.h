// LinkClient: a blocking client of the plugin's control link (one Unix
// socket connection; one request at a time). Errors come back as Status
// whose code is the plugin's errno and whose message is the plugin's.
// Not thread-safe: use one client per thread.
#pragma once

#include <string>

#include "link.pb.h"
#include "status.h"

namespace nbdsnap {

class LinkClient {
 public:
  LinkClient() = default;
  ~LinkClient();
  LinkClient(const LinkClient&) = delete;
  LinkClient& operator=(const LinkClient&) = delete;

  Status connect(const std::string& socket_path);
  // Sends the request and returns the reply; a reply with error_code != 0
  // becomes an error Status.
  Result<link::Response> call(link::Request request);
  void close();

 private:
  int fd_ = -1;
  uint64_t next_tag_ = 1;
  std::string path_;
};

}  // namespace nbdsnap
