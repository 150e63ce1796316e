// The main() of every gtest binary (library em_test_main; em_cc_test links it instead of
// gtest_main). A skipped test is a failed test: gtest counts GTEST_SKIP, and the tests of a suite
// whose SetUpTestSuite failed, as skipped, and ctest (gtest_discover_tests sets
// SKIP_REGULAR_EXPRESSION "[  SKIPPED ]", which wins over the exit status) reports them as
// "Not Run" with a zero exit code: a test that could not load its data left CI green.
//
// Here a listener turns every skip into a failure of that test, before gtest prints its result,
// so the test is reported FAILED (by gtest and by ctest, as no "[  SKIPPED ]" line is printed)
// with the skip's message. The process also fails when a --gtest_filter selects no test (a test
// renamed or deleted while ctest still runs it by its old name would otherwise pass by running
// nothing). Listing (--gtest_list_tests, which gtest_discover_tests runs at test time) is no run
// and never fails.
#include <cstdio>
#include <string>

#include "gtest/gtest.h"

namespace {

class SkipIsFailure : public ::testing::EmptyTestEventListener {
 public:
  // gtest delivers OnTestEnd to listeners in reverse order of registration, so this runs before
  // the default printer, and a failure added here still belongs to the test that just ended.
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (!info.result()->Skipped()) return;
    std::string why;
    for (int i = 0; i < info.result()->total_part_count(); ++i) {
      const ::testing::TestPartResult& part = info.result()->GetTestPartResult(i);
      if (part.skipped() && part.message()[0] != '\0') why = part.message();
    }
    ADD_FAILURE() << info.test_suite_name() << "." << info.name()
                  << " was skipped, and a skipped test is a failed test"
                  << (why.empty() ? std::string(" (its suite's set-up failed, or it was skipped "
                                                "without a message)")
                                  : ": " + why);
  }
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::UnitTest::GetInstance()->listeners().Append(new SkipIsFailure);  // gtest owns it
  int rc = RUN_ALL_TESTS();
  if (GTEST_FLAG_GET(list_tests)) return rc;
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  // Anything skipped outside a test's own result (none known in gtest 1.12) still fails.
  if (unit.skipped_test_count() > 0) {
    std::fprintf(stderr, "[ EM FAILED ] %d test(s) skipped\n", unit.skipped_test_count());
    rc = 1;
  }
  const std::string filter = GTEST_FLAG_GET(filter);
  if (unit.test_to_run_count() == 0 && !filter.empty() && filter != "*") {
    std::fprintf(stderr, "[ EM FAILED ] --gtest_filter=%s selected no test\n", filter.c_str());
    rc = 1;
  }
  return rc;
}
