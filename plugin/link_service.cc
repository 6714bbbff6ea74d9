#include "link_service.h"

#include "frame.h"

namespace nbdsnap {
namespace {

constexpr uint32_t kMaxMapBlocks = 1u << 19;  // varint stamps <= 5 bytes: 2.5 MiB, under kMaxFrame

void fail(link::Response* r, const Status& st) {
  r->clear_reply();
  r->set_error_code(st.code());
  r->set_error(st.message());
}

link::SnapshotState to_proto(SnapshotState s) {
  switch (s) {
    case SnapshotState::kCreated: return link::CREATED;
    case SnapshotState::kTaken: return link::TAKEN;
    case SnapshotState::kCorrupted: return link::CORRUPTED;
  }
  return link::SNAPSHOT_STATE_UNSPECIFIED;
}

void fill(link::SnapshotInfo* out, const SnapshotInfo& i) {
  out->set_id(i.id.str());
  out->set_name(i.name);
  out->set_state(to_proto(i.state));
  out->set_sequence(i.sequence);
  for (const auto& v : i.volumes) out->add_volumes(v);
  for (const auto& e : i.exports) out->add_exports(e);
  if (!i.error.is_ok()) {
    out->set_error_code(i.error.code());
    out->set_error(i.error.message());
  }
  out->set_storage_capacity(i.storage.capacity);
  out->set_storage_used(i.storage.used);
  out->set_storage_limit(i.storage_limit);
  out->set_chunks_copied(i.chunks_copied);
  out->set_retained(i.retained);
  out->set_chunk_table_bytes(i.chunk_table_bytes);
  out->set_saved_stamps_bytes(i.saved_stamps_bytes);
}

void fill(link::VolumeInfo* vi, const Volume& v) {
  vi->set_name(v.name());
  vi->set_path(v.path());
  vi->set_size(v.size());
  vi->set_chunk_size(v.geometry().chunk_size());
  vi->set_cbt_block_size(v.geometry().cbt_block_size());
}

}  // namespace

link::Response handle_request(Engine& engine, const link::Request& req) {
  link::Response resp;
  resp.set_tag(req.tag());
  switch (req.op_case()) {
    case link::Request::kVersion: {
      auto* r = resp.mutable_version();
      r->set_version(NBDSNAP_VERSION);
      r->set_protocol(kLinkProtocol);
      break;
    }
    case link::Request::kListVolumes: {
      auto* r = resp.mutable_list_volumes();
      for (const auto& v : engine.volumes()) fill(r->add_volumes(), *v);
      break;
    }
    case link::Request::kAddVolume: {
      const auto& q = req.add_volume();
      Status st = engine.add_volume(q.name(), q.path());
      auto v = st ? engine.volume(q.name()) : nullptr;
      if (!v) fail(&resp, st ? Status::error(ENOENT, "volume add: removed meanwhile") : st);
      else fill(resp.mutable_add_volume()->mutable_volume(), *v);
      break;
    }
    case link::Request::kRemoveVolume: {
      Status st = engine.remove_volume(req.remove_volume().name());
      if (!st) fail(&resp, st); else resp.mutable_remove_volume();
      break;
    }
    case link::Request::kCreate: {
      const auto& q = req.create();
      auto id = engine.create_snapshot({q.volumes().begin(), q.volumes().end()}, q.name(), q.storage_limit());
      if (!id) fail(&resp, id.status()); else resp.mutable_create()->set_id(id->str());
      break;
    }
    case link::Request::kAppendStorage: {
      const auto& q = req.append_storage();
      std::vector<StorageRange> ranges;
      for (const auto& r : q.ranges()) ranges.push_back(StorageRange{q.path(), r.offset(), r.length()});
      Status st = q.path().empty() ? Status::error(EINVAL, "append-storage: no path given")
                                   : engine.append_storage(q.id(), ranges);
      if (!st) fail(&resp, st); else resp.mutable_append_storage();
      break;
    }
    case link::Request::kTake: {
      auto t = engine.take(req.take().id());
      if (!t) {
        fail(&resp, t.status());
      } else {
        resp.mutable_take()->set_sequence(t->sequence);
        resp.mutable_take()->set_pause_us(t->pause_us);
      }
      break;
    }
    case link::Request::kInfo: {
      auto i = engine.info(req.info().id());
      if (!i) fail(&resp, i.status()); else fill(resp.mutable_info()->mutable_snapshot(), *i);
      break;
    }
    case link::Request::kCollect: {
      auto* r = resp.mutable_collect();
      for (const auto& i : engine.collect(req.collect().include_retained())) fill(r->add_snapshots(), i);
      break;
    }
    case link::Request::kWaitEvent: {
      auto e = engine.wait_event(req.wait_event().id(), req.wait_event().timeout_ms());
      if (!e) {
        fail(&resp, e.status());
        break;
      }
      auto* r = resp.mutable_wait_event();
      if (*e) {
        const Event& ev = **e;
        auto* out = r->mutable_event();
        out->set_code(ev.code == EventCode::kLowFreeSpace ? link::LOW_FREE_SPACE
                      : ev.code == EventCode::kNoSpace    ? link::NO_SPACE
                                                          : link::CORRUPTED_EVENT);
        out->set_time_ms(ev.time_ms);
        out->set_requested(ev.requested);
        out->set_volume(ev.volume);
        out->set_error_code(ev.error_code);
        out->set_error(ev.error);
      }
      break;
    }
    case link::Request::kDestroy: {
      Status st = engine.destroy(req.destroy().id());
      if (!st) fail(&resp, st); else resp.mutable_destroy();
      break;
    }
    case link::Request::kCbtInfo: {
      auto i = engine.cbt_info(req.cbt_info().volume());
      if (!i) {
        fail(&resp, i.status());
        break;
      }
      auto* r = resp.mutable_cbt_info();
      r->set_generation(i->generation.str());
      r->set_sequence(i->sequence);
      r->set_block_size(i->block_size);
      r->set_block_count(i->block_count);
      r->set_capacity(i->capacity);
      break;
    }
    case link::Request::kCbtMap: {
      const auto& q = req.cbt_map();
      uint32_t count = q.block_count() == 0 || q.block_count() > kMaxMapBlocks ? kMaxMapBlocks : q.block_count();
      auto m = engine.cbt_map(q.volume(), q.snapshot(), q.first_block(), count);
      if (!m) {
        fail(&resp, m.status());
        break;
      }
      auto* r = resp.mutable_cbt_map();
      auto info = engine.cbt_info(q.volume());
      if (info) r->set_generation(info->generation.str());
      r->mutable_stamps()->Add(m->begin(), m->end());
      break;
    }
    case link::Request::kCbtChanges: {
      const auto& q = req.cbt_changes();
      auto c = engine.cbt_changes(q.volume(), q.generation(), q.since_sequence(), q.snapshot());
      if (!c) {
        fail(&resp, c.status());
        break;
      }
      auto* r = resp.mutable_cbt_changes();
      r->set_generation(c->generation.str());
      r->set_sequence(c->sequence);
      r->set_changed_bytes(c->changed_bytes);
      for (const auto& br : c->ranges) {
        auto* out = r->add_ranges();
        out->set_offset(br.offset);
        out->set_length(br.length);
      }
      if (r->ByteSizeLong() > kMaxFrame - 1024)
        fail(&resp, Status::error(EMSGSIZE, "cbt changes: answer larger than a frame; read the map in pages"));
      break;
    }
    case link::Request::kCbtMarkDirty: {
      const auto& q = req.cbt_mark_dirty();
      std::vector<ByteRange> ranges;
      for (const auto& r : q.ranges()) ranges.push_back(ByteRange{r.offset(), r.length()});
      Status st = ranges.empty() ? Status::error(EINVAL, "mark-dirty: no range given")
                                 : engine.mark_dirty(q.volume(), ranges);
      if (!st) fail(&resp, st); else resp.mutable_cbt_mark_dirty();
      break;
    }
    case link::Request::OP_NOT_SET:
      fail(&resp, Status::error(ENOTSUP, "request: unknown or missing operation (client newer than plugin?)"));
      break;
  }
  return resp;
}

}  // namespace nbdsnap
