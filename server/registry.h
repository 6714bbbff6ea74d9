// Registry: what nbdsnapd persists in its state directory (registry.proto):
// the served volumes, in order, and the managed difference storage files.
// Saved as protobuf text with an atomic replace (temp file, fsync, rename,
// fsync of the directory). A plain value: callers serialize access.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "registry.pb.h"
#include "status.h"

namespace nbdsnap::daemon {

struct ManagedFile {
  std::string id;
  std::string path;
  uint64_t limit = 0;
  uint64_t size = 0;
  uint64_t step = 0;
  StorageState state = PENDING;
};

class Registry {
 public:
  explicit Registry(std::string path) : path_(std::move(path)) {}

  // Reads the file; a missing file is an empty registry.
  Status load();
  Status save() const;

  const std::string& path() const { return path_; }

  std::vector<std::pair<std::string, std::string>> volumes;  // name, path; in order
  std::map<std::string, ManagedFile> storage;                // by snapshot id

  const std::string* volume_path(const std::string& name) const;
  const ManagedFile* managed(const std::string& id) const;

 private:
  std::string path_;
};

}  // namespace nbdsnap::daemon
