// Engine: control operations (create, append-storage, take, destroy, exports,
// start checks) and persistence across restarts and crashes (DESIGN 4.7).
#include "engine.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "test_util.h"

namespace nbdsnap {
namespace {

namespace fs = std::filesystem;
using test::Harness;
using test::kChunk;
using test::kKiB;
using test::kMiB;
using test::kVolumeSize;
using test::pattern;

std::vector<std::string> names(const std::vector<SnapshotInfo>& infos) {
  std::vector<std::string> out;
  for (const auto& i : infos) out.push_back(i.name);
  std::sort(out.begin(), out.end());
  return out;
}

// ------------------------------------------------------------ control ops

TEST(Engine, CreateRejectsBadInput) {
  Harness h;
  Engine& e = h.engine();
  EXPECT_ERRNO(e.create_snapshot({}, "s", 0), EINVAL);
  EXPECT_ERRNO(e.create_snapshot({"nope"}, "s", 0), ENOENT);
  EXPECT_ERRNO(e.create_snapshot({"vol", "vol"}, "s", 0), EINVAL);
  EXPECT_ERRNO(e.create_snapshot({"vol"}, "bad name", 0), EINVAL);
  EXPECT_ERRNO(e.create_snapshot({"vol"}, "-dash", 0), EINVAL);
  EXPECT_ERRNO(e.create_snapshot({"vol"}, std::string(129, 'a'), 0), EINVAL);
  EXPECT_ERRNO(e.create_snapshot({"vol"}, Uuid::random().str(), 0), EINVAL);
  ASSERT_OK(e.create_snapshot({"vol"}, "s", 0));
  EXPECT_ERRNO(e.create_snapshot({"vol"}, "s", 0), EEXIST);
  EXPECT_EQ(e.collect().size(), 1u);
}

TEST(Engine, TakeLifecycleFromCreatedToTaken) {
  Harness h;
  Engine& e = h.engine();
  Uuid id = test::must(e.create_snapshot({"vol"}, "s1", 0));
  auto info = test::must(e.info("s1"));
  EXPECT_EQ(info.id, id);
  EXPECT_EQ(info.state, SnapshotState::kCreated);
  EXPECT_TRUE(info.exports.empty());
  EXPECT_EQ(info.volumes, std::vector<std::string>{"vol"});
  EXPECT_ERRNO(e.open_export("vol@s1"), ENOENT) << "not taken: no export";
  EXPECT_ERRNO(e.take("s1"), ENOSPC) << "no difference storage yet";
  EXPECT_ERRNO(e.append_storage("s1", {}), EINVAL);
  ASSERT_OK(e.append_storage("s1", {StorageRange{"", 0, 1 * kMiB}}));
  EXPECT_EQ(test::must(e.info("s1")).storage.capacity, 1 * kMiB);
  uint64_t seq = e.sequence();
  auto taken = test::must(e.take("s1"));
  EXPECT_EQ(taken.sequence, seq);
  EXPECT_EQ(e.sequence(), seq + 1);
  EXPECT_LT(taken.pause_us, 5000000u);
  info = test::must(e.info(id.str()));  // by UUID too
  EXPECT_EQ(info.state, SnapshotState::kTaken);
  EXPECT_EQ(info.sequence, seq);
  EXPECT_EQ(info.exports, std::vector<std::string>{"vol@s1"});
  EXPECT_ERRNO(e.take("s1"), EALREADY);
  EXPECT_OK(e.open_export("vol@s1"));
  EXPECT_OK(e.open_export("vol@" + id.str()));
}

TEST(Engine, UnnamedSnapshotIsExportedByItsUuid) {
  Harness h;
  Uuid id = test::must(h.engine().create_snapshot({"vol"}, "", 0));
  ASSERT_OK(h.engine().append_storage(id.str(), {StorageRange{"", 0, 1 * kMiB}}));
  ASSERT_OK(h.engine().take(id.str()));
  EXPECT_EQ(h.engine().export_names(), (std::vector<std::string>{"vol", "vol@" + id.str()}));
  ASSERT_OK(h.write(0, pattern(100, 1)));
  EXPECT_EQ(h.snap_read(id.str(), 0, 100), std::vector<char>(100, 0));
}

TEST(Engine, ExportsListVolumesThenSnapshotsInTakeOrder) {
  Harness::Options o;
  o.volumes = {{"b", 1 * kMiB}, {"a", 1 * kMiB}};
  Harness h(o);
  ASSERT_OK(h.engine().create_snapshot({"b", "a"}, "later", 0));
  ASSERT_OK(h.engine().append_storage("later", {StorageRange{"", 0, 2 * kMiB}}));
  h.snapshot("first", 1 * kMiB, {"a"});
  ASSERT_OK(h.engine().take("later"));
  EXPECT_EQ(h.engine().export_names(), (std::vector<std::string>{"b", "a", "a@first", "a@later", "b@later"}));
  EXPECT_EQ(test::must(h.engine().info("later")).volumes, (std::vector<std::string>{"a", "b"}));
}

TEST(Engine, OpenExportOfUnknownNamesFailsWithENOENT) {
  Harness h;
  h.snapshot("s1");
  EXPECT_ERRNO(h.engine().open_export("nope"), ENOENT);
  EXPECT_ERRNO(h.engine().open_export("vol@nope"), ENOENT);
  EXPECT_ERRNO(h.engine().open_export("nope@s1"), ENOENT);
  EXPECT_ERRNO(h.engine().open_export("vol@"), ENOENT);
  auto origin = test::must(h.engine().open_export("vol"));
  EXPECT_EQ(origin.part, nullptr);
  EXPECT_EQ(origin.volume->name(), "vol");
}

TEST(Engine, TakeOfSeveralVolumesIsOnePointInTime) {
  Harness::Options o;
  o.volumes = {{"a", kVolumeSize}, {"b", kVolumeSize}};
  Harness h(o);
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 1), "a"));
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 2), "b"));
  uint64_t seq = h.snapshot("both", 16 * kMiB, {"a", "b"});
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 3), "a"));
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 4), "b"));
  EXPECT_EQ(h.snap_read("both", 0, kVolumeSize, "a"), pattern(kVolumeSize, 1));
  EXPECT_EQ(h.snap_read("both", 0, kVolumeSize, "b"), pattern(kVolumeSize, 2));
  auto info = test::must(h.engine().info("both"));
  EXPECT_EQ(info.sequence, seq);
  EXPECT_EQ(info.chunks_copied, 130u);
  EXPECT_EQ(info.exports, (std::vector<std::string>{"a@both", "b@both"}));
}

