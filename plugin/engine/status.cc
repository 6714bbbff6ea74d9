#include "status.h"

#include <cstring>

namespace nbdsnap {

Status Status::from_errno(const std::string& op) { return from_errno(op, errno); }

Status Status::from_errno(const std::string& op, int code) {
  if (code == 0) code = EIO;
  return Status(code, op + ": " + std::strerror(code));
}

Status Status::with_context(const std::string& ctx) const {
  if (is_ok()) return *this;
  return Status(code_, ctx + ": " + message_);
}

}  // namespace nbdsnap
