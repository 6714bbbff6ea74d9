// Service: everything nbdsnapd does apart from sockets, signals and the
// nbdkit child (those are in daemon.cc, with Asio). Blocking: its request
// handlers run on the daemon's worker threads, never on the I/O thread.
//
// - LinkPool: idle LinkClient connections to the plugin's control link, one
//   per concurrent call (LinkClient is not thread-safe). While the data plane
//   is down, or when a call breaks because nbdkit died, calls fail with
//   EAGAIN "data plane restarting".
// - EventHub: per snapshot, the history of its events as the daemon saw
//   them; each API connection keeps its own cursor, so every waiter sees
//   every event. notify(id) tells the I/O thread that a history changed.
// - Pumps: a few threads that drain the plugin's event queues (WaitEvent in a
//   loop, each snapshot's queue has a single consumer: the daemon) into the
//   EventHub, and grow managed storage on LOW_FREE_SPACE.
// - Storage policy: managed files (create, fallocate, append, grow up to the
//   limit, delete once the data plane no longer retains the snapshot).
// - Registry: volumes and managed files, persisted (registry.h).
// Thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "api.pb.h"
#include "link.pb.h"
#include "link_client.h"
#include "options.h"
#include "registry.h"
#include "status.h"

namespace nbdsnap::daemon {

// Files of the state directory.
struct Paths {
  explicit Paths(const std::string& state_dir);
  std::string state_dir;
  std::string data_dir;      // STATE/data: the plugin's state=
  std::string link_socket;   // STATE/link.sock: the plugin's control=
  std::string storage_dir;   // STATE/storage: default managed storage files
  std::string registry;      // STATE/nbdsnapd.registry
  std::string log;           // STATE/nbdsnapd.log (when daemonized)
  std::string lock;          // STATE/nbdsnapd.lock
};

// "nbdsnapd: message" logging to stderr, one write per line (with a
// timestamp when daemonized). log_raw: a line as is (nbdkit's messages).
void log_line(const std::string& message);
void log_raw(const std::string& line);
void set_log_timestamps(bool on);

class EventHub {
 public:
  enum class Next { kEvent, kNone, kGone };
  void set_notify(std::function<void(const std::string& id)> fn);
  bool add(const std::string& id, const std::string& name);  // true if new
  void remove(const std::string& id);
  void append(const std::string& id, const link::Event& event);
  // The id of a known live snapshot whose id or name is `key`.
  std::optional<std::string> resolve(const std::string& key) const;
  // The event at *cursor (advancing it), none yet, or the snapshot is gone.
  Next next(const std::string& id, uint64_t* cursor, link::Event* out) const;
  std::vector<std::string> ids() const;

 private:
  static constexpr size_t kMaxEvents = 4096;
  struct History {
    std::string name;
    std::deque<link::Event> events;
    uint64_t base = 0;  // absolute index of events.front()
  };
  void notify(const std::string& id);
  mutable std::mutex mu_;
  std::map<std::string, History> histories_;
  std::function<void(const std::string&)> notify_;
};

class Service {
 public:
  Service(const Options& options, const Paths& paths, Registry* registry);
  ~Service();
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  // Where NBD is served (for URIs); tcp_port "" = no TCP.
  void set_endpoints(const std::string& tcp_host, const std::string& tcp_port);

  // The data plane: `up` after nbdkit answered and reconcile() ran; down
  // (EAGAIN) from the moment it exits. Each up/down starts a new epoch.
  void set_data_plane_up(bool up);
  bool data_plane_up() const { return up_.load(); }

  // After (re)start of the data plane, over `client`: finishes or undoes
  // interrupted creates, deletes managed files no longer needed, starts
  // event pumps for live snapshots, grows storage that ran low meanwhile.
  // An error means the link failed (nbdkit exiting).
  Status reconcile(LinkClient& client);

  // Volume arguments of nbdkit (volume=NAME=PATH), from the registry.
  std::vector<std::string> volume_args() const;
  // Saves the registry (after start-up added --volume entries).
  Status persist();

  // Answers one request (any but version and wait_event). Blocking.
  api::Response handle(const api::Request& request);

  // wait-event support: the id of snapshot `key` (id or name), registering
  // it with the EventHub and the pumps if the daemon did not know it.
  Result<std::string> resolve_snapshot(const std::string& key);
  EventHub& events() { return hub_; }

  void start_pumps();
  void stop_pumps();  // joins

 private:
  // Calls the link: over `own` if given, else a pooled connection. Transport
  // failures (nbdkit gone) become EAGAIN "OP: data plane restarting".
  Result<link::Response> call(const std::string& op, const link::Request& req, LinkClient* own = nullptr);
  Status transport_error(const std::string& op, const Status& st) const;
  bool is_transport_error(const Status& st) const;

  Status volume_add(const api::VolumeAddRequest& q, api::VolumeAddReply* r);
  Status volume_list(api::VolumeListReply* r);
  Status volume_remove(const api::VolumeRemoveRequest& q);
  Status snapshot_create(const api::SnapshotCreateRequest& q, api::SnapshotCreateReply* r);
  Status append_storage(const api::AppendStorageRequest& q);
  Status take(const api::TakeRequest& q, api::TakeReply* r);
  Status snapshot_list(api::SnapshotListReply* r);
  Status snapshot_info(const std::string& op, const std::string& id, api::Snapshot* out, LinkClient* own = nullptr);
  Status destroy(const api::DestroyRequest& q);
  Status cbt_info(const api::CbtInfoRequest& q, api::CbtInfoReply* r);
  Status cbt_map(const api::CbtMapRequest& q, api::CbtMapReply* r);
  Status cbt_changes(const api::CbtChangesRequest& q, api::CbtChangesReply* r);
  Status cbt_mark_dirty(const api::CbtMarkDirtyRequest& q);

  void fill_volume(api::Volume* out, const link::VolumeInfo& v) const;
  void fill_snapshot(api::Snapshot* out, const link::SnapshotInfo& s) const;
  std::vector<std::string> uris(const std::string& export_name) const;

  // Storage policy.
  Status grow(const std::string& id, LinkClient* own, const char* why);
  void cleanup(LinkClient* own);
  void snapshot_gone(const std::string& id, LinkClient* own);
  void register_snapshot(const std::string& id, const std::string& name);
  Status save_registry();  // requires reg_mu_

  // Pumps.
  void pump_loop(size_t index);
  void pump_add(const std::string& id);
  void pump_remove(const std::string& id);
  void handle_event(LinkClient& client, const std::string& id, const link::Event& ev);

  const Options& options_;
  const Paths& paths_;
  std::string tcp_host_, tcp_port_;

  std::atomic<bool> up_{false};
  std::atomic<uint64_t> epoch_{0};

  // Link pool.
  struct Pooled {
    std::unique_ptr<LinkClient> client;
    uint64_t epoch;
  };
  std::mutex pool_mu_;
  std::vector<Pooled> idle_;  // guarded by pool_mu_

  mutable std::mutex reg_mu_;
  Registry* registry_;  // guarded by reg_mu_
  std::mutex grow_mu_;
  std::mutex cleanup_mu_;

  EventHub hub_;

  static constexpr size_t kPumps = 4;
  std::mutex pump_mu_;
  std::condition_variable pump_cv_;
  bool pump_stop_ = false;                              // guarded by pump_mu_
  std::vector<std::set<std::string>> pump_sets_;        // guarded by pump_mu_
  std::vector<std::thread> pump_threads_;
};

}  // namespace nbdsnap::daemon
