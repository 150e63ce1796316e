#!/usr/bin/env bash
# Configures (once) and builds one build tree. Usage: scripts/build.sh [release|asan] [targets...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavor="${1:-release}"; shift || true
case "$flavor" in
  release) dir="$ROOT/build"; flags=(-DCMAKE_BUILD_TYPE=Release) ;;
  asan) dir="$ROOT/build-asan"
        flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DEM_SANITIZE=ON -DEM_BUILD_BENCH=OFF
               -DEM_BUILD_E2E_TESTS=OFF) ;;
  *) echo "usage: scripts/build.sh [release|asan] [targets...]" >&2; exit 2 ;;
esac
export CCACHE_DIR="${CCACHE_DIR:-$ROOT/.deps/ccache}"
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S "$ROOT" -B "$dir" -G Ninja "${flags[@]}" >/dev/null
fi
if [ $# -gt 0 ]; then cmake --build "$dir" --target "$@"; else cmake --build "$dir"; fi
