// nbdsnapd restart: SIGTERM removes the sockets and stops nbdkit; starting
// again with the same state directory serves the same volumes (also those
// added through the API) and lists the snapshots with their true state;
// managed storage keeps working and is deleted on destroy.
#include <sys/stat.h>
#include <sys/time.h>

#include "daemon_fixture.h"

namespace nbdsnap::dt {
namespace {

class Restart : public DaemonTest {};

TEST_F(Restart, SameVolumesAndSnapshotsAfterRestart) {
  constexpr uint64_t kSize = 8 * MiB;
  make_sparse_file(volume_path_, kSize);
  make_sparse_file(path("vol1.img"), 4 * MiB);
  ASSERT_TRUE(start_daemon({"--param", "chunk_minimum_shift=16", "--nbd-listen", "127.0.0.1:0"}));

  // vol1 added at run time.
  api::Request add;
  add.mutable_volume_add()->set_name("vol1");
  add.mutable_volume_add()->set_path(path("vol1.img"));
  auto added = call(add);
  ASSERT_TRUE(IsOk(added));
  const auto& uris = added->volume_add().volume().uris();
  ASSERT_EQ(uris.size(), 2);
  EXPECT_EQ(uris[0], "nbd+unix:///vol1?socket=" + nbd_socket_);
  EXPECT_EQ(uris[1].rfind("nbd://127.0.0.1:", 0), 0u) << uris[1];

  std::string err;
  NbdPtr h = open(kVolume, {}, &err);
  ASSERT_TRUE(h) << err;
  std::vector<char> buf(kSize);
  stamp_range(buf.data(), 0, kSize, 1);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), kSize, 0), "");
  ASSERT_NE(nbd_flush(h.get(), 0), -1);

  // taken (both volumes), created (never taken), and one destroyed.
  ASSERT_TRUE(IsOk(create({kVolume, "vol1"}, "taken")));
  auto t = take("taken");
  ASSERT_TRUE(IsOk(t));
  const uint64_t seq = t->take().snapshot().sequence();
  auto created = create({kVolume}, "fresh");
  ASSERT_TRUE(IsOk(created));
  auto gone = create({kVolume}, "gone");
  ASSERT_TRUE(IsOk(gone));
  ASSERT_TRUE(IsOk(destroy("gone")));
  stamp_range(buf.data(), 0, MiB, 2);
  ASSERT_EQ(nbd_write_all(h.get(), buf.data(), MiB, 0), "");
  ASSERT_NE(nbd_flush(h.get(), 0), -1);
  h.reset();
  auto before = list();
  ASSERT_TRUE(IsOk(before));
  ASSERT_EQ(before->snapshot_list().snapshots_size(), 2);
  auto cbt_before = cbt_info();
  ASSERT_TRUE(IsOk(cbt_before));
  const std::string taken_storage = t->take().snapshot().storage_path();
  ASSERT_FALSE(taken_storage.empty());

  // Stop: exit 0, sockets removed, nbdkit gone.
  pid_t nbdkit = daemon_.nbdkit_pid();
  ASSERT_GT(nbdkit, 0);
  client_.reset();
  ASSERT_TRUE(daemon_.stop());
  EXPECT_NE(::access(api_socket_.c_str(), F_OK), 0) << "API socket left behind";
  EXPECT_NE(::access(nbd_socket_.c_str(), F_OK), 0) << "NBD socket left behind";
  EXPECT_TRUE(process_gone(nbdkit)) << "nbdkit still running after nbdsnapd stopped";

  // Start again: same state directory, without --volume for vol1.
  ASSERT_TRUE(restart_daemon());
  auto vols = volume_list();
  ASSERT_TRUE(IsOk(vols));
  std::vector<std::string> names;
  for (const auto& v : vols->volume_list().volumes()) names.push_back(v.name());
  EXPECT_EQ(names, (std::vector<std::string>{"vol0", "vol1"}));
  auto after = list();
  ASSERT_TRUE(IsOk(after));
  ASSERT_EQ(after->snapshot_list().snapshots_size(), 2);
  std::map<std::string, api::Snapshot> by_name;
  for (const auto& s : after->snapshot_list().snapshots()) by_name[s.name()] = s;
  ASSERT_TRUE(by_name.count("taken"));
  ASSERT_TRUE(by_name.count("fresh"));
  EXPECT_EQ(by_name["taken"].state(), api::TAKEN);
  EXPECT_EQ(by_name["taken"].sequence(), seq);
  EXPECT_EQ(by_name["taken"].storage_path(), taken_storage);
  EXPECT_EQ(by_name["taken"].exports_size(), 2);
  EXPECT_EQ(by_name["fresh"].state(), api::CREATED);
  for (const auto& s : before->snapshot_list().snapshots()) {
    const auto& a = by_name[s.name()];
    EXPECT_EQ(a.id(), s.id());
    EXPECT_EQ(a.storage_capacity(), s.storage_capacity());
    EXPECT_EQ(a.storage_used(), s.storage_used());
    EXPECT_EQ(a.storage_limit(), s.storage_limit());
  }
  auto cbt_after = cbt_info();
  ASSERT_TRUE(IsOk(cbt_after));
  EXPECT_EQ(cbt_after->cbt_info().generation(), cbt_before->cbt_info().generation()) << "clean restart lost CBT";
  EXPECT_EQ(cbt_after->cbt_info().sequence(), cbt_before->cbt_info().sequence());

  // The snapshot export still has the pre-take data.
  NbdPtr s = open("vol0@taken", {}, &err);
  ASSERT_TRUE(s) << err;
  std::vector<char> got(MiB);
  ASSERT_EQ(nbd_read_all(s.get(), got.data(), MiB, 0), "");
  for (uint64_t off = 0; off < MiB; off += kBlock) ASSERT_EQ(check_block(got.data() + off, off, 1), "") << off;
  s.reset();

  // The "fresh" snapshot can still be taken; destroys delete managed files.
  ASSERT_TRUE(IsOk(take("fresh")));
  ASSERT_TRUE(IsOk(destroy("fresh")));
  ASSERT_TRUE(IsOk(destroy("taken")));
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while (!list_dir(state_dir_ + "/storage").empty() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(list_dir(state_dir_ + "/storage").empty());

  // --volume for a known name with another path is refused (exit 1).
  client_.reset();
  ASSERT_TRUE(daemon_.stop());
  auto args = base_args();
  args.push_back("--volume");
  args.push_back("vol1=" + volume_path_);
  auto r = run_command([&] {
    std::vector<std::string> v = {daemon_bin_};
    v.insert(v.end(), args.begin(), args.end());
    return v;
  }(), 30);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("vol1"), std::string::npos) << r.err;
  EXPECT_NE(::access(api_socket_.c_str(), F_OK), 0);
  EXPECT_NE(::access(nbd_socket_.c_str(), F_OK), 0);
}

