// Json: a small JSON value (null, bool, integer, string, array, object) for
// the CLI's --json output, and its serializer. Objects keep insertion order.
// Strings are written as UTF-8: valid sequences pass through unchanged, each
// byte of an invalid sequence becomes U+FFFD, '"' and '\' are escaped, and
// control characters are written as \n, \t, ... or \u00XX, so the output is
// always valid JSON (RFC 8259). A plain value type: no thread-safety concerns.
#pragma once

#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nbdsnap {

class Json {
 public:
  using Member = std::pair<std::string, Json>;

  Json() = default;  // null
  Json(std::nullptr_t) {}  // NOLINT: implicit by design, like the others
  Json(bool b) : type_(Type::kBool), b_(b) {}  // NOLINT
  template <std::integral T>
    requires(!std::same_as<T, bool>)
  Json(T v) {  // NOLINT
    if constexpr (std::is_signed_v<T>) {
      type_ = Type::kInt;
      i_ = v;
    } else {
      type_ = Type::kUint;
      u_ = v;
    }
  }
  Json(const char* s) : type_(Type::kString), s_(s) {}  // NOLINT
  Json(std::string s) : type_(Type::kString), s_(std::move(s)) {}  // NOLINT
  Json(std::string_view s) : type_(Type::kString), s_(s) {}  // NOLINT

  static Json array(std::vector<Json> items = {});
  static Json object(std::initializer_list<Member> members = {});
  // An array of the elements of any range (a repeated protobuf field, ...).
  template <typename Range>
  static Json array_of(const Range& range) {
    Json a = array();
    for (const auto& v : range) a.push(Json(v));
    return a;
  }

  // Appends to an array.
  Json& push(Json v);
  // Sets a member of an object (replaces an existing one of that key).
  Json& set(std::string key, Json v);

  // Compact, one line, no trailing newline.
  std::string dump() const;
  void dump_to(std::string* out) const;

 private:
  enum class Type { kNull, kBool, kInt, kUint, kString, kArray, kObject };
  Type type_ = Type::kNull;
  bool b_ = false;
  int64_t i_ = 0;
  uint64_t u_ = 0;
  std::string s_;
  std::vector<Json> items_;
  std::vector<Member> members_;
};

// Appends TEXT as a JSON string literal (with quotes) to *out.
void json_quote(std::string_view text, std::string* out);

}  // namespace nbdsnap
