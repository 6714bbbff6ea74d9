// Backup, restore and verification of a backup chain (backup_chain.h),
// independent of where the source came from: the CLI (cli_backup.cc) asks
// nbdsnapd for the snapshot's export, CBT generation and changed ranges and
// decides full or incremental; these functions move the bytes.
//
// - run_backup writes one new backup: a qcow2 file (an overlay of the
//   previous one when incremental) through qemu-nbd, then its manifest. On
//   failure nothing new is left in the directory.
// - run_restore writes one point of the chain to a file, block device or
//   NBD export, and checks every block against the manifests while doing so.
// - run_verify reads backups back through qemu-nbd and compares checksums.
// Not thread-safe; each call runs its own worker threads.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "backup_chain.h"
#include "block_mover.h"
#include "nbd_io.h"

namespace nbdsnap {

using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

struct BackupRequest {
  NbdEndpoint source;
  std::string volume, snapshot_id, snapshot_name, generation;
  uint64_t sequence = 0, block_size = 65536, size = 0;
  const Manifest* parent = nullptr;  // incremental over this backup; null: full
  std::string reason;                // why full (recorded in the manifest)
  std::vector<ByteRange> changes;    // incremental: the changed ranges
  uint64_t changed_bytes = 0;
  int connections = 0;
  ProgressFn progress;
};

Result<Manifest> run_backup(const BackupChain& chain, const BackupRequest& request);

struct RestoreTarget {
  std::string path;       // a file (created if missing) or block device, or
  NbdEndpoint nbd;        // an NBD export (uri not empty)
  bool force = false;     // overwrite an existing regular file
};

struct RestoreResult {
  MoveResult move;
  uint64_t blocks = 0;
  std::vector<uint64_t> bad_blocks;  // blocks whose checksum differs (first 100)
  uint64_t bad_count = 0;
};

Result<RestoreResult> run_restore(const BackupChain& chain, const Manifest& point, const RestoreTarget& target,
                                  int connections, ProgressFn progress);

struct VerifyResult {
  std::string name;
  bool whole_point = false;  // every block of the point, else the blocks it stored
  uint64_t blocks = 0;
  uint64_t bad_count = 0;
  std::vector<uint64_t> bad_blocks;  // first 100
  MoveResult move;
};

Result<VerifyResult> run_verify(const BackupChain& chain, const Manifest& backup, bool whole_point,
                                int connections, ProgressFn progress);

// "2026-11-24T12:00:00Z"
std::string utc_now();

}  // namespace nbdsnap
