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
ROOT="$(cd "$SDK_DIR/../.." && pwd)"
CLI="${1:?usage: run_sdk_tests.sh EXPERTMESH_BINARY}"
# Bounds: the whole test stays under ctest's TIMEOUT (180 s) on a loaded 2-core machine.
READY_TIMEOUT_S=90
TOTAL_S=165

fail() { echo "sdk_clients_test: FAILED: $*" >&2; exit 1; }
source "$ROOT/tests/testing/up_cluster.sh"

# The clients under test are the ones package-lock.json pins.
up_require "$CLI" "$SDK_DIR"

up_cluster_init em-sdk

# The default tiny model, with a key and an alias configured as the README tells coding-agent users
# to, so the clients authenticate the way they do in the field.
api_key="sk-em-sdk-$$-$RANDOM"
up_cluster_start "$CLI" "$READY_TIMEOUT_S" cluster.json --expert-workers=1 \
  --api-key="$api_key:sdk-tests" --model-alias=sdk-agent-model=tiny
base_url="$(up_cluster_field http_url)"
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
  kill -0 "$UP_PID" 2>/dev/null || fail "expertmesh up died during $(basename "$t")"
done
[ ${#failed[@]} -eq 0 ] || fail "${failed[*]}"
echo "sdk_clients_test: all SDK tests passed" >&2
