// Not a test of the project: the binary that tests/testing/skip_selftest.cmake runs to prove that
// em_test_main fails skipped tests (it is built but not registered with ctest, since some of its
// tests must fail).
#include "gtest/gtest.h"

namespace {

TEST(Probe, Passes) { EXPECT_EQ(2 + 2, 4); }

TEST(Probe, Skips) { GTEST_SKIP() << "probe: golden data not found"; }

// The pattern the review found: a fixture loading shared data in SetUpTestSuite.
class SetUpTestSuiteFails : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { FAIL() << "probe: could not load the suite's data"; }
};
TEST_F(SetUpTestSuiteFails, NeedsTheData) { SUCCEED(); }

class SkipsInSetUp : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_SKIP() << "probe: skipped in SetUp"; }
};
TEST_F(SkipsInSetUp, Body) { SUCCEED(); }

}  // namespace
