// Canned nbdsnapd replies for the CLI tests: a plausible answer to every
// API request, with values the tests then look for in the CLI's output.
// Pure functions.
#pragma once

#include <cerrno>
#include <string>

#include "api.pb.h"

namespace nbdsnap::test {

constexpr const char* kSnapId = "3f0c9a1e-5b7d-4c2a-9e61-0a1b2c3d4e5f";
constexpr const char* kGeneration = "9d5e2a44-1c3b-4f6e-8a7d-112233445566";
constexpr const char* kNbdSocket = "/run/nbdsnap/nbd.sock";
constexpr uint64_t kCbtBlocks = 10;      // the canned CBT map
constexpr uint32_t kCbtPage = 4;         // stamps per canned cbt map page

inline api::Snapshot sample_snapshot(api::SnapshotState state = api::TAKEN) {
  api::Snapshot s;
  s.set_id(kSnapId);
  s.set_name("nightly");
  s.set_state(state);
  s.add_volumes("vm1");
  s.add_volumes("vm2");
  if (state != api::CREATED) {
    s.set_sequence(7);
    s.add_exports("vm1@nightly");
    s.add_exports("vm2@nightly");
    s.add_uris(std::string("nbd+unix:///vm1@nightly?socket=") + kNbdSocket);
    s.add_uris(std::string("nbd+unix:///vm2@nightly?socket=") + kNbdSocket);
  }
  s.set_storage_capacity(2ull << 30);
  s.set_storage_used(3ull << 20);
  s.set_storage_limit(16ull << 30);
  s.set_storage_path("/var/lib/nbdsnap/storage/" + std::string(kSnapId) + ".diff");
  s.set_chunks_copied(12);
  if (state == api::CORRUPTED) {
    s.set_error_code(ENOSPC);
    s.set_error("copy-before-write: volume vm1: chunk 17: no difference storage left");
  }
  return s;
}

inline api::Volume sample_volume(const std::string& name, const std::string& path) {
  api::Volume v;
  v.set_name(name);
  v.set_path(path);
  v.set_size(8ull << 30);
  v.set_chunk_size(256 << 10);
  v.set_cbt_block_size(64 << 10);
  v.add_uris("nbd+unix:///" + name + "?socket=" + kNbdSocket);
  v.add_uris("nbd://192.0.2.1:10809/" + name);
  return v;
}

// Stamp of block B in the canned CBT map: 0 0 0 1 1 1 2 2 2 3.
inline uint32_t canned_stamp(uint64_t b) { return static_cast<uint32_t>(b / 3); }

inline api::Response canned_reply(const api::Request& req) {
  api::Response r;
  switch (req.op_case()) {
    case api::Request::kVersion: {
      auto* v = r.mutable_version();
      v->set_version("0.1.0");
      v->set_protocol(1);
      v->set_data_plane("running");
      v->set_data_plane_restarts(2);
      break;
    }
    case api::Request::kVolumeAdd:
      *r.mutable_volume_add()->mutable_volume() =
          sample_volume(req.volume_add().name(), req.volume_add().path());
      break;
    case api::Request::kVolumeList:
      *r.mutable_volume_list()->add_volumes() = sample_volume("vm1", "/srv/vm1.img");
      *r.mutable_volume_list()->add_volumes() = sample_volume("vm2", "/dev/vg0/vm2");
      break;
    case api::Request::kVolumeRemove: r.mutable_volume_remove(); break;
    case api::Request::kSnapshotCreate: {
      api::Snapshot s = sample_snapshot(api::CREATED);
      s.set_name(req.snapshot_create().name());
      s.clear_volumes();
      for (const auto& v : req.snapshot_create().volumes()) s.add_volumes(v);
      *r.mutable_snapshot_create()->mutable_snapshot() = s;
      break;
    }
    case api::Request::kAppendStorage: r.mutable_append_storage(); break;
    case api::Request::kTake:
      *r.mutable_take()->mutable_snapshot() = sample_snapshot(api::TAKEN);
      r.mutable_take()->set_pause_us(850);
      break;
    case api::Request::kSnapshotList:
      *r.mutable_snapshot_list()->add_snapshots() = sample_snapshot(api::TAKEN);
      *r.mutable_snapshot_list()->add_snapshots() = sample_snapshot(api::CORRUPTED);
      break;
    case api::Request::kSnapshotInfo:
      *r.mutable_snapshot_info()->mutable_snapshot() = sample_snapshot(api::TAKEN);
      break;
    case api::Request::kWaitEvent: {
      auto* e = r.mutable_wait_event()->mutable_event();
      e->set_code(link::LOW_FREE_SPACE);
      e->set_time_ms(1764000000123ull);
      e->set_requested(1ull << 30);
      break;
    }
    case api::Request::kDestroy: r.mutable_destroy(); break;
    case api::Request::kCbtInfo: {
      auto* c = r.mutable_cbt_info();
      c->set_generation(kGeneration);
      c->set_sequence(8);
      c->set_block_size(64 << 10);
      c->set_block_count(kCbtBlocks);
      c->set_capacity(kCbtBlocks * (64 << 10));
      break;
    }
    case api::Request::kCbtMap: {
      auto* m = r.mutable_cbt_map();
      m->set_generation(kGeneration);
      uint64_t first = req.cbt_map().first_block();
      uint64_t end = std::min<uint64_t>(kCbtBlocks, first + std::min(kCbtPage, req.cbt_map().block_count()));
      for (uint64_t b = first; b < end; ++b) m->add_stamps(canned_stamp(b));
      break;
    }
    case api::Request::kCbtChanges: {
      auto* c = r.mutable_cbt_changes();
      c->set_generation(req.cbt_changes().generation());
      c->set_sequence(8);
      auto* a = c->add_ranges();
      a->set_offset(0);
      a->set_length(65536);
      auto* b = c->add_ranges();
      b->set_offset(1ull << 30);
      b->set_length(131072);
      c->set_changed_bytes(65536 + 131072);
      break;
    }
    case api::Request::kCbtMarkDirty: r.mutable_cbt_mark_dirty(); break;
    default:
      r.set_error_code(ENOTSUP);
      r.set_error("request: unknown request type");
  }
  return r;
}

}  // namespace nbdsnap::test