TEST(Engine, DestroyedSnapshotDisappearsAndItsNameCanBeReused) {
  Harness h;
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  h.snapshot("s1");
  ASSERT_OK(h.engine().create_snapshot({"vol"}, "never-taken", 0));
  EXPECT_EQ(names(h.engine().collect()), (std::vector<std::string>{"never-taken", "s1"}));
  ASSERT_OK(h.engine().destroy("s1"));
  ASSERT_OK(h.engine().destroy("never-taken"));
  EXPECT_TRUE(h.engine().collect().empty());
  EXPECT_EQ(h.engine().export_names(), std::vector<std::string>{"vol"});
  EXPECT_ERRNO(h.engine().info("s1"), ENOENT);
  EXPECT_ERRNO(h.engine().destroy("s1"), ENOENT);
  EXPECT_ERRNO(h.engine().take("s1"), ENOENT);
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  h.snapshot("s1");
  ASSERT_OK(h.write(0, pattern(kChunk, 3)));
  EXPECT_EQ(h.snap_read("s1", 0, kChunk), pattern(kChunk, 2));
}

TEST(Engine, AppendStorageRejectsTheOriginAndOverlappingRanges) {
  Harness::Options o;
  o.storage_factory = nullptr;  // the default: file ranges
  Harness h(o);
  Engine& e = h.engine();
  std::string storage = test::make_file(h.dir().file("storage"), 4 * kMiB);
  ASSERT_OK(e.create_snapshot({"vol"}, "s1", 0));
  ASSERT_OK(e.create_snapshot({"vol"}, "s2", 0));
  Status st = e.append_storage("s1", {StorageRange{h.volume_path(), 0, 1 * kMiB}});
  EXPECT_EQ(st.code(), EINVAL);
  EXPECT_CONTAINS(st.message(), "origin");
  EXPECT_ERRNO(e.append_storage("s1", {StorageRange{storage, 0, 1 * kMiB}, StorageRange{storage, 512 * kKiB, 1 * kMiB}}),
               EBUSY);
  ASSERT_OK(e.append_storage("s1", {StorageRange{storage, 0, 1 * kMiB}}));
  EXPECT_ERRNO(e.append_storage("s1", {StorageRange{storage, 0, 4 * kKiB}}), EBUSY);
  st = e.append_storage("s2", {StorageRange{storage, 1 * kMiB - 4 * kKiB, 1 * kMiB}});
  EXPECT_EQ(st.code(), EBUSY);
  EXPECT_CONTAINS(st.message(), "s1");
  EXPECT_OK(e.append_storage("s2", {StorageRange{storage, 1 * kMiB, 1 * kMiB}}));
  EXPECT_ERRNO(e.append_storage("s2", {StorageRange{h.dir().file("missing"), 0, 4 * kKiB}}), ENOENT);
  EXPECT_ERRNO(e.append_storage("s2", {StorageRange{storage, 3 * kMiB, 2 * kMiB}}), EINVAL);
  EXPECT_ERRNO(e.append_storage("nope", {StorageRange{storage, 3 * kMiB, 4 * kKiB}}), ENOENT);
  // File storage works end to end.
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  ASSERT_OK(e.take("s1"));
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  EXPECT_EQ(h.snap_read("s1", 0, kChunk), pattern(kChunk, 1));
  EXPECT_EQ(test::read_raw(storage, 0, kChunk), pattern(kChunk, 1)) << "the first slot is at the range start";
}

TEST(Engine, StartRejectsBadVolumeConfigurations) {
  test::TempDir dir;
  std::string a = test::make_file(dir.file("a.img"), 1 * kMiB);
  std::string empty = test::make_file(dir.file("empty.img"), 0);
  auto start = [&](std::vector<std::pair<std::string, std::string>> vols) {
    EngineOptions o;
    o.params = test::small_params();
    o.volumes = std::move(vols);
    Engine e(o);
    return e.start();
  };
  EXPECT_OK(start({}));  // a control plane adds volumes later
  EXPECT_ERRNO(start({{"a", a}, {"b", a}}), EINVAL);  // the same file twice
  EXPECT_ERRNO(start({{"a", a}, {"a", dir.file("a.img")}}), EINVAL);
  EXPECT_ERRNO(start({{"bad/name", a}}), EINVAL);
  EXPECT_ERRNO(start({{"a", dir.file("missing.img")}}), ENOENT);
  EXPECT_ERRNO(start({{"a", empty}}), EINVAL);
  EXPECT_OK(start({{"a", a}}));
}

