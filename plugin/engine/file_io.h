// Small helpers for whole-buffer positional I/O on file descriptors, with
// retries on EINTR and short transfers, and errors as Status naming `op`.
// Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "status.h"

namespace nbdsnap {

Status pread_all(int fd, void* buf, uint64_t length, uint64_t offset, const char* op);
Status pwrite_all(int fd, const void* buf, uint64_t length, uint64_t offset, const char* op);
// Size of a regular file or block device.
Result<uint64_t> file_size(int fd);
// Writes zeros over [offset, offset + length) of a regular file (O_DIRECT
// where the file system has it), then fdatasync: the blocks end up allocated
// and written. EINVAL if the range goes past the end of the file (the file
// is never extended); anything but a regular file is left alone.
Status zero_fill_regular_file(const std::string& path, uint64_t offset, uint64_t length);
// True if the whole buffer is zero.
bool is_zero(const void* buf, uint64_t length);
// Writes `data` to `path` atomically: `path` + `temp_suffix` (mode `mode`),
// fsync, rename, fsync of the directory. Fails only up to the rename: on
// failure `path` is unchanged and the temp file removed (the directory's
// fsync after the rename is best effort, not reported).
Status write_file_atomic(const std::string& path, const std::string& data, const char* temp_suffix = ".tmp",
                         unsigned mode = 0600);
Result<std::string> read_file(const std::string& path);
// This boot's id (/proc/sys/kernel/random/boot_id), or "" if unknown.
std::string boot_id();

}  // namespace nbdsnap
