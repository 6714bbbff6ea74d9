// Uuid: a 16-byte random (version 4) identifier for snapshots and CBT
// generations, with its canonical text form. A plain value.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

namespace nbdsnap {

struct Uuid {
  std::array<uint8_t, 16> bytes{};
  static Uuid random();
  static std::optional<Uuid> parse(const std::string& text);
  static std::optional<Uuid> from_bytes(const std::string& raw);
  std::string str() const;
  std::string raw() const { return std::string(bytes.begin(), bytes.end()); }
  bool is_nil() const;
  friend bool operator==(const Uuid&, const Uuid&) = default;
  friend auto operator<=>(const Uuid&, const Uuid&) = default;
};

}  // namespace nbdsnap
