// Parsing of sizes ("4K", "1G", "512") and ranges ("OFFSET:LENGTH") for the
// command-line tools. Binary suffixes K, M, G, T (and KiB...); pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace nbdsnap {

std::optional<uint64_t> parse_size(const std::string& text);
// "OFFSET:LENGTH", both sizes; length > 0.
std::optional<std::pair<uint64_t, uint64_t>> parse_range(const std::string& text);
// 1536 -> "1.5 KiB"
std::string human_size(uint64_t bytes);

}  // namespace nbdsnap