TEST(Engine, DestroyedSnapshotReadByAnOlderOneIsRetainedUntilTheOlderGoes) {
  Harness h;
  Engine& e = h.engine();
  for (const char* name : {"old", "new"}) {
    test::must(e.create_snapshot({"vol"}, name, 0));
    ASSERT_OK(e.append_storage(name, {StorageRange{"", 0, 4 * kChunk}}));
    test::must(e.take(name));
  }
  auto retained = [&] {
    std::vector<std::string> out;
    for (const auto& i : e.collect(true))
      if (i.retained) out.push_back(i.name);
    return out;
  };
  ASSERT_OK(e.destroy("new"));
  EXPECT_EQ(retained(), std::vector<std::string>{"new"});
  EXPECT_EQ(e.collect().size(), 1u) << "only live snapshots without include_retained";
  ASSERT_OK(e.destroy("old"));
  EXPECT_TRUE(e.collect(true).empty()) << "nothing reads through 'new' any more";
}

Harness::Options persistent();  // below, with the persistence tests

TEST(Engine, AppendStorageIsAllOrNothing) {
  Harness h(persistent());
  Engine& e = h.engine();
  std::string file = test::make_file(h.dir().file("diff.img"), 1 * kMiB);
  test::must(e.create_snapshot({"vol"}, "s1", 0));
  // The second range is beyond the end of the file: nothing is appended.
  EXPECT_ERRNO(e.append_storage("s1", {StorageRange{file, 0, 64 * kKiB}, StorageRange{file, 2 * kMiB, 64 * kKiB}}),
               EINVAL);
  EXPECT_EQ(test::must(e.info("s1")).storage.capacity, 0u);
  EXPECT_ERRNO(e.append_storage("s1", {StorageRange{file, 0, 64 * kKiB}, StorageRange{file, 512 * kKiB + 100, 4096}}), EINVAL);
  EXPECT_EQ(test::must(e.info("s1")).storage.capacity, 0u);
  ASSERT_OK(e.append_storage("s1", {StorageRange{file, 0, 64 * kKiB}, StorageRange{file, 128 * kKiB, 64 * kKiB}}));
  EXPECT_EQ(test::must(e.info("s1")).storage.capacity, 128 * kKiB);
}

TEST(Engine, VolumesCanBeAddedAndRemovedWhileServing) {
  Harness h;
  Engine& e = h.engine();
  std::string b = test::make_file(h.dir().file("b.img"), 1 * kMiB);
  ASSERT_OK(e.add_volume("b", b));
  auto names = e.export_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "b"), names.end());
  auto ref = test::must(e.open_export("b"));
  ASSERT_OK(ref.volume->write(pattern(4 * kKiB, 7).data(), 4 * kKiB, 0, false));
  EXPECT_EQ(test::read_raw(b, 0, 4 * kKiB), pattern(4 * kKiB, 7));

  EXPECT_ERRNO(e.add_volume("b", b), EEXIST);
  EXPECT_ERRNO(e.add_volume("c", b), EINVAL);  // the same file as volume b
  EXPECT_ERRNO(e.add_volume("c", h.volume_path()), EINVAL);
  EXPECT_ERRNO(e.add_volume("c", "relative.img"), EINVAL);
  EXPECT_ERRNO(e.add_volume("c", h.dir().file("missing.img")), ENOENT);
  EXPECT_ERRNO(e.add_volume("bad@name", b), EINVAL);

  // A snapshot on b keeps it; once destroyed, b can go.
  test::must(e.create_snapshot({"b"}, "sb", 0));
  EXPECT_ERRNO(e.remove_volume("b"), EBUSY);
  ASSERT_OK(e.destroy("sb"));
  ASSERT_OK(e.remove_volume("b"));
  EXPECT_ERRNO(e.open_export("b").status(), ENOENT);
  std::vector<char> buf(4 * kKiB);
  EXPECT_ERRNO(ref.volume->read(buf.data(), buf.size(), 0), EIO) << "open connections fail after removal";
  EXPECT_ERRNO(ref.volume->write(buf.data(), buf.size(), 0, false), EIO);
  EXPECT_ERRNO(e.remove_volume("b"), ENOENT);
}

// ------------------------------------------------------------ persistence

Harness::Options persistent() {
  Harness::Options o;
  o.persistent = true;
  o.storage_factory = nullptr;  // default file storage
  return o;
}

void snapshot_in_file(Harness& h, const std::string& name, const std::string& file, uint64_t offset,
                      uint64_t length) {
  test::must(h.engine().create_snapshot({"vol"}, name, 0));
  test::must(h.engine().append_storage(name, {StorageRange{file, offset, length}}));
  test::must(h.engine().take(name));
}

bool log_mentions(const std::vector<std::string>& log, const std::string& what) {
  for (const auto& m : log)
    if (m.find(what) != std::string::npos) return true;
  return false;
}