// kill -9 of nbdsnapd itself: nbdkit does not outlive it (PR_SET_PDEATHSIG),
// and the next start replaces the sockets left behind and serves the same
// snapshots.
TEST_F(Restart, KillDaemonThenStartAgain) {
  make_sparse_file(volume_path_, 4 * MiB);
  ASSERT_TRUE(start_daemon());
  ASSERT_TRUE(IsOk(create({kVolume}, "s1")));
  ASSERT_TRUE(IsOk(take("s1")));
  pid_t nbdkit = daemon_.nbdkit_pid();
  ASSERT_GT(nbdkit, 0);
  client_.reset();
  daemon_.kill9();
  EXPECT_TRUE(wait_gone(nbdkit, 10)) << "nbdkit outlived a killed nbdsnapd";
  EXPECT_EQ(::access(api_socket_.c_str(), F_OK), 0) << "expected a stale API socket after kill -9";
  ASSERT_TRUE(restart_daemon());
  auto i = info("s1");
  ASSERT_TRUE(IsOk(i));
  EXPECT_EQ(i->snapshot_info().snapshot().state(), api::TAKEN);
  std::string err;
  NbdPtr s = open("vol0@s1", {}, &err);
  EXPECT_TRUE(s) << err;
  s.reset();
  ASSERT_TRUE(IsOk(destroy("s1")));
  EXPECT_TRUE(list_dir(state_dir_ + "/storage").empty());
}

