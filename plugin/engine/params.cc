#include "params.h"

#include <charconv>

namespace nbdsnap {
namespace {

template <typename T>
Status parse(const std::string& key, const std::string& text, T* out) {
  T v{};
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || text.empty())
    return Status::error(EINVAL, "config: " + key + "=" + text + ": not a non-negative integer");
  *out = v;
  return Status::ok();
}

}  // namespace

bool Params::is_key(const std::string& key) {
  Params p;
  return p.set(key, "0").code() != ENOENT;
}

Status Params::set(const std::string& key, const std::string& value) {
  if (key == "tracking_block_minimum_shift") return parse(key, value, &tracking_block_minimum_shift);
  if (key == "tracking_block_maximum_count") return parse(key, value, &tracking_block_maximum_count);
  if (key == "tracking_block_maximum_shift") return parse(key, value, &tracking_block_maximum_shift);
  if (key == "chunk_minimum_shift") return parse(key, value, &chunk_minimum_shift);
  if (key == "chunk_maximum_count") return parse(key, value, &chunk_maximum_count);
  if (key == "chunk_maximum_shift") return parse(key, value, &chunk_maximum_shift);
  if (key == "chunk_maximum_in_queue") return parse(key, value, &chunk_maximum_in_queue);
  if (key == "free_diff_buffer_pool_size") return parse(key, value, &free_diff_buffer_pool_size);
  if (key == "diff_storage_minimum") return parse(key, value, &diff_storage_minimum);
  if (key == "diff_storage_zero_fill") return parse(key, value, &diff_storage_zero_fill);
  return Status::error(ENOENT, "config: unknown key " + key);
}

Status Params::validate() const {
  auto bad = [](const std::string& what) { return Status::error(EINVAL, "config: " + what); };
  if (tracking_block_minimum_shift < 12 || tracking_block_minimum_shift > 30)
    return bad("tracking_block_minimum_shift must be 12..30 (4 KiB..1 GiB)");
  if (tracking_block_maximum_shift < tracking_block_minimum_shift || tracking_block_maximum_shift > 40)
    return bad("tracking_block_maximum_shift must be >= tracking_block_minimum_shift and <= 40");
  if (tracking_block_maximum_count == 0) return bad("tracking_block_maximum_count must be > 0");
  if (chunk_minimum_shift < 12 || chunk_minimum_shift > 30)
    return bad("chunk_minimum_shift must be 12..30 (4 KiB..1 GiB)");
  if (chunk_maximum_shift < chunk_minimum_shift || chunk_maximum_shift > 30)
    return bad("chunk_maximum_shift must be >= chunk_minimum_shift and <= 30");
  if (chunk_maximum_count == 0) return bad("chunk_maximum_count must be > 0");
  if (chunk_maximum_in_queue == 0) return bad("chunk_maximum_in_queue must be > 0");
  if (diff_storage_minimum < 8) return bad("diff_storage_minimum must be >= 8 sectors");
  if (diff_storage_zero_fill > 1) return bad("diff_storage_zero_fill must be 0 or 1");
  return Status::ok();
}

}  // namespace nbdsnap