TEST(EnginePersistence, SnapshotsDataAndCbtSurviveACleanRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 16 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  ASSERT_OK(h.write(0, d0));
  snapshot_in_file(h, "s1", storage, 0, 8 * kMiB);
  ASSERT_OK(h.write(3 * kChunk - 10, pattern(3 * kChunk, 2)));
  ASSERT_OK(h.write(kVolumeSize - 100, pattern(100, 3)));
  auto d1 = h.read(0, kVolumeSize);
  snapshot_in_file(h, "s2", storage, 8 * kMiB, 8 * kMiB);
  ASSERT_OK(h.write(3 * kChunk, pattern(kChunk, 4)));
  auto d2 = h.read(0, kVolumeSize);

  auto i1 = test::must(h.engine().info("s1"));
  auto i2 = test::must(h.engine().info("s2"));
  auto cbt = test::must(h.engine().cbt_info("vol"));
  auto changes = test::must(h.engine().cbt_changes("vol", cbt.generation.str(), i1.sequence, "s2")).ranges;
  auto frozen = test::must(h.engine().cbt_map("vol", "s1", 0, 2000));
  uint64_t seq = h.engine().sequence();
  ASSERT_FALSE(changes.empty());

  ASSERT_OK(h.engine().stop());
  h.log().clear();
  h.restart_engine();
  EXPECT_FALSE(log_mentions(h.log(), "new CBT generation")) << "a clean restart keeps the history";

  Engine& e = h.engine();
  EXPECT_EQ(e.sequence(), seq);
  EXPECT_EQ(names(e.collect()), (std::vector<std::string>{"s1", "s2"}));
  for (const auto& before : {i1, i2}) {
    auto after = test::must(e.info(before.name));
    EXPECT_EQ(after.id, before.id);
    EXPECT_EQ(after.state, SnapshotState::kTaken);
    EXPECT_EQ(after.sequence, before.sequence);
    EXPECT_EQ(after.chunks_copied, before.chunks_copied);
    EXPECT_EQ(after.storage.used, before.storage.used);
    EXPECT_EQ(after.exports, before.exports);
  }
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  EXPECT_EQ(h.snap_read("s2", 0, kVolumeSize), d1);
  EXPECT_EQ(h.read(0, kVolumeSize), d2);
  auto cbt2 = test::must(e.cbt_info("vol"));
  EXPECT_EQ(cbt2.generation, cbt.generation);
  EXPECT_EQ(test::must(e.cbt_changes("vol", cbt.generation.str(), i1.sequence, "s2")).ranges.size(), changes.size());
  EXPECT_EQ(test::must(e.cbt_map("vol", "s1", 0, 2000)), frozen);

  // New copies after the restart must not reuse slots still in use.
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 5)));
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  EXPECT_EQ(h.snap_read("s2", 0, kVolumeSize), d1);
}

// Parent side of a test child that reports "GENERATION SEQUENCE\n" on a
// pipe and then kills itself with SIGKILL: reads the report, reaps the child
// and checks that it died of the signal.
void reap_killed_child(pid_t pid, int pipe_read, std::string* gen, uint64_t* seq) {
  char buf[200] = {};
  ssize_t n = ::read(pipe_read, buf, sizeof buf - 1);
  ::close(pipe_read);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  ASSERT_GT(n, 0) << "the child sent no report";
  std::istringstream in(buf);
  in >> *gen >> *seq;
}

TEST(EnginePersistence, EverythingSurvivesKillMinus9OfTheProcess) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 8 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  auto d1 = pattern(5 * kChunk + 1, 2);
  auto d2 = pattern(kChunk, 3);
  h.drop_engine();

  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  EngineOptions eo = h.engine_options();
  eo.log = nullptr;
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: no gtest assertions here; any failure exits with a code.
    ::close(pipefd[0]);
    Engine e(eo);
    auto v = [&]() -> Volume& { return *e.volume("vol"); };
    if (!e.start()) ::_exit(10);
    if (!v().write(d0.data(), d0.size(), 0, false)) ::_exit(11);
    if (!e.create_snapshot({"vol"}, "s1", 0)) ::_exit(12);
    if (!e.append_storage("s1", {StorageRange{storage, 0, 8 * kMiB}})) ::_exit(13);
    auto t = e.take("s1");
    if (!t) ::_exit(14);
    if (!v().write(d1.data(), d1.size(), 7, false)) ::_exit(15);
    if (!e.create_snapshot({"vol"}, "s2", 0)) ::_exit(16);  // created, never taken
    if (!v().write(d2.data(), d2.size(), 40 * kChunk, false)) ::_exit(17);
    std::string msg = e.cbt_info("vol")->generation.str() + " " + std::to_string(t->sequence) + "\n";
    if (::write(pipefd[1], msg.data(), msg.size()) != static_cast<ssize_t>(msg.size())) ::_exit(18);
    ::kill(::getpid(), SIGKILL);
    ::_exit(19);
  }
  ::close(pipefd[1]);
  std::string gen;
  uint64_t seq = 0;
  ASSERT_NO_FATAL_FAILURE(reap_killed_child(pid, pipefd[0], &gen, &seq));
  EXPECT_TRUE(fs::exists(h.dir().file("state/in-use"))) << "the crash left the in-use marker";

  h.log().clear();
  h.restart_engine();
  EXPECT_TRUE(log_mentions(h.log(), "process crash")) << "the restart notices the crash";
  Engine& e = h.engine();
  auto info = test::must(e.info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kTaken);
  EXPECT_EQ(info.sequence, seq);
  EXPECT_EQ(test::must(e.info("s2")).state, SnapshotState::kCreated);
  EXPECT_EQ(e.sequence(), seq + 1);
  auto now = d0;
  std::copy(d1.begin(), d1.end(), now.begin() + 7);
  std::copy(d2.begin(), d2.end(), now.begin() + 40 * kChunk);
  EXPECT_EQ(h.read(0, kVolumeSize), now) << "no acknowledged origin write is lost";
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  EXPECT_EQ(info.chunks_copied, 7u);
  EXPECT_EQ(test::must(e.cbt_info("vol")).generation.str(), gen) << "a crash on the same boot keeps the CBT history";
  auto changes = test::must(e.cbt_changes("vol", gen, seq, "")).ranges;
  ASSERT_EQ(changes.size(), 2u);
  EXPECT_EQ(changes[0].offset, 0u);
  EXPECT_EQ(changes[0].length, 5 * kChunk + 4 * kKiB);  // bytes 7 .. 5*64K+7: blocks 0..80
  EXPECT_EQ(changes[1].offset, 40 * kChunk);
  EXPECT_EQ(changes[1].length, kChunk);
  // The snapshot keeps working.
  ASSERT_OK(h.write(60 * kChunk, pattern(kChunk, 9)));
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
}