// What the daemon reconciles at start: a create interrupted by a crash
// (registry entry still PENDING) is undone, a managed file nothing names is
// deleted (once old enough), and a snapshot destroyed behind the daemon's
// back (directly on the control link) loses its managed file.
TEST_F(Restart, ReconcileAtStartAndExternalDestroy) {
  make_sparse_file(volume_path_, 4 * MiB);
  ASSERT_TRUE(start_daemon());
  auto a = create({kVolume}, "interrupted");
  ASSERT_TRUE(IsOk(a));
  auto b = create({kVolume}, "external");
  ASSERT_TRUE(IsOk(b));
  const std::string a_file = a->snapshot_create().snapshot().storage_path();
  const std::string b_file = b->snapshot_create().snapshot().storage_path();
  client_.reset();
  ASSERT_TRUE(daemon_.stop());

  // Pretend the daemon died in the middle of creating "interrupted".
  std::string reg = read_text(state_dir_ + "/nbdsnapd.registry");
  auto at = reg.find(a->snapshot_create().snapshot().id());
  ASSERT_NE(at, std::string::npos);
  auto state = reg.find("state: LIVE", at);
  ASSERT_NE(state, std::string::npos);
  reg.replace(state, std::strlen("state: LIVE"), "state: PENDING");
  {
    std::ofstream out(state_dir_ + "/nbdsnapd.registry", std::ios::trunc);
    out << reg;
  }
  // An orphaned storage file (a create that died before its first save).
  std::string orphan = state_dir_ + "/storage/0b6f3a4e-0000-4000-8000-000000000000.diff";
  make_sparse_file(orphan, 4096);
  struct timeval old[2] = {{std::time(nullptr) - 3600, 0}, {std::time(nullptr) - 3600, 0}};
  ASSERT_EQ(::utimes(orphan.c_str(), old), 0);
  std::string recent = state_dir_ + "/storage/0b6f3a4e-0000-4000-8000-000000000001.diff";
  make_sparse_file(recent, 4096);

  ASSERT_TRUE(restart_daemon());
  EXPECT_TRUE(HasError(info("interrupted"), ENOENT)) << "an interrupted create was not undone";
  EXPECT_NE(::access(a_file.c_str(), F_OK), 0) << "storage of an undone create left behind";
  EXPECT_NE(::access(orphan.c_str(), F_OK), 0) << "orphaned storage file not deleted";
  EXPECT_EQ(::access(recent.c_str(), F_OK), 0) << "a recent storage file was deleted";
  ::unlink(recent.c_str());
  auto i = info("external");
  ASSERT_TRUE(IsOk(i));
  EXPECT_EQ(i->snapshot_info().snapshot().storage_path(), b_file);

  // Destroyed on the control link, behind the daemon's back.
  LinkClient link;
  ASSERT_TRUE(IsOk(link.connect(state_dir_ + "/link.sock")));
  link::Request d;
  d.mutable_destroy()->set_id("external");
  ASSERT_TRUE(IsOk(link.call(d)));
  auto deadline = Clock::now() + std::chrono::seconds(5);
  auto registry_has_storage = [&] {
    return read_text(state_dir_ + "/nbdsnapd.registry").find("storage {") != std::string::npos;
  };
  while ((::access(b_file.c_str(), F_OK) == 0 || registry_has_storage()) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_NE(::access(b_file.c_str(), F_OK), 0) << "managed file of an externally destroyed snapshot kept";
  EXPECT_EQ(read_text(state_dir_ + "/nbdsnapd.registry").find("storage {"), std::string::npos)
      << read_text(state_dir_ + "/nbdsnapd.registry");
}

// Volume removal is remembered too.
TEST_F(Restart, RemovedVolumeStaysRemoved) {
  make_sparse_file(volume_path_, 4 * MiB);
  make_sparse_file(path("vol1.img"), 4 * MiB);
  ASSERT_TRUE(start_daemon({"--volume", "vol1=" + path("vol1.img")}));
  api::Request rm;
  rm.mutable_volume_remove()->set_name("vol1");
  ASSERT_TRUE(IsOk(call(rm)));
  client_.reset();
  ASSERT_TRUE(daemon_.stop());
  ASSERT_TRUE(start_daemon({}));
  auto vols = volume_list();
  ASSERT_TRUE(IsOk(vols));
  ASSERT_EQ(vols->volume_list().volumes_size(), 1);
  EXPECT_EQ(vols->volume_list().volumes(0).name(), "vol0");
}

}  // namespace
}  // namespace nbdsnap::dt
