#include "registry.h"

#include <google/protobuf/text_format.h>

#include "file_io.h"

namespace nbdsnap::daemon {

Status Registry::load() {
  auto data = read_file(path_);
  if (!data) {
    if (data.status().code() == ENOENT) return Status::ok();
    return data.status().with_context("load registry");
  }
  RegistryFile msg;
  if (!google::protobuf::TextFormat::ParseFromString(*data, &msg))
    return Status::error(EBADMSG, "load registry " + path_ + ": cannot parse (damaged file?)");
  if (msg.format() != 1)
    return Status::error(EBADMSG, "load registry " + path_ + ": format " + std::to_string(msg.format()) +
                                      " is not supported (this build reads format 1)");
  volumes.clear();
  storage.clear();
  for (const auto& v : msg.volumes()) volumes.emplace_back(v.name(), v.path());
  for (const auto& s : msg.storage()) {
    ManagedFile m;
    m.id = s.id();
    m.path = s.path();
    m.limit = s.limit();
    m.size = s.size();
    m.step = s.step();
    m.state = s.state();
    if (m.id.empty() || m.path.empty()) continue;
    storage[m.id] = m;
  }
  return Status::ok();
}

Status Registry::save() const {
  RegistryFile msg;
  msg.set_format(1);
  for (const auto& [name, path] : volumes) {
    auto* v = msg.add_volumes();
    v->set_name(name);
    v->set_path(path);
  }
  for (const auto& [id, m] : storage) {
    auto* s = msg.add_storage();
    s->set_id(m.id);
    s->set_path(m.path);
    s->set_limit(m.limit);
    s->set_size(m.size);
    s->set_step(m.step);
    s->set_state(m.state);
  }
  std::string text;
  if (!google::protobuf::TextFormat::PrintToString(msg, &text))
    return Status::error(EIO, "save registry: cannot serialize");
  text = "# nbdsnapd registry (protobuf text, server/registry.proto); written by nbdsnapd\n" + text;
  return write_file_atomic(path_, text).with_context("save registry");
}

const std::string* Registry::volume_path(const std::string& name) const {
  for (const auto& v : volumes)
    if (v.first == name) return &v.second;
  return nullptr;
}

const ManagedFile* Registry::managed(const std::string& id) const {
  auto it = storage.find(id);
  return it == storage.end() ? nullptr : &it->second;
}

}  // namespace nbdsnap::daemon