// kill -9 inside a take, after the registry records it and before the gates
// close: writes in between went on under the older snapshot (their copies
// staged, not stored). The restart must show the new snapshot taken as of
// the crash, and the older one intact.
TEST(EnginePersistence, KillMinus9BetweenRecordingATakeAndItsPauseLeavesItTakenAtTheCrash) {
  Harness h(persistent());
  std::string storage1 = test::make_file(h.dir().file("storage1"), 8 * kMiB);
  std::string storage2 = test::make_file(h.dir().file("storage2"), 8 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  auto d1 = pattern(2 * kChunk, 2);  // chunks 10-11, before the take of s2
  auto d2 = pattern(3 * kChunk, 3);  // chunks 11-13, at "take: recorded"
  h.drop_engine();

  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  EngineOptions eo = h.engine_options();
  eo.log = nullptr;
  Engine* engine = nullptr;
  std::string msg;
  eo.test_point = [&](const char* point) {
    if (std::string(point) != "take: recorded" || !engine) return;
    // The gates are still open: a write goes through and copies for s1,
    // staged only (stores held): the restart must store them for s1.
    auto v = engine->volume("vol");
    v->hold_stores_for_test(true);
    if (!v->write(d2.data(), d2.size(), 11 * kChunk, false)) ::_exit(20);
    if (::write(pipefd[1], msg.data(), msg.size()) != static_cast<ssize_t>(msg.size())) ::_exit(21);
    ::kill(::getpid(), SIGKILL);
  };
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    Engine e(eo);
    if (!e.start()) ::_exit(10);
    auto v = e.volume("vol");
    if (!v->write(d0.data(), d0.size(), 0, false)) ::_exit(11);
    if (!e.create_snapshot({"vol"}, "s1", 0)) ::_exit(12);
    if (!e.append_storage("s1", {StorageRange{storage1, 0, 8 * kMiB}})) ::_exit(13);
    auto t = e.take("s1");
    if (!t) ::_exit(14);
    if (!v->write(d1.data(), d1.size(), 10 * kChunk, false)) ::_exit(15);
    if (!e.create_snapshot({"vol"}, "s2", 0)) ::_exit(16);
    if (!e.append_storage("s2", {StorageRange{storage2, 0, 8 * kMiB}})) ::_exit(17);
    msg = e.cbt_info("vol")->generation.str() + " " + std::to_string(t->sequence) + "\n";
    engine = &e;
    (void)e.take("s2");  // the test point kills the process
    ::_exit(18);
  }
  ::close(pipefd[1]);
  std::string gen;
  uint64_t seq1 = 0;  // the child reports only from the test point
  ASSERT_NO_FATAL_FAILURE(reap_killed_child(pid, pipefd[0], &gen, &seq1));

  h.log().clear();
  h.restart_engine();
  EXPECT_TRUE(log_mentions(h.log(), "staged before the crash"));
  Engine& e = h.engine();
  auto now = d0;
  std::copy(d1.begin(), d1.end(), now.begin() + 10 * kChunk);
  std::copy(d2.begin(), d2.end(), now.begin() + 11 * kChunk);
  EXPECT_EQ(h.read(0, kVolumeSize), now) << "no acknowledged origin write is lost";
  auto i1 = test::must(e.info("s1"));
  auto i2 = test::must(e.info("s2"));
  EXPECT_EQ(i1.state, SnapshotState::kTaken);
  EXPECT_EQ(i2.state, SnapshotState::kTaken) << "recorded before the pause: taken";
  EXPECT_EQ(i2.sequence, seq1 + 1);
  EXPECT_EQ(e.sequence(), seq1 + 2);
  EXPECT_EQ(i1.chunks_copied, 4u) << "chunks 10-13, all copied for s1";
  EXPECT_EQ(i2.chunks_copied, 0u);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  EXPECT_EQ(h.snap_read("s2", 0, kVolumeSize), now) << "s2 shows the volume as of the crash";
  // Both CBT views: s1 saw nothing change, s2 sees every write before it.
  auto since1 = test::must(e.cbt_changes("vol", gen, seq1, "s2")).ranges;
  ASSERT_EQ(since1.size(), 1u);
  EXPECT_EQ(since1[0].offset, 10 * kChunk);
  EXPECT_EQ(since1[0].length, 4 * kChunk);
  EXPECT_TRUE(test::must(e.cbt_changes("vol", gen, seq1 + 1, "")).ranges.empty());
  // The chain keeps working: a write now copies for s2 and s1 reads through.
  auto d3 = pattern(kVolumeSize, 4);
  ASSERT_OK(h.write(0, d3));
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  EXPECT_EQ(h.snap_read("s2", 0, kVolumeSize), now);
  auto since2 = test::must(e.cbt_changes("vol", gen, seq1 + 1, "")).ranges;
  ASSERT_EQ(since2.size(), 1u);
  EXPECT_EQ(since2[0].length, kVolumeSize);
}

