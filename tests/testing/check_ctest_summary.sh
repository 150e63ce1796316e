#!/usr/bin/env bash
# check_ctest_summary.sh CTEST_LOG: fails (exit 1) when ctest's output lists tests that did not
# run (skipped by SKIP_REGULAR_EXPRESSION or SKIP_RETURN_CODE, disabled, or not built), which
# ctest itself reports with a zero exit status. A skipped test is a failed test.
set -euo pipefail
log="${1:?usage: check_ctest_summary.sh CTEST_LOG}"
[ -r "$log" ] || { echo "check_ctest_summary: cannot read $log" >&2; exit 1; }
if grep -q "The following tests did not run:" "$log"; then
  echo "FAILED: tests that did not run (a skipped or disabled test is a failed test):" >&2
  sed -n '/The following tests did not run:/,/^$/p' "$log" | tail -n +2 >&2
  exit 1
fi
if grep -q "_NOT_BUILT" "$log"; then
  echo "FAILED: test binaries that were not built:" >&2
  grep "_NOT_BUILT" "$log" >&2
  exit 1
fi
if ! grep -Eq "^[0-9]+% tests passed, 0 tests failed out of [1-9][0-9]*" "$log"; then
  echo "FAILED: ctest's summary does not say that every test passed" >&2
  exit 1
fi
