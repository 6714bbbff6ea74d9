// The commands of `nbdsnap`: the table (words, arguments, options, help) and
// one handler per command that checks its arguments, sends its requests and
// prints the reply as text or as one JSON object.
#include <algorithm>
#include <charconv>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "cli.h"
#include "frame.h"
#include "units.h"

namespace nbdsnap::cli {
namespace {

// ------------------------------------------------------------------ helpers

std::string state_name(api::SnapshotState s) {
  switch (s) {
    case api::CREATED: return "created";
    case api::TAKEN: return "taken";
    case api::CORRUPTED: return "corrupted";
    default: return "unknown";
  }
}

std::string event_code_name(link::EventCode c) {
  switch (c) {
    case link::LOW_FREE_SPACE: return "low-free-space";
    case link::NO_SPACE: return "no-space";
    case link::CORRUPTED_EVENT: return "corrupted";
    default: return "unknown";
  }
}

// "No space left on device (ENOSPC)"
std::string errno_text(int code) {
  const char* name = ::strerrorname_np(code);
  return std::string(std::strerror(code)) + " (" + (name ? name : "errno " + std::to_string(code)) + ")";
}

std::string utc_time(uint64_t ms) {
  time_t t = static_cast<time_t>(ms / 1000);
  struct tm tm {};
  ::gmtime_r(&t, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<unsigned>(ms % 1000));
  return buf;
}

std::string size_text(uint64_t bytes) {
  return bytes < 1024 ? human_size(bytes) : human_size(bytes) + " (" + std::to_string(bytes) + ")";
}

// Left-aligned columns separated by two spaces.
std::string columns(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& r : rows)
    for (size_t k = 0; k < r.size(); ++k) {
      if (width.size() <= k) width.push_back(0);
      width[k] = std::max(width[k], r[k].size());
    }
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (size_t k = 0; k < r.size(); ++k) {
      line += r[k];
      if (k + 1 < r.size()) line += std::string(width[k] - r[k].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

std::optional<uint64_t> parse_decimal(const std::string& s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

// Parses OFFSET:LENGTH words into RANGES; a usage error names the bad word.
template <typename RangeField>
std::optional<std::string> parse_ranges(const std::vector<std::string>& words, size_t from, RangeField* ranges) {
  for (size_t k = from; k < words.size(); ++k) {
    auto r = parse_range(words[k]);
    if (!r) return "'" + words[k] + "': expected OFFSET:LENGTH (sizes, K/M/G/T suffixes; LENGTH > 0)";
    auto* out = ranges->Add();
    out->set_offset(r->first);
    out->set_length(r->second);
  }
  return std::nullopt;
}

Json snapshot_json(const api::Snapshot& s) {
  Json j = Json::object({
      {"id", s.id()},
      {"name", s.name()},
      {"state", state_name(s.state())},
      {"sequence", s.sequence()},
      {"volumes", Json::array_of(s.volumes())},
      {"exports", Json::array_of(s.exports())},
      {"uris", Json::array_of(s.uris())},
      {"storage", Json::object({{"capacity", s.storage_capacity()},
                                {"used", s.storage_used()},
                                {"limit", s.storage_limit()},
                                {"path", s.storage_path()}})},
      {"chunks_copied", s.chunks_copied()},
  });
  if (s.state() == api::CORRUPTED || s.error_code() != 0) {
    j.set("error", s.error());
    j.set("error_code", s.error_code());
  }
  return j;
}

Json volume_json(const api::Volume& v) {
  return Json::object({
      {"name", v.name()},
      {"path", v.path()},
      {"size", v.size()},
      {"chunk_size", v.chunk_size()},
      {"cbt_block_size", v.cbt_block_size()},
      {"uris", Json::array_of(v.uris())},
  });
}

Json event_json(const link::Event& e) {
  return Json::object({
      {"code", event_code_name(e.code())},
      {"time_ms", e.time_ms()},
      {"requested", e.requested()},
      {"volume", e.volume()},
      {"error_code", e.error_code()},
      {"error", e.error()},
  });
}

std::string join(const google::protobuf::RepeatedPtrField<std::string>& v, const std::string& sep) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}

void print_snapshot(std::ostream& o, const api::Snapshot& s) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"id:", s.id()});
  rows.push_back({"name:", s.name().empty() ? "-" : s.name()});
  rows.push_back({"state:", state_name(s.state())});
  rows.push_back({"sequence:", s.state() == api::CREATED ? "- (not taken)" : std::to_string(s.sequence())});
  rows.push_back({"volumes:", join(s.volumes(), " ")});
  std::string storage = human_size(s.storage_used()) + " used of " + human_size(s.storage_capacity());
  if (s.storage_limit()) storage += ", limit " + human_size(s.storage_limit());
  const auto& exports = s.uris().empty() ? s.exports() : s.uris();
  if (exports.empty()) rows.push_back({"exports:", "- (served once taken)"});
  for (int k = 0; k < exports.size(); ++k) rows.push_back({k == 0 ? "exports:" : "", exports[k]});
  rows.push_back({"storage:", storage});
  if (!s.storage_path().empty()) rows.push_back({"", s.storage_path()});
  rows.push_back({"chunks:", std::to_string(s.chunks_copied()) + " copied"});
  if (s.state() == api::CORRUPTED || s.error_code() != 0)
    rows.push_back({"error:", s.error() + (s.error_code() ? " [" + errno_text(s.error_code()) + "]" : "")});
  o << columns(rows);
}

// -------------------------------------------------------------- handlers

int cmd_version(CommandContext& ctx) {
  api::Request req;
  req.mutable_version();
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& v = r->version();
  if (ctx.json())
    return ctx.print_json(Json::object({{"version", NBDSNAP_VERSION},
                                        {"protocol", v.protocol()},
                                        {"daemon_version", v.version()},
                                        {"data_plane", v.data_plane()},
                                        {"data_plane_restarts", v.data_plane_restarts()}}));
  ctx.io.out << "nbdsnap " << NBDSNAP_VERSION << " (API protocol " << kApiProtocol << ")\n"
             << "nbdsnapd " << v.version() << " (API protocol " << v.protocol() << "), data plane "
             << v.data_plane() << ", " << v.data_plane_restarts() << " restart"
             << (v.data_plane_restarts() == 1 ? "" : "s") << "\n";
  return 0;
}

int cmd_volume_add(CommandContext& ctx) {
  api::Request req;
  auto* q = req.mutable_volume_add();
  q->set_name(ctx.args()[0]);
  q->set_path(absolute_path(ctx.args()[1]));
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& v = r->volume_add().volume();
  if (ctx.json()) return ctx.print_json(volume_json(v));
  ctx.io.out << "volume " << v.name() << ": " << v.path() << ", " << human_size(v.size()) << "\n";
  for (const auto& u : v.uris()) ctx.io.out << "  " << u << "\n";
  return 0;
}

int cmd_volume_list(CommandContext& ctx) {
  api::Request req;
  req.mutable_volume_list();
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& vols = r->volume_list().volumes();
  if (ctx.json()) {
    Json list = Json::array();
    for (const auto& v : vols) list.push(volume_json(v));
    return ctx.print_json(Json::object({{"volumes", list}}));
  }
  if (vols.empty()) ctx.io.out << "no volumes\n";
  for (const auto& v : vols) {
    ctx.io.out << v.name() << ": " << v.path() << ", " << human_size(v.size()) << ", chunk "
               << human_size(v.chunk_size()) << ", CBT block " << human_size(v.cbt_block_size()) << "\n";
    for (const auto& u : v.uris()) ctx.io.out << "  " << u << "\n";
  }
  return 0;
}

int cmd_volume_remove(CommandContext& ctx) {
  api::Request req;
  req.mutable_volume_remove()->set_name(ctx.args()[0]);
  int rc = 0;
  if (!ctx.call(req, &rc)) return rc;
  return ctx.json() ? ctx.print_json(Json::object()) : 0;
}

int cmd_snapshot_create(CommandContext& ctx) {
  api::Request req;
  auto* q = req.mutable_snapshot_create();
  for (const auto& v : ctx.args()) q->add_volumes(v);
  if (auto* n = ctx.option("--name")) q->set_name(*n);
  if (auto* s = ctx.option("--storage")) q->set_storage_path(absolute_path(*s));
  if (auto* l = ctx.option("--limit")) {
    auto v = parse_size(*l);
    if (!v || *v == 0) return ctx.usage_error("--limit '" + *l + "': expected a size > 0 (K/M/G/T suffixes)");
    q->set_storage_limit(*v);
  }
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& s = r->snapshot_create().snapshot();
  if (ctx.json()) return ctx.print_json(snapshot_json(s));
  ctx.io.out << s.id() << "\n";
  return 0;
}

int cmd_snapshot_append_storage(CommandContext& ctx) {
  api::Request req;
  auto* q = req.mutable_append_storage();
  q->set_id(ctx.args()[0]);
  q->set_path(absolute_path(ctx.args()[1]));
  if (auto bad = parse_ranges(ctx.args(), 2, q->mutable_ranges())) return ctx.usage_error(*bad);
  int rc = 0;
  if (!ctx.call(req, &rc)) return rc;
  return ctx.json() ? ctx.print_json(Json::object()) : 0;
}

int cmd_snapshot_take(CommandContext& ctx) {
  api::Request req;
  req.mutable_take()->set_id(ctx.args()[0]);
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& t = r->take();
  if (ctx.json()) return ctx.print_json(snapshot_json(t.snapshot()).set("pause_us", t.pause_us()));
  const auto& s = t.snapshot();
  ctx.io.out << "taken: " << (s.name().empty() ? s.id() : s.name() + " (" + s.id() + ")") << ", sequence "
             << s.sequence() << ", writes paused " << t.pause_us() << " us\n";
  for (const auto& u : s.uris().empty() ? s.exports() : s.uris()) ctx.io.out << "  " << u << "\n";
  return 0;
}

int cmd_snapshot_list(CommandContext& ctx) {
  api::Request req;
  req.mutable_snapshot_list();
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& list = r->snapshot_list().snapshots();
  if (ctx.json()) {
    Json a = Json::array();
    for (const auto& s : list) a.push(snapshot_json(s));
    return ctx.print_json(Json::object({{"snapshots", a}}));
  }
  if (list.empty()) {
    ctx.io.out << "no snapshots\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {{"ID", "NAME", "STATE", "SEQUENCE", "STORAGE USED", "VOLUMES"}};
  for (const auto& s : list)
    rows.push_back({s.id(), s.name().empty() ? "-" : s.name(), state_name(s.state()),
                    s.state() == api::CREATED ? "-" : std::to_string(s.sequence()), human_size(s.storage_used()),
                    join(s.volumes(), ",")});
  ctx.io.out << columns(rows);
  return 0;
}

int cmd_snapshot_info(CommandContext& ctx) {
  api::Request req;
  req.mutable_snapshot_info()->set_id(ctx.args()[0]);
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& s = r->snapshot_info().snapshot();
  if (ctx.json()) return ctx.print_json(snapshot_json(s));
  print_snapshot(ctx.io.out, s);
  return 0;
}

int cmd_snapshot_wait_event(CommandContext& ctx) {
  const std::string& t = *ctx.option("--timeout");
  auto ms = parse_decimal(t);
  if (!ms || *ms > UINT32_MAX)
    return ctx.usage_error("--timeout '" + t + "': expected milliseconds (0 to 4294967295)");
  api::Request req;
  req.mutable_wait_event()->set_id(ctx.args()[0]);
  req.mutable_wait_event()->set_timeout_ms(static_cast<uint32_t>(*ms));
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& w = r->wait_event();
  if (ctx.json()) return ctx.print_json(Json::object({{"event", w.has_event() ? event_json(w.event()) : Json()}}));
  if (!w.has_event()) {
    ctx.io.out << "no event within " << *ms << " ms\n";
    return 0;
  }
  const auto& e = w.event();
  ctx.io.out << utc_time(e.time_ms()) << " " << event_code_name(e.code());
  switch (e.code()) {
    case link::LOW_FREE_SPACE: ctx.io.out << ": " << human_size(e.requested()) << " more storage requested"; break;
    case link::NO_SPACE: ctx.io.out << ": low on storage and the limit is reached"; break;
    default:
      if (!e.volume().empty()) ctx.io.out << ": volume " << e.volume();
      if (!e.error().empty()) ctx.io.out << ": " << e.error();
      if (e.error_code()) ctx.io.out << " [" << errno_text(e.error_code()) << "]";
  }
  ctx.io.out << "\n";
  return 0;
}

int cmd_snapshot_destroy(CommandContext& ctx) {
  api::Request req;
  req.mutable_destroy()->set_id(ctx.args()[0]);
  int rc = 0;
  if (!ctx.call(req, &rc)) return rc;
  return ctx.json() ? ctx.print_json(Json::object()) : 0;
}

int cmd_cbt_info(CommandContext& ctx) {
  api::Request req;
  req.mutable_cbt_info()->set_volume(ctx.args()[0]);
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& c = r->cbt_info();
  if (ctx.json())
    return ctx.print_json(Json::object({{"generation", c.generation()},
                                        {"sequence", c.sequence()},
                                        {"block_size", c.block_size()},
                                        {"block_count", c.block_count()},
                                        {"capacity", c.capacity()}}));
  ctx.io.out << columns({{"generation:", c.generation()},
                         {"sequence:", std::to_string(c.sequence())},
                         {"block size:", size_text(c.block_size())},
                         {"blocks:", std::to_string(c.block_count())},
                         {"capacity:", size_text(c.capacity())}});
  return 0;
}

// Stamps per cbt map request: 256 Ki stamps stay far below the 4 MiB frame
// limit even when every stamp needs a 5-byte varint.
constexpr uint32_t kMapPage = 256 * 1024;

int cmd_cbt_map(CommandContext& ctx) {
  const std::string& volume = ctx.args()[0];
  const std::string* snapshot = ctx.option("--snapshot");
  const std::string* output = ctx.option("--output");
  api::Request info_req;
  info_req.mutable_cbt_info()->set_volume(volume);
  int rc = 0;
  auto info = ctx.call(info_req, &rc);
  if (!info) return rc;
  const uint64_t block_size = info->cbt_info().block_size();
  const uint64_t block_count = info->cbt_info().block_count();

  std::vector<uint32_t> stamps;
  std::string generation;
  for (bool first = true;; first = false) {
    api::Request req;
    auto* q = req.mutable_cbt_map();
    q->set_volume(volume);
    if (snapshot) q->set_snapshot(*snapshot);
    q->set_first_block(stamps.size());
    q->set_block_count(kMapPage);
    auto r = ctx.call(req, &rc);
    if (!r) return rc;
    const auto& page = r->cbt_map();
    if (first) generation = page.generation();
    else if (page.generation() != generation)
      return ctx.failure("cbt map: " + volume + ": the CBT generation changed from " + generation + " to " +
                         page.generation() + " while reading the map; run it again");
    if (page.stamps().empty()) break;
    stamps.insert(stamps.end(), page.stamps().begin(), page.stamps().end());
    if (stamps.size() > block_count)
      return ctx.failure("cbt map: " + volume + ": nbdsnapd sent more stamps than the " +
                         std::to_string(block_count) + " blocks of the map");
  }

  std::string text;
  if (ctx.json()) {
    Json j = Json::object({{"generation", generation},
                           {"block_size", block_size},
                           {"block_count", static_cast<uint64_t>(stamps.size())},
                           {"stamps", Json::array_of(stamps)}});
    text = j.dump() + "\n";
  } else {
    std::ostringstream o;
    o << "# cbt map of " << volume << (snapshot ? " at snapshot " + *snapshot : std::string()) << ": generation "
      << generation << ", block size " << block_size << ", " << stamps.size() << " blocks\n"
      << "# FIRST_BLOCK BLOCK_COUNT STAMP (runs of equal stamps)\n";
    for (size_t k = 0; k < stamps.size();) {
      size_t e = k;
      while (e < stamps.size() && stamps[e] == stamps[k]) ++e;
      o << k << " " << e - k << " " << stamps[k] << "\n";
      k = e;
    }
    text = o.str();
  }
  if (!output) {
    ctx.io.out << text;
    return 0;
  }
  {
    std::ofstream f(*output, std::ios::binary | std::ios::trunc);
    if (f) f.write(text.data(), static_cast<std::streamsize>(text.size()));
    if (f) f.close();
    if (!f) return ctx.failure("cbt map: " + *output + ": " + std::strerror(errno ? errno : EIO));
  }
  if (ctx.json())
    return ctx.print_json(Json::object({{"generation", generation},
                                        {"block_size", block_size},
                                        {"block_count", static_cast<uint64_t>(stamps.size())},
                                        {"output", absolute_path(*output)}}));
  ctx.io.out << "cbt map of " << volume << ": " << stamps.size() << " blocks written to " << *output << "\n";
  return 0;
}

int cmd_cbt_changes(CommandContext& ctx) {
  const std::string& since = *ctx.option("--since");
  auto colon = since.rfind(':');
  std::optional<uint64_t> seq;
  if (colon != std::string::npos && colon > 0) seq = parse_decimal(since.substr(colon + 1));
  if (!seq) return ctx.usage_error("--since '" + since + "': expected GENERATION:SEQUENCE (from cbt info)");
  api::Request req;
  auto* q = req.mutable_cbt_changes();
  q->set_volume(ctx.args()[0]);
  q->set_generation(since.substr(0, colon));
  q->set_since_sequence(*seq);
  if (auto* s = ctx.option("--snapshot")) q->set_snapshot(*s);
  int rc = 0;
  auto r = ctx.call(req, &rc);
  if (!r) return rc;
  const auto& c = r->cbt_changes();
  if (ctx.json()) {
    Json ranges = Json::array();
    for (const auto& rg : c.ranges()) ranges.push(Json::array({rg.offset(), rg.length()}));
    return ctx.print_json(Json::object({{"generation", c.generation()},
                                        {"sequence", c.sequence()},
                                        {"changed_bytes", c.changed_bytes()},
                                        {"ranges", ranges}}));
  }
  ctx.io.out << "# generation " << c.generation() << ", sequence " << *seq << " to " << c.sequence() << ": "
             << human_size(c.changed_bytes()) << " changed in " << c.ranges_size() << " range"
             << (c.ranges_size() == 1 ? "" : "s") << " (OFFSET:LENGTH in bytes)\n";
  for (const auto& rg : c.ranges()) ctx.io.out << rg.offset() << ":" << rg.length() << "\n";
  return 0;
}

int cmd_cbt_mark_dirty(CommandContext& ctx) {
  api::Request req;
  auto* q = req.mutable_cbt_mark_dirty();
  q->set_volume(ctx.args()[0]);
  if (auto bad = parse_ranges(ctx.args(), 1, q->mutable_ranges())) return ctx.usage_error(*bad);
  int rc = 0;
  if (!ctx.call(req, &rc)) return rc;
  return ctx.json() ? ctx.print_json(Json::object()) : 0;
}

// ----------------------------------------------------------------- table

constexpr std::string_view kSnapshotJson =
    "--json: the snapshot object {id, name, state (created, taken or corrupted), sequence, volumes, exports, "
    "uris, storage {capacity, used, limit, path}, chunks_copied}, plus error and error_code when corrupted.";

}  // namespace

const std::vector<GroupSpec>& groups() {
  static const std::vector<GroupSpec> g = {
      {"volume", "Volumes: image files or block devices that nbdsnapd serves read-write as NBD exports."},
      {"snapshot",
       "Snapshots: points in time over one or more volumes, served read-only as VOLUME@SNAPSHOT exports. "
       "ID is a snapshot's UUID or its name."},
      {"cbt", "Change tracking (CBT): which blocks of a volume changed since a sequence number."},
  };
  return g;
}

const std::vector<CommandSpec>& commands() {
  static const std::vector<CommandSpec> c = {
      {"", "version", "", {}, "versions of this client, of nbdsnapd and of their protocol",
       "Asks nbdsnapd for its version, API protocol and the state of its data plane (nbdkit). "
       "'nbdsnap --version' prints the client's version without contacting the daemon.",
       "Two lines: the client, then the daemon with its data plane state (running or restarting) and "
       "restart count.\n"
       "--json: {version (of the client), protocol, daemon_version, data_plane, data_plane_restarts}.",
       cmd_version},

      {"volume", "add", "NAME PATH", {}, "serve a file or block device as volume NAME",
       "Serves PATH (an image file or a block device, opened read-write) as the volume NAME, exported over "
       "NBD as NAME. nbdsnapd remembers it across restarts. NAME: 1-128 of A-Z a-z 0-9 . _ -.",
       "The volume, its size and its NBD URIs.\n"
       "--json: the volume object {name, path, size, chunk_size, cbt_block_size, uris}.",
       cmd_volume_add},
      {"volume", "list", "", {}, "list the volumes", "Lists every volume with its path, size and NBD URIs.",
       "One line per volume (name, path, size, chunk, CBT block), its URIs indented below.\n"
       "--json: {volumes: [{name, path, size, chunk_size, cbt_block_size, uris}, ...]}.",
       cmd_volume_list},
      {"volume", "remove", "NAME", {}, "stop serving a volume",
       "Stops serving the volume NAME and forgets it; its file is left as it is. Fails while a snapshot "
       "uses the volume.",
       "Nothing.\n--json: {}.", cmd_volume_remove},

      {"snapshot", "create", "VOLUME...",
       {{"--name", "NAME", "a unique name, usable wherever an ID is taken (no '@' or '/')"},
        {"--storage", "PATH",
         "managed difference storage file to create (default: one in the daemon's state directory); its "
         "directory must exist, the file must not"},
        {"--limit", "SIZE",
         "the managed file grows up to SIZE (default: the total size of the volumes, so it cannot run out)"}},
       "create a snapshot of one or more volumes; prints its id",
       "Creates a snapshot of the volumes (state created). Nothing is frozen yet: add storage with "
       "append-storage if wanted, then take it. The daemon manages a difference storage file for it (grown "
       "in steps up to --limit); ranges given with append-storage are used as well.",
       "The snapshot's id (UUID).\n" + std::string(kSnapshotJson), cmd_snapshot_create},
      {"snapshot", "append-storage", "ID PATH OFFSET:LENGTH...", {},
       "add ranges of a file or block device as difference storage",
       "Adds ranges of PATH (an existing file or block device) to the snapshot's difference storage, used as "
       "given (not grown). States created and taken. OFFSET and LENGTH must be multiples of 4096, inside "
       "PATH, not on a volume and not overlapping storage in use.",
       "Nothing.\n--json: {}.", cmd_snapshot_append_storage},
      {"snapshot", "take", "ID", {}, "take the snapshot: one atomic point for all its volumes",
       "Takes the snapshot (state created -> taken): writes to its volumes are drained and paused for a "
       "moment, change tracking moves to the next sequence number, copy-before-write starts and the "
       "read-only exports VOLUME@SNAPSHOT appear.",
       "The sequence number, the write pause and the NBD URIs of the exports.\n" + std::string(kSnapshotJson) +
           " Also pause_us: how long writes were paused.",
       cmd_snapshot_take},
      {"snapshot", "list", "", {}, "list the snapshots", "Lists every snapshot with its state.",
       "A table: id, name, state, sequence, storage used, volumes.\n--json: {snapshots: [snapshot object, "
       "...]}, each as in 'snapshot info'.",
       cmd_snapshot_list},
      {"snapshot", "info", "ID", {}, "state, sequence, exports, storage and error of a snapshot",
       "Shows one snapshot: its state, the sequence number its take closed, its exports as full NBD URIs, "
       "its difference storage (used, capacity, limit) and, when corrupted, the error.",
       "One field per line.\n" + std::string(kSnapshotJson), cmd_snapshot_info},
      {"snapshot", "wait-event", "ID",
       {{"--timeout", "MS", "how long to wait, in milliseconds (0 to 4294967295)", true}},
       "wait for the next event of a snapshot",
       "Waits for the next event of the snapshot on this connection: low-free-space (more storage is "
       "wanted), no-space (and the limit is reached) or corrupted (copy-before-write failed; the snapshot is "
       "lost). Returns when one comes or after MS milliseconds; a timeout is not an error.",
       "The event with its time (UTC), or 'no event within MS ms'.\n"
       "--json: {event: null} on timeout, else {event: {code (low-free-space, no-space or corrupted), time_ms "
       "(since the Unix epoch), requested (bytes), volume, error_code, error}}.",
       cmd_snapshot_wait_event},
      {"snapshot", "destroy", "ID", {}, "destroy a snapshot",
       "Destroys the snapshot in any state: its exports disappear and its managed storage is deleted. "
       "Change tracking goes on.",
       "Nothing.\n--json: {}.", cmd_snapshot_destroy},

      {"cbt", "info", "VOLUME", {}, "generation, sequence and block size of a volume's change tracking",
       "Shows the volume's change tracking: its generation (a UUID that changes only when the history is "
       "lost or reset), the current sequence number, the CBT block size and count. Store GENERATION:SEQUENCE "
       "with a backup to ask for the changes since it later.",
       "One field per line.\n--json: {generation, sequence, block_size, block_count, capacity}.", cmd_cbt_info},
      {"cbt", "map", "VOLUME",
       {{"--snapshot", "ID", "the map as frozen by that snapshot's take (default: the live map)"},
        {"--output", "FILE", "write the map to FILE instead of stdout"}},
       "the raw CBT map: the sequence number of the last change of every block",
       "Reads the whole CBT map of the volume (page by page): for each CBT block, the sequence number of "
       "its last change.",
       "Text: a header line, then runs of equal stamps as 'FIRST_BLOCK BLOCK_COUNT STAMP' lines.\n"
       "--json: {generation, block_size, block_count, stamps: [one per block]}.\n"
       "With --output, that goes to FILE and stdout gets one summary line (--json: {generation, block_size, "
       "block_count, output}).",
       cmd_cbt_map},
      {"cbt", "changes", "VOLUME",
       {{"--since", "GENERATION:SEQUENCE",
         "the volume's generation ('cbt info') and the sequence of the snapshot that the last backup read "
         "('snapshot info')",
         true},
        {"--snapshot", "ID", "changes up to that snapshot's take (default: up to now)"}},
       "changed byte ranges of a volume since a sequence number",
       "Lists the byte ranges of the volume written since SEQUENCE, merged. Fails (ESTALE) when GENERATION "
       "is no longer the volume's generation: the history was lost, take a full backup.",
       "A header line, then one OFFSET:LENGTH line per range (bytes).\n"
       "--json: {generation, sequence, changed_bytes, ranges: [[offset, length], ...]}.",
       cmd_cbt_changes},
      {"cbt", "mark-dirty", "VOLUME OFFSET:LENGTH...", {}, "mark ranges of a volume as changed",
       "Stamps the ranges as changed at the current sequence number, as a write would (after a restore, or "
       "writes done outside nbdsnap).",
       "Nothing.\n--json: {}.", cmd_cbt_mark_dirty},

      {"", "backup", "[SNAPSHOT]",
       {{"--to", "DIR", "the backup directory (created if missing; one directory per volume)", true},
        {"--uri", "URI",
         "read from this NBD URI: a plain export (without SNAPSHOT; always a full backup), or the snapshot's "
         "export VOLUME@SNAPSHOT by another way, e.g. over TCP (with SNAPSHOT; it must name that export)"},
        {"--volume", "NAME", "the volume to back up when SNAPSHOT covers several"},
        {"--full", "", "a full backup even when an incremental one is possible"},
        {"--connections", "N", "NBD connections, 1 to 16 (default 4; always 1 when the server does not offer multi-conn)"},
        {"--tls-psk", "FILE", "TLS with this pre-shared key file (NAME:HEXKEY lines), required then"},
        {"--tls-username", "NAME", "the PSK identity (default: the first in the file)"},
        {"--block-size", "SIZE", "checksum block of a plain export (default 64K); a snapshot uses its CBT block"}},
       "back up a snapshot (full or incremental) into a qcow2 chain",
       "Reads the snapshot's export VOLUME@SNAPSHOT over NBD (several connections, many requests in flight, "
       "holes skipped, zero blocks not stored) and writes DIR/backup-NNNN.qcow2 through qemu-nbd, plus its "
       "manifest DIR/backup-NNNN.json: volume, snapshot, CBT generation and sequence, block size, size, time, "
       "bytes read and a CRC-32C per CBT block.\n"
       "The first backup in DIR is full. The next ones are incremental: they read only the blocks that CBT "
       "reports changed since the previous backup's generation:sequence, and their qcow2 file is an overlay "
       "backed by the previous one, so 'qemu-img convert DIR/backup-NNNN.qcow2' reads any point. When an "
       "incremental is impossible (CBT generation reset, block size changed, volume resized, previous backup "
       "missing or damaged) the backup is full and one line on stderr says why. An interrupted backup leaves "
       "nothing behind but a .part file, removed by the next run. Progress (bytes, rate, ETA) on a terminal.",
       "The new backup, what was read and written, its file.\n"
       "--json: the manifest without its checksum runs {format, name, file, kind (full or incremental), parent, "
       "reason, volume, snapshot_id, snapshot_name, source, generation, sequence, block_size, size, time, "
       "seconds_ms, bytes_read, bytes_written, bytes_zero, changed_bytes, connections, checksums {algorithm, "
       "block_size, blocks}}, plus manifest and path (the files).",
       cmd_backup},
      {"", "restore", "DIR",
       {{"--backup", "NAME", "the point to restore: backup-NNNN, its number, or latest (default)"},
        {"--to", "PATH", "a file (created, or replaced with --force) or a block device of at least the size"},
        {"--uri", "URI", "an NBD export of at least the size"},
        {"--volume", "NAME", "a volume of nbdsnapd, through its NBD export (same size)"},
        {"--force", "", "overwrite an existing regular file given with --to"},
        {"--connections", "N", "NBD connections, 1 to 16 (default 4; 1 when the target does not offer multi-conn)"},
        {"--tls-psk", "FILE", "TLS with this pre-shared key file, for --uri or --volume"},
        {"--tls-username", "NAME", "the PSK identity (default: the first in the file)"}},
       "restore one point of a backup chain to a file, device, NBD export or volume",
       "Writes the volume as it was at one backup of DIR (its qcow2 file and its backing chain, served "
       "read-only by qemu-nbd) to exactly one target. Holes of a new file stay holes; on devices, exports and "
       "volumes zero blocks are written as zeroes. The CRC-32C of every block is computed as it is copied and "
       "compared with the manifests; a mismatch fails the restore (exit 1) at the end, naming the first bad "
       "offset. "
       "Writes to a volume are tracked by CBT like any other.",
       "One line: the backup, the target, blocks checked.\n"
       "--json: {backup, target, size, blocks_checked, bytes_read, bytes_written, bytes_zero, seconds_ms}.",
       cmd_restore},
      {"", "verify", "DIR",
       {{"--backup", "NAME", "check this point entirely: every block, through its backing chain"},
        {"--connections", "N", "NBD connections to read with, 1 to 16 (default 4)"}},
       "check the checksums of a backup chain",
       "Reads the backups of DIR back through qemu-nbd and compares every block with its CRC-32C in the "
       "manifests. Without --backup, each backup's own blocks are read at its point (all the data the chain "
       "stores); with --backup, every block of that point. Fails (exit 1) if a block differs or a file of "
       "the chain is missing.",
       "One line per backup: name, kind, time, blocks checked, ok or the count of bad blocks.\n"
       "--json: {dir, ok, backups: [{name, kind, whole_point, blocks, bad_blocks, bad_offsets (first 100), "
       "bytes_read}]}.",
       cmd_verify},
  };
  return c;
}

}  // namespace nbdsnap::cli
