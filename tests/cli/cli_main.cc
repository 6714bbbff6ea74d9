// main() of the CLI test programs: gtest's, except that a program whose
// tests all skipped (no nbdsnapd, no nbdkit) exits 77, which meson reports
// as SKIP instead of OK.
#include <gtest/gtest.h>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS();
  const auto& u = *::testing::UnitTest::GetInstance();
  if (rc == 0 && u.test_to_run_count() > 0 && u.skipped_test_count() == u.test_to_run_count()) return 77;
  return rc;
}
