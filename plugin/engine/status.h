// Status and Result: errors as values inside the engine.
//
// A Status is success or an (errno, message) pair; the message names the
// operation and the cause ("take: snapshot X: no difference storage").
// Result<T> is a T or a Status. Both are plain values: no thread-safety
// concerns beyond those of the contained T.
#pragma once

#include <cerrno>
#include <string>
#include <utility>
#include <variant>

namespace nbdsnap {

class Status {
 public:
  Status() = default;
  static Status ok() { return Status(); }
  static Status error(int code, std::string message) {
    return Status(code == 0 ? EIO : code, std::move(message));
  }
  // Error from the current errno, "OP: strerror(errno)".
  static Status from_errno(const std::string& op);
  static Status from_errno(const std::string& op, int code);

  bool is_ok() const { return code_ == 0; }
  explicit operator bool() const { return is_ok(); }
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  // Prefix the message with more context: "CTX: message".
  Status with_context(const std::string& ctx) const;

 private:
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {}
  int code_ = 0;
  std::string message_;
};

template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}   // NOLINT
  bool is_ok() const { return v_.index() == 0; }
  explicit operator bool() const { return is_ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  T* operator->() { return &value(); }
  Status status() const { return is_ok() ? Status::ok() : std::get<1>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace nbdsnap
