#!/usr/bin/env bash
# ctest sdk_clients_test: starts a real local cluster with `expertmesh up` on the default tiny
# model (created by `up` in a temporary directory), then runs the official OpenAI and Anthropic
# node clients (tests/sdk/*.test.mjs, versions pinned in package-lock.json) against its HTTP API.
# Usage: run_sdk_tests.sh EXPERTMESH_BINARY
#
# Missing node or missing/mismatched packages FAIL the test (scripts/setup.sh installs them; a
# machine that followed the README never lacks them). The cluster is stopped on every exit path.
set -euo pipefail

SDK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLI="${1:?usage: run_sdk_tests.sh EXPERTMESH_BINARY}"
# Bounds: the whole test stays under ctest's TIMEOUT (180 s) on a loaded 2-core machine.
READY_TIMEOUT_S=90
TOTAL_S=165

fail() { echo "sdk_clients_test: FAILED: $*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || fail "node is not installed (run scripts/setup.sh)"
[ -x "$CLI" ] || fail "$CLI is not an executable (build the expertmesh target)"
# Every pinned package must be installed at exactly its locked version: a stale node_modules
# would test another client than the one the lock names.
node "$SDK_DIR/check_installed.mjs" "$SDK_DIR" ||
  fail "tests/sdk/node_modules does not match package-lock.json (run scripts/setup.sh)"

work="$(mktemp -d "${TMPDIR:-/tmp}/em-sdk-XXXXXX")"
up_pid=""
cleanup() {
  local rc=$?
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    # `up` gives its services PR_SET_PDEATHSIG, so killing it takes them down too.
    kill -KILL "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$work/up.log" ]; then
    echo "--- expertmesh up log ---" >&2; tail -n 60 "$work/up.log" >&2
    if [ -f "$work/logs/gateway.log" ]; then
      echo "--- gateway log (tail) ---" >&2; tail -n 40 "$work/logs/gateway.log" >&2
    fi
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --model names a directory that does not exist yet, so `up` writes the default model (preset
# tiny, seed 0, served as "tiny") there, as it does for a user's first `bash scripts/up.sh`. A key
# and an alias are configured as the README tells coding-agent users to, so the clients
# authenticate the way they do in the field.
api_key="sk-em-sdk-$$-$RANDOM"
"$CLI" up --http-port=0 --base-port=0 --expert-workers=1 --exit-on-failure \
  --ready-timeout-s="$READY_TIMEOUT_S" --model="$work/tiny" --log-dir="$work/logs" \
  --run-dir="$work/run" --api-key="$api_key:sdk-tests" --model-alias=sdk-agent-model=tiny \
  >"$work/up.log" 2>&1 &
up_pid=$!

deadline=$((SECONDS + READY_TIMEOUT_S + 10))
until grep -q "Press Ctrl-C to stop" "$work/up.log" 2>/dev/null && [ -f "$work/run/cluster.json" ]; do
  kill -0 "$up_pid" 2>/dev/null || fail "expertmesh up exited before the cluster was ready"
  [ "$SECONDS" -lt "$deadline" ] || fail "the cluster was not ready within ${READY_TIMEOUT_S} s"
  sleep 0.2
done
base_url="$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).http_url)' \
  "$work/run/cluster.json")"
echo "sdk_clients_test: cluster up at $base_url" >&2

# One file at a time: the node runner's per-file processes would otherwise compete for the two
# cores with the cluster. Each file runs to the end so that one failure does not hide others.
failed=()
for t in "$SDK_DIR"/*.test.mjs; do
  echo "=== $(basename "$t") ===" >&2
  left=$((TOTAL_S - SECONDS))
  [ "$left" -gt 5 ] || fail "out of time before $(basename "$t")"
  if ! EXPERTMESH_BASE_URL="$base_url" EXPERTMESH_API_KEY="$api_key" \
    EXPERTMESH_MODEL_ALIAS=sdk-agent-model timeout "$left" node --test "$t"; then
    failed+=("$(basename "$t")")
  fi
  kill -0 "$up_pid" 2>/dev/null || fail "expertmesh up died during $(basename "$t")"
done
[ ${#failed[@]} -eq 0 ] || fail "${failed[*]}"
echo "sdk_clients_test: all SDK tests passed" >&2
