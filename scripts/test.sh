#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs every test twice: a
# release build, then the same tests under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
jobs="$(nproc)"
for flavor in release asan; do
  echo "=== $flavor: build ===" >&2
  bash "$ROOT/scripts/build.sh" "$flavor"
  dir="$ROOT/build"; [ "$flavor" = asan ] && dir="$ROOT/build-asan"
  echo "=== $flavor: ctest ===" >&2
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$dir" --output-on-failure -j "$jobs" "$@"
done
