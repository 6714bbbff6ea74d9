// nbdsnap backup, restore and verify: the daemon side (snapshot, export, CBT
// generation and changes) and the choice between full and incremental; the
// bytes are moved by backup.cc.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "backup.h"
#include "cli.h"
#include "units.h"

namespace nbdsnap::cli {
namespace {

using Clock = std::chrono::steady_clock;

// "\rbackup  1.2 GiB / 4.0 GiB  30%  850 MiB/s  ETA 0:03" on a terminal,
// at most a few times a second; a final newline from done().
class Progress {
 public:
  Progress(CommandContext& ctx, std::string verb) : on_(ctx.io.err_is_tty && !ctx.json()), err_(ctx.io.err), verb_(std::move(verb)) {}
  ProgressFn fn() {
    if (!on_) return nullptr;
    return [this](uint64_t done, uint64_t total) { show(done, total); };
  }
  void done() {
    if (on_ && shown_) err_ << "\n" << std::flush;
  }

 private:
  void show(uint64_t done, uint64_t total) {
    double s = std::chrono::duration<double>(Clock::now() - t0_).count();
    double rate = s > 0 ? static_cast<double>(done) / s : 0;
    std::string eta = "--:--";
    if (rate > 0 && total >= done) {
      auto left = static_cast<uint64_t>(std::llround(static_cast<double>(total - done) / rate));
      char b[32];
      std::snprintf(b, sizeof b, "%llu:%02llu", static_cast<unsigned long long>(left / 60),
                    static_cast<unsigned long long>(left % 60));
      eta = b;
    }
    int pct = total ? static_cast<int>(100.0 * static_cast<double>(done) / static_cast<double>(total)) : 100;
    std::string line = verb_ + "  " + human_size(done) + " / " + human_size(total) + "  " + std::to_string(pct) +
                       "%  " + human_size(static_cast<uint64_t>(rate)) + "/s  ETA " + eta;
    err_ << "\r" << line << std::string(line.size() < last_ ? last_ - line.size() : 0, ' ') << std::flush;
    last_ = line.size();
    shown_ = true;
  }
  bool on_;
  std::ostream& err_;
  std::string verb_;
  Clock::time_point t0_ = Clock::now();
  size_t last_ = 0;
  bool shown_ = false;
};

std::string rate_text(uint64_t bytes, double seconds) {
  return seconds > 0 ? human_size(static_cast<uint64_t>(static_cast<double>(bytes) / seconds)) + "/s" : "-";
}

std::string seconds_text(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f s", s);
  return b;
}

// --connections N (1..16), 0 when not given.
std::optional<int> connections_option(CommandContext& ctx, int* rc) {
  const std::string* c = ctx.option("--connections");
  if (!c) return 0;
  auto n = parse_size(*c);
  if (!n || *n < 1 || *n > 16) {
    *rc = ctx.usage_error("--connections: '" + *c + "': expected 1 to 16");
    return std::nullopt;
  }
  return static_cast<int>(*n);
}

NbdEndpoint endpoint_options(CommandContext& ctx, std::string uri) {
  NbdEndpoint ep;
  ep.uri = std::move(uri);
  if (const std::string* k = ctx.option("--tls-psk")) ep.tls_psk_file = absolute_path(*k);
  if (const std::string* u = ctx.option("--tls-username")) ep.tls_username = *u;
  return ep;
}

Status make_dir(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return Status::error(ENOTDIR, dir + " is not a directory");
    return Status::ok();
  }
  if (::mkdir(dir.c_str(), 0755) != 0) return Status::from_errno("create directory " + dir);
  return Status::ok();
}

// The export name of an NBD URI: its path without the leading slash,
// %XX-decoded ("" if there is none).
std::string export_of_uri(const std::string& uri) {
  std::string path = uri.substr(0, uri.find('?'));
  auto scheme = path.find("://");
  auto slash = path.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  if (slash == std::string::npos) return "";
  std::string enc = path.substr(slash + 1), out;
  for (size_t i = 0; i < enc.size(); ++i) {
    if (enc[i] == '%' && i + 2 < enc.size() && std::isxdigit(static_cast<unsigned char>(enc[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(enc[i + 2]))) {
      out += static_cast<char>(std::stoi(enc.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += enc[i];
    }
  }
  return out;
}

// The URI of EXPORT among the daemon's (the Unix socket one comes first).
std::string uri_of_export(const google::protobuf::RepeatedPtrField<std::string>& uris, const std::string& exp) {
  for (const auto& u : uris)
    if (export_of_uri(u) == exp) return u;
  return "";
}

// An exclusive lock on DIR for one backup at a time (held until exit).
Status lock_dir(const std::string& dir) {
  std::string path = dir + "/.nbdsnap-backup.lock";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Status::from_errno("lock " + path);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK) return Status::error(EBUSY, "another backup into " + dir + " is running");
    return Status::from_errno("lock " + path, e);
  }
  return Status::ok();  // the descriptor stays open: the lock lasts as long as the process
}

Json manifest_output(const Manifest& m, const BackupChain& chain) {
  Json j = m.to_json(false);
  j.set("manifest", chain.path_of(m.name + ".json"));
  j.set("path", chain.path_of(m.file));
  return j;
}

}  // namespace

int cmd_backup(CommandContext& ctx) {
  const std::string dir = absolute_path(*ctx.option("--to"));
  const std::string* uri = ctx.option("--uri");
  const std::string snapshot = ctx.args().empty() ? "" : ctx.args()[0];
  if (snapshot.empty() && !uri) return ctx.usage_error("give a SNAPSHOT, or --uri for a plain NBD export");
  int rc = 0;
  auto conns = connections_option(ctx, &rc);
  if (!conns) return rc;
  uint64_t plain_block_size = 65536;
  if (const std::string* b = ctx.option("--block-size")) {
    if (!snapshot.empty()) return ctx.usage_error("--block-size is for plain exports: a snapshot uses its CBT block size");
    auto v = parse_size(*b);
    if (!v || *v < 4096 || *v > (64u << 20) || (*v & (*v - 1)) != 0)
      return ctx.usage_error("--block-size: '" + *b + "': expected a power of two from 4K to 64M");
    plain_block_size = *v;
  }
  if (ctx.option("--volume") && snapshot.empty())
    return ctx.usage_error("--volume picks a volume of SNAPSHOT; a plain export is named by --uri");

  BackupRequest req;
  req.connections = *conns;
  if (!snapshot.empty()) {
    api::Request q;
    q.mutable_snapshot_info()->set_id(snapshot);
    auto r = ctx.call(q, &rc);
    if (!r) return rc;
    const api::Snapshot& s = r->snapshot_info().snapshot();
    std::string label = s.name().empty() ? s.id() : s.name();
    if (s.state() == api::CREATED) return ctx.failure("backup: snapshot " + label + " is not taken yet (snapshot take " + label + ")");
    if (s.state() != api::TAKEN)
      return ctx.failure("backup: snapshot " + label + " is corrupted: " + s.error());
    std::string volume;
    if (const std::string* v = ctx.option("--volume")) {
      volume = *v;
      if (std::find(s.volumes().begin(), s.volumes().end(), volume) == s.volumes().end())
        return ctx.failure("backup: snapshot " + label + " has no volume " + volume);
    } else if (s.volumes_size() == 1) {
      volume = s.volumes(0);
    } else {
      return ctx.usage_error("snapshot " + label + " covers several volumes: pick one with --volume");
    }
    std::string exp = volume + "@" + label;
    if (uri) {
      // Reading another export under this snapshot's CBT would make a wrong
      // incremental: the URI must name this snapshot's export.
      std::string named = export_of_uri(*uri);
      if (named != exp && named != volume + "@" + s.id())
        return ctx.failure("backup: --uri names the export '" + named + "', not the snapshot's export " + exp);
    }
    std::string u = uri ? *uri : uri_of_export(s.uris(), exp);
    if (u.empty()) return ctx.failure("backup: nbdsnapd gave no URI for the export " + exp);
    req.source = endpoint_options(ctx, u);
    api::Request ci;
    ci.mutable_cbt_info()->set_volume(volume);
    auto info = ctx.call(ci, &rc);
    if (!info) return rc;
    req.volume = volume;
    req.snapshot_id = s.id();
    req.snapshot_name = s.name();
    req.generation = info->cbt_info().generation();
    req.sequence = s.sequence();
    req.block_size = info->cbt_info().block_size();
    req.size = info->cbt_info().capacity();
  } else {
    req.source = endpoint_options(ctx, *uri);
    auto probe = NbdConnection::open(req.source);
    if (!probe) return ctx.failure("backup: " + probe.status().message());
    req.size = probe->size();
    probe->close();
    req.volume = export_of_uri(*uri);
    req.block_size = plain_block_size;
  }
  if (req.size == 0) return ctx.failure("backup: " + req.source.display() + " is empty");

  if (Status st = make_dir(dir); !st) return ctx.failure("backup: " + st.message());
  if (Status st = lock_dir(dir); !st) return ctx.failure("backup: " + st.message());
  auto chain = BackupChain::load(dir);
  if (!chain) return ctx.failure("backup: " + chain.status().message());
  const Manifest* prev = chain->latest();
  if (prev && prev->volume != req.volume)
    return ctx.failure("backup: " + dir + " holds backups of '" + prev->volume + "', not '" + req.volume +
                       "': use one directory per volume");

  // Incremental if everything lines up; otherwise full, and say why.
  std::string reason;
  if (ctx.option("--full")) {
    reason = "--full given";
  } else if (!prev) {
    reason = "";
  } else if (snapshot.empty()) {
    reason = "a plain export (--uri without SNAPSHOT) has no change tracking";
  } else if (prev->generation.empty()) {
    reason = "the previous backup " + prev->name + " has no change tracking";
  } else if (prev->generation != req.generation) {
    reason = "the change tracking generation of " + req.volume + " changed since " + prev->name + " (" +
             prev->generation + " -> " + req.generation + "): its history was reset";
  } else if (prev->block_size != req.block_size) {
    reason = "the CBT block size changed since " + prev->name + " (" + std::to_string(prev->block_size) + " -> " +
             std::to_string(req.block_size) + ")";
  } else if (prev->size != req.size) {
    reason = req.volume + " was resized since " + prev->name + " (" + std::to_string(prev->size) + " -> " +
             std::to_string(req.size) + " bytes)";
  } else if (prev->sequence > req.sequence) {
    reason = "the snapshot (sequence " + std::to_string(req.sequence) + ") is older than " + prev->name +
             " (sequence " + std::to_string(prev->sequence) + ")";
  } else if (auto anc = chain->ancestry(*prev); !anc) {
    reason = "the previous backup cannot be used: " + anc.status().message();
  } else {
    api::Request q;
    auto* c = q.mutable_cbt_changes();
    c->set_volume(req.volume);
    c->set_generation(prev->generation);
    c->set_since_sequence(prev->sequence);
    c->set_snapshot(req.snapshot_id);
    // Not ctx.call: ESTALE is an answer here, not a failure. The
    // connection is open since 'snapshot info'.
    auto r = ctx.connection->call(q);
    if (!r && r.status().code() == ESTALE) {
      reason = "the change tracking history of " + req.volume + " since " + prev->name + " is lost (" +
               r.status().message() + ")";
    } else if (!r) {
      return ctx.failure(r.status().message());
    } else {
      req.parent = prev;
      for (const auto& rg : r->cbt_changes().ranges()) req.changes.push_back({rg.offset(), rg.length()});
      req.changed_bytes = r->cbt_changes().changed_bytes();
    }
  }
  if (!req.parent && prev) {
    req.reason = reason;
    ctx.io.err << "nbdsnap: backup: full backup: " << reason << "\n";
  }

  Progress progress(ctx, "backup");
  req.progress = progress.fn();
  auto m = run_backup(*chain, req);
  progress.done();
  if (!m) return ctx.failure(m.status().message());
  if (ctx.json()) return ctx.print_json(manifest_output(*m, *chain));
  std::string what = m->snapshot_id.empty() ? m->source : m->volume + "@" + (m->snapshot_name.empty() ? m->snapshot_id : m->snapshot_name);
  ctx.io.out << m->name << ": " << m->kind << " backup of " << what
             << (m->parent.empty() ? "" : " over " + m->parent) << "\n"
             << "  read " << human_size(m->bytes_read) << " of " << human_size(m->size) << " in "
             << seconds_text(m->seconds) << " (" << rate_text(m->bytes_read, m->seconds) << ", " << m->connections
             << " connection" << (m->connections == 1 ? "" : "s") << "); stored " << human_size(m->bytes_written)
             << ", zero " << human_size(m->bytes_zero) << "\n"
             << "  " << chain->path_of(m->file) << "\n";
  return 0;
}

int cmd_restore(CommandContext& ctx) {
  const std::string dir = absolute_path(ctx.args()[0]);
  const std::string* to = ctx.option("--to");
  const std::string* uri = ctx.option("--uri");
  const std::string* volume = ctx.option("--volume");
  if ((to != nullptr) + (uri != nullptr) + (volume != nullptr) != 1)
    return ctx.usage_error("give exactly one of --to PATH, --uri URI, --volume NAME");
  if (ctx.option("--force") && !to) return ctx.usage_error("--force is for --to PATH");
  int rc = 0;
  auto conns = connections_option(ctx, &rc);
  if (!conns) return rc;
  auto chain = BackupChain::load(dir);
  if (!chain) return ctx.failure("restore: " + chain.status().message());
  const std::string* which = ctx.option("--backup");
  auto point = chain->find(which ? *which : "latest");
  if (!point) return ctx.failure("restore: " + point.status().message());
  const Manifest& m = **point;

  RestoreTarget t;
  std::string target_text;
  if (to) {
    t.path = absolute_path(*to);
    t.force = ctx.option("--force") != nullptr;
    target_text = t.path;
  } else if (uri) {
    t.nbd = endpoint_options(ctx, *uri);
    target_text = t.nbd.display();
  } else {
    api::Request q;
    q.mutable_volume_list();
    auto r = ctx.call(q, &rc);
    if (!r) return rc;
    const api::Volume* v = nullptr;
    for (const auto& x : r->volume_list().volumes())
      if (x.name() == *volume) v = &x;
    if (!v) return ctx.failure("restore: no volume " + *volume);
    if (v->size() != m.size)
      return ctx.failure("restore: volume " + *volume + " has " + std::to_string(v->size()) + " bytes, " + m.name +
                         " " + std::to_string(m.size));
    std::string u = uri_of_export(v->uris(), *volume);
    if (u.empty()) return ctx.failure("restore: nbdsnapd gave no URI for volume " + *volume);
    t.nbd = endpoint_options(ctx, u);
    target_text = "volume " + *volume;
  }
  Progress progress(ctx, "restore");
  auto r = run_restore(*chain, m, t, *conns, progress.fn());
  progress.done();
  if (!r) return ctx.failure(r.status().message());
  if (r->bad_count > 0)
    return ctx.failure("restore " + m.name + ": " + std::to_string(r->bad_count) + " of " + std::to_string(r->blocks) +
                       " blocks do not match the manifests (first at offset " +
                       std::to_string(r->bad_blocks[0] * m.block_size) + "): the backup files are damaged; " +
                       target_text + " holds what they hold now");
  if (ctx.json())
    return ctx.print_json(Json::object({{"backup", m.name},
                                        {"target", target_text},
                                        {"size", m.size},
                                        {"blocks_checked", r->blocks},
                                        {"bytes_read", r->move.bytes_read},
                                        {"bytes_written", r->move.bytes_written},
                                        {"bytes_zero", r->move.bytes_zero},
                                        {"seconds_ms", static_cast<uint64_t>(r->move.seconds * 1000 + 0.5)}}));
  ctx.io.out << "restored " << m.name << " (" << m.kind << ", " << m.time << ") to " << target_text << ": "
             << human_size(m.size) << ", " << r->blocks << " blocks checked against the manifests, all match, "
             << seconds_text(r->move.seconds) << "\n";
  return 0;
}

int cmd_verify(CommandContext& ctx) {
  const std::string dir = absolute_path(ctx.args()[0]);
  int rc = 0;
  auto conns = connections_option(ctx, &rc);
  if (!conns) return rc;
  auto chain = BackupChain::load(dir);
  if (!chain) return ctx.failure("verify: " + chain.status().message());
  if (chain->backups().empty()) return ctx.failure("verify: no backup in " + dir);
  std::vector<const Manifest*> todo;
  const std::string* which = ctx.option("--backup");
  if (which) {
    auto m = chain->find(*which);
    if (!m) return ctx.failure("verify: " + m.status().message());
    todo.push_back(*m);
  } else {
    for (const auto& m : chain->backups()) todo.push_back(&m);
  }
  Json list = Json::array();
  std::vector<std::vector<std::string>> rows;
  uint64_t bad_total = 0;
  std::string first_problem;
  for (const Manifest* m : todo) {
    Progress progress(ctx, "verify " + m->name);
    auto r = run_verify(*chain, *m, which != nullptr, *conns, progress.fn());
    progress.done();
    if (!r) return ctx.failure(r.status().message());
    bad_total += r->bad_count;
    if (r->bad_count > 0 && first_problem.empty())
      first_problem = m->name + ": " + std::to_string(r->bad_count) + " of " + std::to_string(r->blocks) +
                      " blocks differ (first at offset " + std::to_string(r->bad_blocks[0] * m->block_size) + ")";
    Json bad = Json::array();
    for (uint64_t b : r->bad_blocks) bad.push(b * m->block_size);
    list.push(Json::object({{"name", m->name},
                            {"kind", m->kind},
                            {"whole_point", r->whole_point},
                            {"blocks", r->blocks},
                            {"bad_blocks", r->bad_count},
                            {"bad_offsets", std::move(bad)},
                            {"bytes_read", r->move.bytes_read}}));
    rows.push_back({m->name, m->kind, m->time, std::to_string(r->blocks) + " blocks",
                    r->bad_count ? std::to_string(r->bad_count) + " BAD" : "ok"});
  }
  if (ctx.json()) {
    ctx.print_json(Json::object({{"dir", dir}, {"backups", std::move(list)}, {"ok", bad_total == 0}}));
  } else {
    for (const auto& r : rows) {
      std::string line;
      for (const auto& c : r) line += c + "  ";
      ctx.io.out << line.substr(0, line.size() - 2) << "\n";
    }
  }
  if (bad_total > 0) return ctx.failure("verify: " + first_problem);
  return 0;
}

}  // namespace nbdsnap::cli
