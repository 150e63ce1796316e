#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs the tests twice: every
# test on a release build, then all but the end-to-end ones (label e2e) under AddressSanitizer +
# UndefinedBehaviorSanitizer.
# A test that is skipped, disabled or not run fails the run (docs/testing.md): the gtest main
# (em_test_main) fails skipped tests itself, and ctest's summary is checked for tests it did not
# run, which ctest reports with a zero exit status.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
jobs="$(nproc)"
for flavor in release asan; do
  echo "=== $flavor: build ===" >&2
  bash "$ROOT/scripts/build.sh" "$flavor"
  dir="$ROOT/build"; [ "$flavor" = asan ] && dir="$ROOT/build-asan"
  echo "=== $flavor: ctest ===" >&2
  log="$dir/ctest-summary.log"
  # End-to-end tests (label e2e) run in the release pass only; under the sanitizers the unit and
  # fuzz tests and one cluster smoke test run (issue 8: CI under 45 minutes on 2 cores).
  select=()
  [ "$flavor" = asan ] && select=(-LE e2e)
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$dir" --output-on-failure --no-tests=error -j "$jobs" "${select[@]}" "$@" \
    2>&1 | tee "$log"
  bash "$ROOT/tests/testing/check_ctest_summary.sh" "$log"
done
