// nbdsnap-link: talks to the plugin's internal control link directly. For
// operators debugging a data plane, demos and tests; the management CLI is
// `nbdsnap`, which goes through nbdsnapd.
#include <google/protobuf/util/json_util.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "link_client.h"
#include "units.h"

namespace {

using nbdsnap::LinkClient;
using nbdsnap::Status;
namespace link = nbdsnap::link;

const char* kUsage =
    "usage: nbdsnap-link --socket PATH [--json] COMMAND [ARGS]\n"
    "\n"
    "Talks to the control link of an nbdkit nbdsnap plugin (its control=SOCKET).\n"
    "\n"
    "commands:\n"
    "  version                                  plugin version and link protocol\n"
    "  volumes                                  list volumes\n"
    "  add-volume NAME PATH                     serve another volume\n"
    "  remove-volume NAME                       stop serving a volume\n"
    "  create VOLUME... [--name NAME] [--limit SIZE]\n"
    "                                           create a snapshot; prints its id\n"
    "  append-storage ID PATH OFFSET:LENGTH...  add difference storage ranges\n"
    "  take ID                                  take the snapshot (one atomic point)\n"
    "  info ID                                  state, sequence, exports, storage\n"
    "  list                                     all snapshots\n"
    "  wait-event ID --timeout MS               next event, or none after MS ms\n"
    "  destroy ID                               destroy the snapshot\n"
    "  cbt-info VOLUME                          generation, sequence, block size\n"
    "  cbt-map VOLUME [--snapshot ID] [--output FILE]\n"
    "                                           raw stamps (one per CBT block)\n"
    "  cbt-changes VOLUME --since GENERATION:SEQUENCE [--snapshot ID]\n"
    "                                           changed byte ranges\n"
    "  mark-dirty VOLUME OFFSET:LENGTH...       stamp ranges as changed\n"
    "\n"
    "ID is a snapshot UUID or name. Sizes take K, M, G, T suffixes.\n"
    "Exit status: 0 ok, 1 operation failed, 2 usage error.\n";

// The plugin runs in "/": send absolute paths.
std::string absolute(const std::string& p) { return std::filesystem::absolute(p).lexically_normal().string(); }

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "nbdsnap-link: %s\n%s", msg.c_str(), kUsage);
  return 2;
}

std::string state_text(link::SnapshotState s) {
  switch (s) {
    case link::CREATED: return "created";
    case link::TAKEN: return "taken";
    case link::CORRUPTED: return "corrupted";
    default: return "unknown";
  }
}

void print_json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  std::cout << out << "\n";
}

void print_snapshot(const link::SnapshotInfo& s) {
  std::cout << "id:        " << s.id() << "\n";
  if (!s.name().empty()) std::cout << "name:      " << s.name() << "\n";
  std::cout << "state:     " << state_text(s.state()) << "\n";
  std::cout << "sequence:  " << s.sequence() << "\n";
  std::cout << "volumes:  ";
  for (const auto& v : s.volumes()) std::cout << " " << v;
  std::cout << "\nexports:  ";
  for (const auto& e : s.exports()) std::cout << " " << e;
  std::cout << "\nstorage:   " << nbdsnap::human_size(s.storage_used()) << " used of "
            << nbdsnap::human_size(s.storage_capacity());
  if (s.storage_limit()) std::cout << " (limit " << nbdsnap::human_size(s.storage_limit()) << ")";
  std::cout << "\nchunks:    " << s.chunks_copied() << " copied\n";
  if (s.state() == link::CORRUPTED) std::cout << "error:     " << s.error() << "\n";
}

struct Args {
  std::vector<std::string> positional;
  std::string name, snapshot, since, output, limit, timeout;
};