// kill -9 with copies staged but not stored (stores held): their origin
// writes are done, so the old data exists only in the staging file. Returns
// the child's wait status.
int crash_with_staged_copies(Harness& h, const std::string& storage, const std::vector<char>& d0,
                             const std::vector<char>& d1, uint64_t at) {
  h.drop_engine();
  EngineOptions eo = h.engine_options();
  eo.log = nullptr;
  pid_t pid = ::fork();
  if (pid == 0) {
    Engine e(eo);
    if (!e.start()) ::_exit(10);
    auto v = e.volume("vol");
    if (!v->write(d0.data(), d0.size(), 0, false)) ::_exit(11);
    if (!e.create_snapshot({"vol"}, "s1", 0)) ::_exit(12);
    if (!e.append_storage("s1", {StorageRange{storage, 0, 8 * kMiB}})) ::_exit(13);
    if (!e.take("s1")) ::_exit(14);
    if (!v->write(d0.data(), kChunk, 20 * kChunk, false)) ::_exit(15);  // one copy stored
    v->drain_stores();
    v->hold_stores_for_test(true);
    if (!v->write(d1.data(), d1.size(), at, false)) ::_exit(16);  // staged only
    ::kill(::getpid(), SIGKILL);
    ::_exit(17);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

TEST(EnginePersistence, CopiesStagedAtACrashAreStoredAtRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 8 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  auto d1 = pattern(5 * kChunk - 100, 2);  // chunks 3-7
  std::string staging = h.engine().staging_path("vol");
  int status = crash_with_staged_copies(h, storage, d0, d1, 3 * kChunk + 50);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  h.log().clear();
  h.restart_engine();
  EXPECT_TRUE(log_mentions(h.log(), "staged before the crash"));
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kTaken);
  EXPECT_EQ(info.chunks_copied, 6u);
  auto now = d0;
  std::copy(d1.begin(), d1.end(), now.begin() + 3 * kChunk + 50);
  std::copy(d0.begin(), d0.begin() + kChunk, now.begin() + 20 * kChunk);
  EXPECT_EQ(h.read(0, kVolumeSize), now) << "no acknowledged origin write is lost";
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0) << "the staged copies were stored";
  // Later copies do not reuse the restored slots; a clean restart keeps all.
  ASSERT_OK(h.write(30 * kChunk, pattern(3 * kChunk, 3)));
  h.restart_engine();
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  EXPECT_EQ(test::must(h.engine().info("s1")).chunks_copied, 9u);
  h.drop_engine();
  EXPECT_FALSE(fs::exists(staging)) << "a clean stop removes the staging file";
}

TEST(EnginePersistence, LostStagingFileCorruptsTheSnapshotAtRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 8 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  auto d1 = pattern(kChunk, 2);
  std::string staging = h.engine().staging_path("vol");
  ASSERT_FALSE(staging.empty());
  int status = crash_with_staged_copies(h, storage, d0, d1, 9 * kChunk);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  ASSERT_TRUE(fs::exists(staging)) << "the crash left the staging file";
  ASSERT_EQ(::truncate(staging.c_str(), 0), 0);
  h.log().clear();
  h.restart_engine();
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted) << "never silently wrong";
  EXPECT_CONTAINS(info.error.message(), "restore staged copy of chunk 9");
  EXPECT_TRUE(log_mentions(h.log(), "corrupted at restart"));
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 100, &out), EIO);
}

TEST(EnginePersistence, DamagedRegistryMakesStartFailNamingTheFile) {
  Harness h(persistent());
  ASSERT_OK(h.engine().create_snapshot({"vol"}, "s1", 0));
  h.drop_engine();
  std::string reg = h.dir().file("state/registry");
  auto size = fs::file_size(reg);
  ASSERT_GT(size, 24u);
  auto b = test::read_raw(reg, size - 3, 1);  // in the payload: the CRC no longer matches
  b[0] ^= 0x10;
  test::write_raw(reg, size - 3, b.data(), 1);
  {
    Engine e(h.engine_options());
    Status st = e.start();
    EXPECT_EQ(st.code(), EBADMSG);
    EXPECT_CONTAINS(st.message(), reg);
  }
  b[0] ^= 0x10;  // repaired: starts again
  test::write_raw(reg, size - 3, b.data(), 1);
  {
    Engine e(h.engine_options());
    ASSERT_OK(e.start());
    EXPECT_EQ(names(e.collect()), std::vector<std::string>{"s1"});
  }
  test::write_raw(reg, 0, "XXXX", 4);  // not a registry at all
  Engine e(h.engine_options());
  Status st = e.start();
  EXPECT_EQ(st.code(), EBADMSG);
  EXPECT_CONTAINS(st.message(), reg);
}

TEST(EnginePersistence, MissingCbtMapGivesANewGeneration) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 8 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  snapshot_in_file(h, "s1", storage, 0, 8 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  std::string old_gen = test::must(h.engine().cbt_info("vol")).generation.str();
  h.drop_engine();
  ASSERT_TRUE(fs::remove(h.dir().file("state/cbt/vol.map")));
  h.log().clear();
  h.restart_engine();
  std::string gen = test::must(h.engine().cbt_info("vol")).generation.str();
  EXPECT_NE(gen, old_gen);
  EXPECT_TRUE(log_mentions(h.log(), "new CBT generation " + gen));
  EXPECT_ERRNO(h.engine().cbt_changes("vol", old_gen, 0, ""), ESTALE);
  // The snapshot data does not depend on the CBT map.
  EXPECT_EQ(h.snap_read("s1", 0, kChunk), pattern(kChunk, 1));
}

