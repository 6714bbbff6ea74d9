// A backup directory: a chain of qcow2 files and one JSON manifest per
// backup, so that qemu-img can read any point directly:
//  - a full backup is backup-NNNN.raw, the volume's bytes written straight
//    into a sparse raw file (holes and zero blocks stay holes), and
//    backup-NNNN.qcow2, an empty qcow2 overlay whose backing file is that
//    raw file;
//  - an incremental backup is backup-NNNN.qcow2, a qcow2 overlay whose
//    backing file is the previous backup's qcow2, holding the changed blocks.
// Backing file names are relative, so the directory can be moved.
// backup-NNNN.json describes the backup (volume, snapshot, CBT generation
// and sequence, block size, size, time, bytes read) and holds the CRC-32C
// of every block it stored (every block for a full backup). A backup exists
// once its manifest does: files ending in .part are unfinished and ignored.
//
// Manifest and BackupChain are plain values; loading reads the directory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cli_json.h"
#include "status.h"

namespace nbdsnap {

constexpr std::string_view kManifestFormat = "nbdsnap-backup/1";

// CRC-32C of blocks: runs of consecutive blocks, sorted.
struct BlockChecksums {
  uint64_t block_size = 0;
  std::vector<std::pair<uint64_t, std::vector<uint32_t>>> runs;  // first block, crcs

  uint64_t blocks() const;
  // Runs from a full array where `present` says which blocks were stored.
  static BlockChecksums from_array(uint64_t block_size, const std::vector<uint32_t>& crcs,
                                   const std::vector<uint8_t>& present);
};

struct Manifest {
  std::string name;    // "backup-0003"
  std::string file;    // "backup-0003.qcow2"
  std::string data;    // full backups: "backup-0003.raw", the qcow2's backing file
  std::string kind;    // "full" or "incremental"
  std::string parent;  // the backup it is an overlay of ("" for full)
  std::string reason;  // why a full backup when an incremental was possible ("" otherwise)
  std::string volume;
  std::string snapshot_id, snapshot_name;  // "" for a plain export (--uri)
  std::string source;                      // the export it was read from (URI without its query)
  std::string generation;                  // CBT generation ("" without change tracking)
  uint64_t sequence = 0;                   // the snapshot's sequence number
  uint64_t block_size = 0;
  uint64_t size = 0;
  std::string time;  // UTC, ISO 8601
  double seconds = 0;
  uint64_t bytes_read = 0, bytes_written = 0, bytes_zero = 0, changed_bytes = 0;
  int connections = 0;
  BlockChecksums checksums;

  uint64_t number() const;  // 3 for backup-0003
  Json to_json(bool with_checksums = true) const;
  static Result<Manifest> parse(const std::string& text);
};

class BackupChain {
 public:
  // Reads every manifest in DIR (which must exist). Fails on a manifest
  // that does not parse, naming it.
  static Result<BackupChain> load(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const std::vector<Manifest>& backups() const { return backups_; }  // by number
  const Manifest* latest() const { return backups_.empty() ? nullptr : &backups_.back(); }
  // "backup-0003", "3" or "latest".
  Result<const Manifest*> find(const std::string& which) const;
  // The backups a point reads: itself, its parent, ... back to a full one.
  // Fails if a parent's manifest or any qcow2 file is missing.
  Result<std::vector<const Manifest*>> ancestry(const Manifest& m) const;
  // The checksum every block of the point must have (from the newest backup
  // in its ancestry that stored the block). Fails if a block has none.
  Result<std::vector<uint32_t>> expected(const Manifest& m) const;
  std::string next_name() const;
  std::string path_of(const std::string& file) const { return dir_ + "/" + file; }

 private:
  std::string dir_;
  std::vector<Manifest> backups_;
};

}  // namespace nbdsnap
