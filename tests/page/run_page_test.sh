#!/usr/bin/env bash
# ctest cluster_page_test: starts a real `expertmesh up` (tiny model, two expert workers), then
# opens the gateway's cluster page in headless system Chromium through playwright-core (pinned in
# package-lock.json) and checks it (cluster_page.mjs). Writes OUT_DIR/cluster_page.png.
# Usage: run_page_test.sh EXPERTMESH_BINARY OUT_DIR
#
# Missing node, Chromium or packages FAIL the test (scripts/setup.sh installs them). The cluster
# is stopped on every exit path.
set -euo pipefail

PAGE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$PAGE_DIR/../.." && pwd)"
CLI="${1:?usage: run_page_test.sh EXPERTMESH_BINARY OUT_DIR}"
OUT_DIR="${2:?usage: run_page_test.sh EXPERTMESH_BINARY OUT_DIR}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
# Bounds: the whole test stays under ctest's TIMEOUT (180 s) on a loaded 2-core machine.
READY_TIMEOUT_S=90
TOTAL_S=165

fail() { echo "cluster_page_test: FAILED: $*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || fail "node is not installed (run scripts/setup.sh)"
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] ||
  fail "node $(node --version) is too old for playwright-core (need >= 20)"
[ -x "$CHROMIUM" ] || fail "$CHROMIUM is missing (run scripts/setup.sh: Debian package chromium)"
[ -x "$CLI" ] || fail "$CLI is not an executable (build the expertmesh target)"
node "$ROOT/tests/sdk/check_installed.mjs" "$PAGE_DIR" ||
  fail "tests/page/node_modules does not match package-lock.json (run scripts/setup.sh)"

work="$(mktemp -d "${TMPDIR:-/tmp}/em-page-XXXXXX")"
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

# Two expert workers, so that the heatmap has more than one colour to check.
"$CLI" up --http-port=0 --base-port=0 --admin-port=0 --expert-workers=2 --exit-on-failure \
  --ready-timeout-s="$READY_TIMEOUT_S" --model="$work/tiny" --log-dir="$work/logs" \
  --run-dir="$work/run" >"$work/up.log" 2>&1 &
up_pid=$!

deadline=$((SECONDS + READY_TIMEOUT_S + 10))
until grep -q "Press Ctrl-C to stop" "$work/up.log" 2>/dev/null && [ -f "$work/run/cluster.json" ]; do
  kill -0 "$up_pid" 2>/dev/null || fail "expertmesh up exited before the cluster was ready"
  [ "$SECONDS" -lt "$deadline" ] || fail "the cluster was not ready within ${READY_TIMEOUT_S} s"
  sleep 0.2
done
read_json() {
  node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1]))[process.argv[2]] ?? "")' \
    "$work/run/cluster.json" "$1"
}
base_url="$(read_json http_url)"
admin_url="$(read_json admin_url)"
[ -n "$admin_url" ] || fail "cluster.json has no admin_url"
grep -q "Page: $admin_url" "$work/up.log" || fail "\`up\` did not print the page URL $admin_url"
echo "cluster_page_test: API $base_url, page $admin_url" >&2

left=$((TOTAL_S - SECONDS))
[ "$left" -gt 10 ] || fail "out of time before the browser started"
EXPERTMESH_ADMIN_URL="$admin_url" EXPERTMESH_BASE_URL="$base_url" EXPERTMESH_MODEL_DIR="$work/tiny" \
  PAGE_OUT_DIR="$OUT_DIR" CHROMIUM="$CHROMIUM" timeout "$left" node "$PAGE_DIR/cluster_page.mjs" ||
  fail "the page checks failed"
kill -0 "$up_pid" 2>/dev/null || fail "expertmesh up died during the page checks"
