#include "backup_chain.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "json_parse.h"

namespace nbdsnap {
namespace {

bool file_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

std::string hex8(uint32_t v) {
  char b[9];
  std::snprintf(b, sizeof b, "%08x", v);
  return b;
}

std::optional<uint64_t> number_of(std::string_view name) {
  constexpr std::string_view kPrefix = "backup-";
  if (name.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  name.remove_prefix(kPrefix.size());
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(name.data(), name.data() + name.size(), v);
  if (ec != std::errc() || p != name.data() + name.size() || name.empty()) return std::nullopt;
  return v;
}

std::string name_of(uint64_t n) {
  char b[32];
  std::snprintf(b, sizeof b, "backup-%04llu", static_cast<unsigned long long>(n));
  return b;
}

}  // namespace

uint64_t BlockChecksums::blocks() const {
  uint64_t n = 0;
  for (const auto& r : runs) n += r.second.size();
  return n;
}

BlockChecksums BlockChecksums::from_array(uint64_t block_size, const std::vector<uint32_t>& crcs,
                                          const std::vector<uint8_t>& present) {
  BlockChecksums c;
  c.block_size = block_size;
  for (size_t b = 0; b < present.size(); ++b) {
    if (!present[b]) continue;
    if (c.runs.empty() || c.runs.back().first + c.runs.back().second.size() != b) c.runs.push_back({b, {}});
    c.runs.back().second.push_back(crcs[b]);
  }
  return c;
}

uint64_t Manifest::number() const { return number_of(name).value_or(0); }

Json Manifest::to_json(bool with_checksums) const {
  Json j = Json::object({
      {"format", kManifestFormat},
      {"name", name},
      {"file", file},
      {"data", data.empty() ? Json() : Json(data)},
      {"kind", kind},
      {"parent", parent.empty() ? Json() : Json(parent)},
      {"reason", reason.empty() ? Json() : Json(reason)},
      {"volume", volume},
      {"snapshot_id", snapshot_id.empty() ? Json() : Json(snapshot_id)},
      {"snapshot_name", snapshot_name.empty() ? Json() : Json(snapshot_name)},
      {"source", source},
      {"generation", generation.empty() ? Json() : Json(generation)},
      {"sequence", sequence},
      {"block_size", block_size},
      {"size", size},
      {"time", time},
      {"seconds_ms", static_cast<uint64_t>(seconds * 1000 + 0.5)},
      {"bytes_read", bytes_read},
      {"bytes_written", bytes_written},
      {"bytes_zero", bytes_zero},
      {"changed_bytes", changed_bytes},
      {"connections", connections},
  });
  Json cs = Json::object({{"algorithm", "crc32c"}, {"block_size", checksums.block_size},
                          {"blocks", checksums.blocks()}});
  if (with_checksums) {
    Json runs = Json::array();
    for (const auto& [first, crcs] : checksums.runs) {
      std::string hex;
      hex.reserve(crcs.size() * 8);
      for (uint32_t c : crcs) hex += hex8(c);
      runs.push(Json::array({Json(first), Json(std::move(hex))}));
    }
    cs.set("runs", std::move(runs));
  }
  j.set("checksums", std::move(cs));
  return j;
}

Result<Manifest> Manifest::parse(const std::string& text) {
  std::string err;
  auto v = json::parse_json(text, &err);
  if (!v) return Status::error(EINVAL, "not JSON: " + err);
  const json::JValue& j = *v;
  if (!j.is_object() || j["format"].str() != kManifestFormat)
    return Status::error(EINVAL, "not a manifest of format " + std::string(kManifestFormat));
  Manifest m;
  m.name = j["name"].str();
  m.file = j["file"].str();
  m.data = j["data"].str();
  m.kind = j["kind"].str();
  m.parent = j["parent"].str();
  m.reason = j["reason"].str();
  m.volume = j["volume"].str();
  m.snapshot_id = j["snapshot_id"].str();
  m.snapshot_name = j["snapshot_name"].str();
  m.source = j["source"].str();
  m.generation = j["generation"].str();
  m.sequence = j["sequence"].u64();
  m.block_size = j["block_size"].u64();
  m.size = j["size"].u64();
  m.time = j["time"].str();
  m.seconds = static_cast<double>(j["seconds_ms"].u64()) / 1000;
  m.bytes_read = j["bytes_read"].u64();
  m.bytes_written = j["bytes_written"].u64();
  m.bytes_zero = j["bytes_zero"].u64();
  m.changed_bytes = j["changed_bytes"].u64();
  m.connections = static_cast<int>(j["connections"].u64());
  if (!number_of(m.name) || m.file != m.name + ".qcow2") return Status::error(EINVAL, "bad name or file");
  if (m.kind != "full" && m.kind != "incremental") return Status::error(EINVAL, "bad kind '" + m.kind + "'");
  if ((m.kind == "full") != (m.data == m.name + ".raw")) return Status::error(EINVAL, "bad data file");
  if (m.kind == "incremental" && m.parent.empty()) return Status::error(EINVAL, "incremental without parent");
  if (m.block_size == 0 || m.size == 0) return Status::error(EINVAL, "missing block_size or size");
  const json::JValue& cs = j["checksums"];
  if (cs["algorithm"].str() != "crc32c" || cs["block_size"].u64() != m.block_size)
    return Status::error(EINVAL, "checksums: unknown algorithm or block size");
  m.checksums.block_size = m.block_size;
  uint64_t nblocks = (m.size + m.block_size - 1) / m.block_size;
  for (size_t i = 0; i < cs["runs"].size(); ++i) {
    const json::JValue& r = cs["runs"][i];
    uint64_t first = r[0].u64();
    const std::string& hex = r[1].str();
    if (!r[0].is_number() || hex.size() % 8 != 0 || first > nblocks || hex.size() / 8 > nblocks - first)
      return Status::error(EINVAL, "checksums: bad run " + std::to_string(i));
    std::vector<uint32_t> crcs(hex.size() / 8);
    for (size_t k = 0; k < crcs.size(); ++k) {
      auto [p, ec] = std::from_chars(hex.data() + k * 8, hex.data() + k * 8 + 8, crcs[k], 16);
      if (ec != std::errc() || p != hex.data() + k * 8 + 8)
        return Status::error(EINVAL, "checksums: bad hex in run " + std::to_string(i));
    }
    if (!m.checksums.runs.empty() &&
        m.checksums.runs.back().first + m.checksums.runs.back().second.size() > first)
      return Status::error(EINVAL, "checksums: runs overlap or are not sorted");
    m.checksums.runs.emplace_back(first, std::move(crcs));
  }
  if (m.checksums.blocks() != cs["blocks"].u64()) return Status::error(EINVAL, "checksums: block count differs");
  if (m.kind == "full" && m.checksums.blocks() != nblocks)
    return Status::error(EINVAL, "checksums: a full backup must have one per block");
  return m;
}

Result<BackupChain> BackupChain::load(const std::string& dir) {
  BackupChain c;
  c.dir_ = dir;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return Status::from_errno("open backup directory " + dir);
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 5 && n.substr(n.size() - 5) == ".json" && number_of(n.substr(0, n.size() - 5)))
      names.push_back(n);
  }
  ::closedir(d);
  for (const auto& n : names) {
    std::ifstream in(dir + "/" + n);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in) return Status::from_errno("read " + dir + "/" + n);
    auto m = Manifest::parse(ss.str());
    if (!m) return m.status().with_context("manifest " + dir + "/" + n);
    if (m->name + ".json" != n) return Status::error(EINVAL, "manifest " + dir + "/" + n + ": names " + m->name);
    c.backups_.push_back(std::move(*m));
  }
  std::sort(c.backups_.begin(), c.backups_.end(),
            [](const Manifest& a, const Manifest& b) { return a.number() < b.number(); });
  return c;
}

