#include "core/base/clock.h"

#include <thread>

#include "gtest/gtest.h"

namespace expertmesh::base {
namespace {

TEST(ClockTest, FakeClockMovesOnlyWhenAdvanced) {
  FakeClock clock(absl::FromUnixSeconds(100));
  const Clock& as_clock = clock;
  EXPECT_EQ(as_clock.Now(), absl::FromUnixSeconds(100));
  EXPECT_EQ(as_clock.Now(), absl::FromUnixSeconds(100));
  clock.Advance(absl::Milliseconds(1500));
  EXPECT_EQ(as_clock.Now(), absl::FromUnixMillis(101500));
}

TEST(ClockTest, FakeClockIsSafeToAdvanceWhileAnotherThreadReads) {
  FakeClock clock;
  const absl::Time start = clock.Now();
  std::thread reader([&] {
    absl::Time last = start;
    for (int i = 0; i < 1000; ++i) {
      const absl::Time now = clock.Now();
      ASSERT_GE(now, last);
      last = now;
    }
  });
  for (int i = 0; i < 1000; ++i) clock.Advance(absl::Seconds(1));
  reader.join();
  EXPECT_EQ(clock.Now() - start, absl::Seconds(1000));
}

TEST(ClockTest, RealClockAndStopwatchDoNotGoBackwards) {
  RealClock real;
  const absl::Time a = real.Now();
  Stopwatch watch;
  const double first = watch.Seconds();
  EXPECT_GE(first, 0.0);
  EXPECT_GE(watch.Seconds(), first);
  watch.Restart();
  EXPECT_GE(watch.Seconds(), 0.0);
  // Wall time may step, but not by more than the test's lifetime in the normal case; only the
  // order is asserted, with slack for an NTP slew.
  EXPECT_GE(real.Now(), a - absl::Seconds(1));
}

}  // namespace
}  // namespace expertmesh::base
