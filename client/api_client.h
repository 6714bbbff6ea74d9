// ApiClient: a blocking client of nbdsnapd's public API (proto/api.proto)
// over its Unix socket: one connection, one request at a time. It fills in
// `tag` and `protocol`; an error reply becomes an error Status carrying the
// daemon's errno and message. Not thread-safe: one client per thread.
#pragma once

#include <string>

#include "api.pb.h"
#include "status.h"

namespace nbdsnap {

class ApiClient {
 public:
  ApiClient() = default;
  ~ApiClient();
  ApiClient(const ApiClient&) = delete;
  ApiClient& operator=(const ApiClient&) = delete;

  Status connect(const std::string& socket_path);
  Result<api::Response> call(api::Request request);
  void close();
  bool connected() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
  uint64_t next_tag_ = 1;
  std::string path_;
};

}  // namespace nbdsnap
