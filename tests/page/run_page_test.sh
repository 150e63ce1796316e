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
source "$ROOT/tests/testing/up_cluster.sh"

up_require "$CLI" "$PAGE_DIR"
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] ||
  fail "node $(node --version) is too old for playwright-core (need >= 20)"
[ -x "$CHROMIUM" ] || fail "$CHROMIUM is missing (run scripts/setup.sh: Debian package chromium)"

up_cluster_init em-page
work="$UP_WORK"

# Two expert workers, so that the heatmap has more than one colour to check.
up_cluster_start "$CLI" "$READY_TIMEOUT_S" cluster.json --admin-port=0 --expert-workers=2
base_url="$(up_cluster_field http_url)"
admin_url="$(up_cluster_field admin_url)"
[ -n "$admin_url" ] || fail "cluster.json has no admin_url"
grep -q "Page: $admin_url" "$work/up.log" || fail "\`up\` did not print the page URL $admin_url"
echo "cluster_page_test: API $base_url, page $admin_url" >&2

left=$((TOTAL_S - SECONDS))
[ "$left" -gt 10 ] || fail "out of time before the browser started"
EXPERTMESH_ADMIN_URL="$admin_url" EXPERTMESH_BASE_URL="$base_url" EXPERTMESH_MODEL_DIR="$work/tiny" \
  PAGE_OUT_DIR="$OUT_DIR" CHROMIUM="$CHROMIUM" timeout "$left" node "$PAGE_DIR/cluster_page.mjs" ||
  fail "the page checks failed"
kill -0 "$UP_PID" 2>/dev/null || fail "expertmesh up died during the page checks"