TEST(EnginePersistence, MissingRegistryForgetsSnapshotsAndResetsTheCbtHistory) {
  Harness h(persistent());
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  ASSERT_OK(h.engine().create_snapshot({"vol"}, "s1", 0));
  std::string old_gen = test::must(h.engine().cbt_info("vol")).generation.str();
  h.drop_engine();
  ASSERT_TRUE(fs::remove(h.dir().file("state/registry")));
  h.log().clear();
  h.restart_engine();
  EXPECT_TRUE(h.engine().collect().empty());
  EXPECT_NE(test::must(h.engine().cbt_info("vol")).generation.str(), old_gen);
  EXPECT_TRUE(log_mentions(h.log(), "registry missing"));
}

TEST(EnginePersistence, DestroyedNewerSnapshotStillServesTheOlderOneAfterRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 16 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  ASSERT_OK(h.write(0, d0));
  snapshot_in_file(h, "a", storage, 0, 8 * kMiB);
  snapshot_in_file(h, "b", storage, 8 * kMiB, 8 * kMiB);
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 2)));  // every chunk copied into b only
  ASSERT_OK(h.engine().destroy("b"));
  EXPECT_EQ(h.snap_read("a", 0, kVolumeSize), d0);
  h.restart_engine();
  EXPECT_EQ(names(h.engine().collect()), std::vector<std::string>{"a"});
  EXPECT_EQ(h.engine().export_names(), (std::vector<std::string>{"vol", "vol@a"}));
  EXPECT_EQ(h.snap_read("a", 0, kVolumeSize), d0) << "a reads its chunks through destroyed b's table";
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 3)));
  EXPECT_EQ(h.snap_read("a", 0, kVolumeSize), d0);
  // Destroying the last one removes its state.
  ASSERT_OK(h.engine().destroy("a"));
  h.restart_engine();
  EXPECT_TRUE(h.engine().collect().empty());
  EXPECT_TRUE(fs::is_empty(h.dir().file("state/snapshots")));
}

TEST(EnginePersistence, CorruptedSnapshotStaysCorruptedAfterRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 1 * kMiB);
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 1)));
  snapshot_in_file(h, "s1", storage, 0, kChunk);  // room for one chunk
  ASSERT_OK(h.write(0, pattern(2 * kChunk, 2)));
  EXPECT_EQ(test::must(h.engine().info("s1")).state, SnapshotState::kCorrupted);
  h.restart_engine();
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted);
  EXPECT_EQ(info.error.code(), ENOSPC);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 100, &out), EIO);
  EXPECT_EQ(h.read(0, 2 * kChunk), pattern(2 * kChunk, 2));
}

TEST(EnginePersistence, UncleanShutdownAcrossARebootCorruptsSnapshotsExplicitly) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 8 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  snapshot_in_file(h, "s1", storage, 0, 8 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  h.drop_engine();
  // As if the machine rebooted while the state was in use.
  std::ofstream(h.dir().file("state/in-use")) << "11111111-2222-3333-4444-555555555555\n";
  h.log().clear();
  h.restart_engine();
  EXPECT_TRUE(log_mentions(h.log(), "reboot"));
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted) << "never silently wrong";
  EXPECT_EQ(info.error.code(), EIO);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 100, &out), EIO);
}

TEST(EnginePersistence, StorageAppendedAfterTheTakeSurvivesARestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 4 * kMiB);
  auto d0 = pattern(kVolumeSize, 1);
  ASSERT_OK(h.write(0, d0));
  snapshot_in_file(h, "s1", storage, 0, 4 * kChunk);
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{storage, 1 * kMiB, 2 * kMiB}}));
  ASSERT_OK(h.write(0, pattern(20 * kChunk, 2)));  // spills into the second range
  EXPECT_EQ(test::must(h.engine().info("s1")).storage.capacity, 4 * kChunk + 2 * kMiB);
  h.restart_engine();
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kTaken);
  EXPECT_EQ(info.storage.capacity, 4 * kChunk + 2 * kMiB);
  EXPECT_EQ(info.chunks_copied, 20u);
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  ASSERT_OK(h.write(20 * kChunk, pattern(10 * kChunk, 3)));
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
}

// FIEMAP: does any extent of [offset, offset + length) still await its first
// write (preallocated, unwritten)? nullopt if the file system cannot tell.
std::optional<bool> has_unwritten_extents(const std::string& path, uint64_t offset, uint64_t length) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  constexpr unsigned kMax = 256;
  std::vector<char> mem(sizeof(fiemap) + kMax * sizeof(fiemap_extent));
  auto* fm = reinterpret_cast<fiemap*>(mem.data());
  fm->fm_start = offset;
  fm->fm_length = length;
  fm->fm_flags = FIEMAP_FLAG_SYNC;
  fm->fm_extent_count = kMax;
  int r = ::ioctl(fd, FS_IOC_FIEMAP, fm);
  ::close(fd);
  if (r != 0) return std::nullopt;
  for (unsigned i = 0; i < fm->fm_mapped_extents; ++i)
    if (fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_UNWRITTEN) return true;
  return false;
}

