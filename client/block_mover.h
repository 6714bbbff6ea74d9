// BlockMover: reads ranges of an NBD export over several connections with
// many asynchronous requests in flight, skips what base:allocation reports
// as holes, computes a CRC-32C per block (the checksum unit, normally the
// CBT block) and hands each piece to a sink: another NBD export (qemu-nbd
// serving a qcow2 file, a volume), a file or block device, or nothing
// (verification). Blocks that read as zero are not written unless the
// target may hold older data (write_zeroes), where they become zero
// requests, not data.
//
// One worker thread per source connection, each with its own sink
// connection; the calling thread only reports progress. Results are
// per-block checksums in a caller-sized array (each block is written by one
// worker) and byte counts. Not reusable: one run() per BlockMover.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nbd_io.h"
#include "status.h"

namespace nbdsnap {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

enum class SinkKind { kNone, kNbd, kFile };

struct MoveOptions {
  NbdEndpoint source;
  uint64_t block_size = 65536;      // checksum unit; ranges are aligned to it
  // 0: 4. Always 1 when the source, or an NBD sink, does not offer
  // multi-conn (such a server may accept a single client).
  int connections = 0;
  uint64_t request_size = 2 << 20;  // bytes per piece (whole blocks); NBD requests are at most 32 MiB
  int requests_per_connection = 8;  // pieces in flight per connection (fewer for huge blocks)

  SinkKind sink = SinkKind::kNone;
  NbdEndpoint sink_endpoint;  // kNbd
  int sink_fd = -1;           // kFile: written with pwrite from every worker
  std::string sink_path;      // kFile: its name, for messages
  // kFile: start writeback of each write at once and drop the previous one
  // from the page cache once written (sync_file_range, fadvise), so that
  // the copy does not fill memory and a final fsync finds little left.
  bool start_writeback = false;
  bool sink_is_block_device = false;
  // Zero blocks become zero requests (the target may hold other data);
  // otherwise they are skipped (the target reads as zero already).
  bool write_zeroes = false;

  // Called on the calling thread about twice a second and once at the end.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct MoveResult {
  uint64_t bytes_read = 0;      // requested from the source (holes excluded)
  uint64_t bytes_written = 0;   // data written to the sink
  uint64_t bytes_zero = 0;      // blocks that read as zero (written as zero requests or skipped)
  uint64_t source_size = 0;
  int connections = 0;
  double seconds = 0;
};

class BlockMover {
 public:
  explicit BlockMover(MoveOptions options) : o_(std::move(options)) {}

  // Moves RANGES (sorted, disjoint, block-aligned except at the end of the
  // export). (*crcs)[b] receives the CRC-32C of every block b they cover;
  // crcs must hold ceil(size / block_size) entries. EXPECTED_SIZE, if not
  // zero, is the size to move: the source's size, or that rounded up to 512
  // (qcow2 images are).
  Result<MoveResult> run(const std::vector<ByteRange>& ranges, std::vector<uint32_t>* crcs,
                         uint64_t expected_size = 0);

 private:
  MoveOptions o_;
};

// Number of blocks of a SIZE-byte export.
inline uint64_t block_count(uint64_t size, uint64_t block_size) { return (size + block_size - 1) / block_size; }

}  // namespace nbdsnap
