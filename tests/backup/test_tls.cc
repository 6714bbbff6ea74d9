// NBD over TCP on loopback with TLS PSK required (nbdsnapd --nbd-listen
// 127.0.0.1:0 --tls-psk FILE): a client without the key, or with a wrong
// key, is refused; backup, incremental backup and restore into the volume
// work with the key, byte for byte.
#include "backup_fixture.h"

namespace nbdsnap::bt {
namespace {

constexpr uint64_t kSize = 16 * MiB;

class Tls : public BackupTest {};

std::string tcp_uri(const JValue& snapshot_or_volume) {
  for (size_t i = 0; i < snapshot_or_volume["uris"].size(); ++i) {
    std::string u = snapshot_or_volume["uris"][i].str();
    if (u.rfind("nbds://127.0.0.1:", 0) == 0) return u;
  }
  return "";
}

TEST_F(Tls, BackupNeedsTheKey) {
  if (find_program("nbdinfo").empty()) GTEST_SKIP() << "nbdinfo is not installed (libnbd-bin)";
  const std::string psk = path("keys.psk"), wrong = path("wrong.psk");
  {
    std::ofstream(psk) << "alice:3f1c2a9b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8\n";
    std::ofstream(wrong) << "alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
  }
  ASSERT_TRUE(start_volume(kSize, {"--nbd-listen", "127.0.0.1:0", "--tls-psk", psk}));
  std::mt19937_64 rng(5);
  auto write_some = [&] {
    // TLS is required on the Unix socket too: write with the key.
    NbdPtr h(nbd_create());
    ASSERT_NE(nbd_set_tls(h.get(), LIBNBD_TLS_REQUIRE), -1);
    ASSERT_NE(nbd_set_tls_psk_file(h.get(), psk.c_str()), -1);
    ASSERT_NE(nbd_set_tls_username(h.get(), "alice"), -1);
    ASSERT_NE(nbd_set_export_name(h.get(), kVolume), -1);
    ASSERT_NE(nbd_connect_unix(h.get(), nbd_socket_.c_str()), -1) << nbd_get_error();
    for (int i = 0; i < 8; ++i) {
      uint64_t off = rng() % (kSize / (64 * KiB)) * 64 * KiB;
      ASSERT_NO_FATAL_FAILURE(write(h.get(), off, random_bytes(&rng, 64 * KiB)));
    }
    ASSERT_NE(nbd_flush(h.get(), 0), -1);
  };
  ASSERT_NO_FATAL_FAILURE(write_some());
  snapshot("s1");
  auto p1 = model_;
  JValue info = nbdsnap_json({"snapshot", "info", "s1"});
  const std::string uri = tcp_uri(info);
  ASSERT_FALSE(uri.empty()) << "no TCP URI in the snapshot's uris";
  EXPECT_NE(uri.find("/vol0@s1"), std::string::npos) << uri;

  // Without the key, or with a wrong one: refused.
  CommandResult plain = run_command({"nbdinfo", "nbd://" + uri.substr(7)});
  EXPECT_NE(plain.exit_code, 0) << plain.out;
  const std::string dir = path("b");
  CommandResult r = nbdsnap({"backup", "s1", "--to", dir, "--uri", "nbd://" + uri.substr(7)});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("connect to nbd://127.0.0.1:"), std::string::npos) << r.err;
  r = nbdsnap({"backup", "s1", "--to", dir, "--uri", uri, "--tls-psk", wrong});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("connect to nbds://127.0.0.1:"), std::string::npos) << r.err;
  for (const auto& f : list_dir(dir))
    EXPECT_EQ(f, ".nbdsnap-backup.lock") << "a refused backup left files behind";

  // With the key: full, then incremental, over TCP.
  JValue m1 = nbdsnap_json({"backup", "s1", "--to", dir, "--uri", uri, "--tls-psk", psk});
  EXPECT_EQ(m1["kind"].str(), "full");
  EXPECT_EQ(m1["source"].str().rfind("nbds://127.0.0.1:", 0), 0u) << m1["source"].str();
  ASSERT_NO_FATAL_FAILURE(write_some());
  snapshot("s2");
  auto p2 = model_;
  info = nbdsnap_json({"snapshot", "info", "s2"});
  JValue m2 = nbdsnap_json({"backup", "s2", "--to", dir, "--uri", tcp_uri(info), "--tls-psk", psk});
  EXPECT_EQ(m2["kind"].str(), "incremental");
  EXPECT_LE(m2["bytes_read"].u64(), 8 * 64 * KiB);

  r = nbdsnap({"restore", dir, "--backup", "1", "--to", path("r1.img")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(path("r1.img"), p1), "");
  // Into the volume, through its (TLS) export: needs the key as well.
  r = nbdsnap({"restore", dir, "--backup", "1", "--volume", kVolume});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  r = nbdsnap({"restore", dir, "--backup", "1", "--volume", kVolume, "--tls-psk", psk});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = nbdsnap({"restore", dir, "--backup", "2", "--to", path("r2.img")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(compare_file(path("r2.img"), p2), "");
  ASSERT_TRUE(daemon_.stop());
  EXPECT_EQ(compare_file(volume_path_, p1), "") << "the volume after restoring point 1";
}

}  // namespace
}  // namespace nbdsnap::bt