Result<const Manifest*> BackupChain::find(const std::string& which) const {
  if (backups_.empty()) return Status::error(ENOENT, "no backup in " + dir_);
  if (which.empty() || which == "latest") return &backups_.back();
  std::optional<uint64_t> n = number_of(which);
  if (!n) {
    uint64_t v = 0;
    auto [p, ec] = std::from_chars(which.data(), which.data() + which.size(), v);
    if (ec == std::errc() && p == which.data() + which.size()) n = v;
  }
  for (const auto& m : backups_)
    if (n && m.number() == *n) return &m;
  return Status::error(ENOENT, "no backup '" + which + "' in " + dir_ + " (names like backup-0001, a number, or latest)");
}

Result<std::vector<const Manifest*>> BackupChain::ancestry(const Manifest& m) const {
  std::vector<const Manifest*> out;
  const Manifest* cur = &m;
  for (;;) {
    for (const std::string* f : {&cur->file, &cur->data})
      if (!f->empty() && !file_exists(path_of(*f)))
        return Status::error(ENOENT, cur->name + ": its file " + path_of(*f) + " is missing");
    out.push_back(cur);
    if (cur->kind == "full") break;
    const Manifest* parent = nullptr;
    for (const auto& b : backups_)
      if (b.name == cur->parent) parent = &b;
    if (!parent) return Status::error(ENOENT, cur->name + ": its parent " + cur->parent + " is missing from " + dir_);
    if (parent->number() >= cur->number() || out.size() > backups_.size())
      return Status::error(EINVAL, cur->name + ": bad parent " + cur->parent);
    cur = parent;
  }
  return out;
}

Result<std::vector<uint32_t>> BackupChain::expected(const Manifest& m) const {
  auto chain = ancestry(m);
  if (!chain) return chain.status();
  uint64_t n = (m.size + m.block_size - 1) / m.block_size;
  std::vector<uint32_t> crcs(n, 0);
  std::vector<uint8_t> known(n, 0);
  // Oldest first, so newer backups overwrite.
  for (auto it = chain->rbegin(); it != chain->rend(); ++it) {
    const Manifest* b = *it;
    if (b->block_size != m.block_size || b->size != m.size)
      return Status::error(EINVAL, m.name + ": " + b->name + " has another block size or size");
    for (const auto& [first, cs] : b->checksums.runs)
      for (size_t k = 0; k < cs.size(); ++k) {
        crcs[first + k] = cs[k];
        known[first + k] = 1;
      }
  }
  for (uint64_t b = 0; b < n; ++b)
    if (!known[b]) return Status::error(EINVAL, m.name + ": no checksum for block " + std::to_string(b));
  return crcs;
}

std::string BackupChain::next_name() const { return name_of(backups_.empty() ? 1 : backups_.back().number() + 1); }

}  // namespace nbdsnap