TEST(EnginePersistence, ZeroFillWritesZerosOverFreshRangesNeverOverSlotsAtRestart) {
  Harness::Options o = persistent();
  o.params.diff_storage_zero_fill = 1;
  Harness h(o);
  std::string storage = test::make_file(h.dir().file("storage"), 4 * kMiB);
  auto junk = pattern(4 * kMiB, 9);
  test::write_raw(storage, 0, junk.data(), junk.size());
  auto d0 = pattern(kVolumeSize, 1);
  ASSERT_OK(h.write(0, d0));

  ASSERT_OK(h.engine().create_snapshot({"vol"}, "s1", 0));
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{storage, 0, 1 * kMiB}}));
  EXPECT_EQ(test::read_raw(storage, 0, 1 * kMiB), std::vector<char>(1 * kMiB, 0)) << "the range is zeros";
  EXPECT_EQ(test::read_raw(storage, 1 * kMiB, 3 * kMiB), std::vector<char>(junk.begin() + 1 * kMiB, junk.end()))
      << "nothing past the range is touched";
  // Zeros over preallocated blocks too: none left unwritten.
  ASSERT_EQ(::truncate(storage.c_str(), 8 * kMiB), 0);
  int fd = ::open(storage.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  bool preallocated = ::fallocate(fd, 0, 4 * kMiB, 2 * kMiB) == 0;
  ::close(fd);
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{storage, 4 * kMiB, 2 * kMiB}}));
  EXPECT_EQ(test::read_raw(storage, 4 * kMiB, 2 * kMiB), std::vector<char>(2 * kMiB, 0));
  if (auto u = has_unwritten_extents(storage, 4 * kMiB, 2 * kMiB); u && preallocated) {
    EXPECT_FALSE(*u) << "zero-filled blocks are written, not left preallocated";
  }
  ASSERT_OK(h.engine().take("s1"));
  ASSERT_OK(h.write(0, pattern(8 * kChunk, 2)));  // copies into the first range
  ASSERT_EQ(test::must(h.engine().info("s1")).chunks_copied, 8u);

  // A restart re-appends both ranges from the registry: no zeros over the
  // slots, the snapshot reads what it held.
  h.restart_engine();
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
  // Beyond the end of the file: refused, the file is not extended.
  Status st = h.engine().append_storage("s1", {StorageRange{storage, 7 * kMiB, 2 * kMiB}});
  EXPECT_EQ(st.code(), EINVAL);
  EXPECT_CONTAINS(st.message(), storage);
  EXPECT_CONTAINS(st.message(), "beyond the end");
  EXPECT_EQ(std::filesystem::file_size(storage), 8 * kMiB);
  // A range appended after the restart is zero-filled; copies that spill
  // into it and the older ones read back.
  ASSERT_OK(h.engine().append_storage("s1", {StorageRange{storage, 1 * kMiB, 3 * kMiB}}));
  ASSERT_OK(h.write(0, pattern(kVolumeSize, 3)));
  EXPECT_EQ(h.snap_read("s1", 0, kVolumeSize), d0);
}

TEST(EnginePersistence, MissingDifferenceStorageCorruptsTheSnapshotAtRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 4 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  snapshot_in_file(h, "s1", storage, 0, 4 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  h.drop_engine();
  ASSERT_TRUE(fs::remove(storage));
  h.log().clear();
  h.restart_engine();
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted);
  EXPECT_CONTAINS(info.error.message(), storage);
  EXPECT_TRUE(log_mentions(h.log(), "corrupted at restart"));
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 100, &out), EIO);
  ASSERT_OK(h.write(0, pattern(kChunk, 3))) << "the origin keeps working";
}

TEST(EnginePersistence, DamagedSnapshotLogCorruptsTheSnapshotAtRestart) {
  Harness h(persistent());
  std::string storage = test::make_file(h.dir().file("storage"), 4 * kMiB);
  ASSERT_OK(h.write(0, pattern(kChunk, 1)));
  snapshot_in_file(h, "s1", storage, 0, 4 * kMiB);
  Uuid id = test::must(h.engine().info("s1")).id;
  ASSERT_OK(h.write(0, pattern(kChunk, 2)));
  h.drop_engine();
  std::string log = h.dir().file("state/snapshots/" + id.str() + "/vol.log");
  ASSERT_TRUE(fs::exists(log));
  ASSERT_GT(fs::file_size(log), 64u);
  auto b = test::read_raw(log, 64 + 4, 1);  // the first record's key
  b[0] ^= 1;
  test::write_raw(log, 64 + 4, b.data(), 1);
  h.restart_engine();
  auto info = test::must(h.engine().info("s1"));
  EXPECT_EQ(info.state, SnapshotState::kCorrupted) << "never silently wrong";
  EXPECT_EQ(info.error.code(), EBADMSG);
  std::vector<char> out;
  EXPECT_ERRNO(h.read_snapshot("s1", 0, 100, &out), EIO);
}

TEST(EnginePersistence, StateDirectoryInUseIsEBUSY) {
  Harness h(persistent());
  Engine second(h.engine_options());
  Status st = second.start();
  EXPECT_EQ(st.code(), EBUSY);
  EXPECT_CONTAINS(st.message(), h.dir().file("state"));
}

TEST(EnginePersistence, CleanStopRemovesTheInUseMarker) {
  Harness h(persistent());
  EXPECT_TRUE(fs::exists(h.dir().file("state/in-use")));
  ASSERT_OK(h.engine().stop());
  EXPECT_FALSE(fs::exists(h.dir().file("state/in-use")));
  EXPECT_TRUE(fs::exists(h.dir().file("state/registry")));
  EXPECT_TRUE(fs::exists(h.dir().file("state/cbt/vol.map")));
}

}  // namespace
}  // namespace nbdsnap