// Splits ARGS into positional words and the --options this tool knows.
bool parse_args(int argc, char** argv, int from, Args* a, std::string* err) {
  for (int i = from; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) {
        *err = s + " needs a value";
        return false;
      }
      *out = argv[++i];
      return true;
    };
    if (s == "--name") { if (!value(&a->name)) return false; }
    else if (s == "--snapshot") { if (!value(&a->snapshot)) return false; }
    else if (s == "--since") { if (!value(&a->since)) return false; }
    else if (s == "--output") { if (!value(&a->output)) return false; }
    else if (s == "--limit") { if (!value(&a->limit)) return false; }
    else if (s == "--timeout") { if (!value(&a->timeout)) return false; }
    else if (s.rfind("--", 0) == 0) { *err = "unknown option " + s; return false; }
    else a->positional.push_back(s);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket;
  bool json = false;
  int i = 1;
  for (; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "--help" || s == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (s == "--json") json = true;
    else if (s == "--socket" && i + 1 < argc) socket = argv[++i];
    else break;
  }
  if (i >= argc) return usage_error("no command given");
  std::string cmd = argv[i++];
  Args a;
  std::string err;
  if (!parse_args(argc, argv, i, &a, &err)) return usage_error(cmd + ": " + err);
  if (socket.empty()) return usage_error("--socket PATH is required");
  auto& pos = a.positional;
  auto need = [&](size_t n, bool at_least = false) {
    return at_least ? pos.size() >= n : pos.size() == n;
  };

  link::Request req;
  if (cmd == "version" && need(0)) req.mutable_version();
  else if (cmd == "volumes" && need(0)) req.mutable_list_volumes();
  else if (cmd == "add-volume" && need(2)) {
    req.mutable_add_volume()->set_name(pos[0]);
    req.mutable_add_volume()->set_path(absolute(pos[1]));
  } else if (cmd == "remove-volume" && need(1)) req.mutable_remove_volume()->set_name(pos[0]);
  else if (cmd == "create" && need(1, true)) {
    auto* q = req.mutable_create();
    for (const auto& v : pos) q->add_volumes(v);
    q->set_name(a.name);
    if (!a.limit.empty()) {
      auto l = nbdsnap::parse_size(a.limit);
      if (!l) return usage_error("create: --limit " + a.limit + ": not a size");
      q->set_storage_limit(*l);
    }
  } else if (cmd == "append-storage" && need(3, true)) {
    auto* q = req.mutable_append_storage();
    q->set_id(pos[0]);
    q->set_path(absolute(pos[1]));
    for (size_t k = 2; k < pos.size(); ++k) {
      auto r = nbdsnap::parse_range(pos[k]);
      if (!r) return usage_error("append-storage: " + pos[k] + ": expected OFFSET:LENGTH");
      auto* out = q->add_ranges();
      out->set_offset(r->first);
      out->set_length(r->second);
    }
  } else if (cmd == "take" && need(1)) req.mutable_take()->set_id(pos[0]);
  else if (cmd == "info" && need(1)) req.mutable_info()->set_id(pos[0]);
  else if (cmd == "list" && need(0)) req.mutable_collect();
  else if (cmd == "wait-event" && need(1)) {
    auto t = nbdsnap::parse_size(a.timeout);
    if (a.timeout.empty() || !t || *t > UINT32_MAX) return usage_error("wait-event: --timeout MS is required");
    req.mutable_wait_event()->set_id(pos[0]);
    req.mutable_wait_event()->set_timeout_ms(static_cast<uint32_t>(*t));
  } else if (cmd == "destroy" && need(1)) req.mutable_destroy()->set_id(pos[0]);
  else if (cmd == "cbt-info" && need(1)) req.mutable_cbt_info()->set_volume(pos[0]);
  else if (cmd == "cbt-map" && need(1)) {
    req.mutable_cbt_map()->set_volume(pos[0]);
    req.mutable_cbt_map()->set_snapshot(a.snapshot);
  } else if (cmd == "cbt-changes" && need(1)) {
    auto colon = a.since.rfind(':');
    auto seq = colon == std::string::npos ? std::nullopt : nbdsnap::parse_size(a.since.substr(colon + 1));
    if (!seq) return usage_error("cbt-changes: --since GENERATION:SEQUENCE is required");
    auto* q = req.mutable_cbt_changes();
    q->set_volume(pos[0]);
    q->set_generation(a.since.substr(0, colon));
    q->set_since_sequence(*seq);
    q->set_snapshot(a.snapshot);
  } else if (cmd == "mark-dirty" && need(2, true)) {
    auto* q = req.mutable_cbt_mark_dirty();
    q->set_volume(pos[0]);
    for (size_t k = 1; k < pos.size(); ++k) {
      auto r = nbdsnap::parse_range(pos[k]);
      if (!r) return usage_error("mark-dirty: " + pos[k] + ": expected OFFSET:LENGTH");
      auto* out = q->add_ranges();
      out->set_offset(r->first);
      out->set_length(r->second);
    }
  } else {
    return usage_error("unknown command or wrong number of arguments: " + cmd);
  }

  LinkClient client;
  Status st = client.connect(socket);
  if (!st) {
    std::fprintf(stderr, "nbdsnap-link: %s\n", st.message().c_str());
    return 1;
  }

  if (cmd == "cbt-map") {  // paged: fetch every page
    std::vector<uint32_t> stamps;
    std::string generation;
    for (;;) {
      req.mutable_cbt_map()->set_first_block(stamps.size());
      auto r = client.call(req);
      if (!r) {
        std::fprintf(stderr, "nbdsnap-link: %s\n", r.status().message().c_str());
        return 1;
      }
      generation = r->cbt_map().generation();
      if (r->cbt_map().stamps_size() == 0) break;
      stamps.insert(stamps.end(), r->cbt_map().stamps().begin(), r->cbt_map().stamps().end());
    }
    std::ofstream file;
    std::ostream* out = &std::cout;
    if (!a.output.empty()) {
      file.open(a.output);
      if (!file) {
        std::fprintf(stderr, "nbdsnap-link: cbt-map: cannot write %s: %s\n", a.output.c_str(), std::strerror(errno));
        return 1;
      }
      out = &file;
    }
    if (json) {
      *out << "{\"generation\":\"" << generation << "\",\"stamps\":[";
      for (size_t k = 0; k < stamps.size(); ++k) *out << (k ? "," : "") << stamps[k];
      *out << "]}\n";
    } else {
      *out << "# generation " << generation << "\n";
      for (size_t k = 0; k < stamps.size(); ++k) *out << k << " " << stamps[k] << "\n";
    }
    return 0;
  }

  auto r = client.call(req);
  if (!r) {
    std::fprintf(stderr, "nbdsnap-link: %s\n", r.status().message().c_str());
    return 1;
  }
  const link::Response& resp = *r;
  if (json) {
    print_json(resp);
    return 0;
  }
  switch (resp.reply_case()) {
    case link::Response::kVersion:
      std::cout << "nbdsnap " << resp.version().version() << " (link protocol " << resp.version().protocol() << ")\n";
      break;
    case link::Response::kListVolumes:
      for (const auto& v : resp.list_volumes().volumes())
        std::cout << v.name() << "\t" << v.path() << "\t" << nbdsnap::human_size(v.size()) << "\tchunk "
                  << nbdsnap::human_size(v.chunk_size()) << "\tcbt block " << nbdsnap::human_size(v.cbt_block_size())
                  << "\n";
      break;
    case link::Response::kCreate: std::cout << resp.create().id() << "\n"; break;
    case link::Response::kTake:
      std::cout << "taken: sequence " << resp.take().sequence() << ", writes paused " << resp.take().pause_us()
                << " us\n";
      break;
    case link::Response::kInfo: print_snapshot(resp.info().snapshot()); break;
    case link::Response::kCollect:
      for (const auto& s : resp.collect().snapshots())
        std::cout << s.id() << "\t" << (s.name().empty() ? "-" : s.name()) << "\t" << state_text(s.state())
                  << "\tsequence " << s.sequence() << "\n";
      break;
    case link::Response::kWaitEvent:
      if (!resp.wait_event().has_event()) {
        std::cout << "no event (timeout)\n";
      } else {
        const auto& e = resp.wait_event().event();
        if (e.code() == link::LOW_FREE_SPACE)
          std::cout << "low-free-space: requested " << nbdsnap::human_size(e.requested()) << "\n";
        else if (e.code() == link::NO_SPACE)
          std::cout << "no-space\n";
        else
          std::cout << "corrupted: volume " << e.volume() << ": " << e.error() << "\n";
      }
      break;
    case link::Response::kCbtInfo: {
      const auto& c = resp.cbt_info();
      std::cout << "generation: " << c.generation() << "\nsequence:   " << c.sequence()
                << "\nblock size: " << c.block_size() << "\nblocks:     " << c.block_count()
                << "\ncapacity:   " << c.capacity() << "\n";
      break;
    }
    case link::Response::kCbtChanges: {
      const auto& c = resp.cbt_changes();
      std::cout << "# generation " << c.generation() << " sequence " << c.sequence() << ": "
                << nbdsnap::human_size(c.changed_bytes()) << " changed\n";
      for (const auto& rg : c.ranges()) std::cout << rg.offset() << ":" << rg.length() << "\n";
      break;
    }
    default: break;  // append-storage, destroy, mark-dirty: silent success
  }
  return 0;
}
