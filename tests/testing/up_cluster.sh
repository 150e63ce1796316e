# Sourced by the script-driven e2e tests (tests/sdk, tests/page, tests/monitoring) that run a
# real `expertmesh up`: a work directory, the cluster started on free ports with its readiness
# waited for, and one EXIT trap that stops everything and shows the logs when the test failed.
# The sourcing script defines fail MESSAGE (prints and exits 1) and runs under `set -euo pipefail`.
#
#   up_require CLI [NODE_DIR]         fails unless node is installed, CLI is executable and (with
#                                     NODE_DIR) NODE_DIR/node_modules is exactly what its
#                                     package-lock.json pins: stale packages would test other code
#   up_cluster_init PREFIX            work directory $UP_WORK; installs the trap
#   up_cluster_start CLI READY_TIMEOUT_S READY_FILE [UP_ARGS...]
#                                     `up` in the background ($UP_PID), back once it has printed
#                                     its banner and written run/READY_FILE
#   up_cluster_field NAME             NAME from run/cluster.json ("" when absent)
#   up_stop_pid PID SECONDS           SIGTERM, SECONDS to exit, then SIGKILL
#
# Hooks for the trap, set before it fires: UP_CLEANUP_FIRST, a command run before `up` is stopped
# (for processes that use the cluster); UP_FAILURE_LOGS, more files under $UP_WORK to show.

UP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
UP_WORK=""
UP_PID=""
UP_CLEANUP_FIRST=""
UP_FAILURE_LOGS=()

up_require() {
  command -v node >/dev/null 2>&1 || fail "node is not installed (run scripts/setup.sh)"
  [ -x "$1" ] || fail "$1 is not an executable (build the expertmesh target)"
  [ -z "${2:-}" ] || node "$UP_ROOT/tests/testing/check_node_packages.mjs" "$2" ||
    fail "${2#"$UP_ROOT"/}/node_modules does not match package-lock.json (run scripts/setup.sh)"
}

up_stop_pid() {
  local pid="$1"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $(($2 * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

up_cluster_cleanup() {
  local rc=$?
  [ -z "$UP_CLEANUP_FIRST" ] || $UP_CLEANUP_FIRST
  # `up` gives its services PR_SET_PDEATHSIG, so stopping it takes them down too.
  up_stop_pid "$UP_PID" 15
  if [ "$rc" -ne 0 ] && [ -f "$UP_WORK/up.log" ]; then
    echo "--- expertmesh up log ---" >&2; tail -n 60 "$UP_WORK/up.log" >&2
    if [ -f "$UP_WORK/logs/gateway.log" ]; then
      echo "--- gateway log (tail) ---" >&2; tail -n 40 "$UP_WORK/logs/gateway.log" >&2
    fi
    local f
    for f in "${UP_FAILURE_LOGS[@]}"; do
      [ -f "$UP_WORK/$f" ] && { echo "--- $f (tail) ---" >&2; tail -n 40 "$UP_WORK/$f" >&2; }
    done
  fi
  [ -z "$UP_WORK" ] || rm -rf "$UP_WORK"
  exit "$rc"
}

up_cluster_init() {
  UP_WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1-XXXXXX")"
  trap up_cluster_cleanup EXIT
  trap 'exit 130' INT TERM
}

up_cluster_start() {
  local cli="$1" ready_timeout_s="$2" ready_file="$3"
  shift 3
  # --model names a directory that does not exist yet, so `up` writes the default model (preset
  # tiny, seed 0, served as "tiny") there, as on a user's first `bash scripts/up.sh`.
  "$cli" up --http-port=0 --base-port=0 --exit-on-failure --ready-timeout-s="$ready_timeout_s" \
    --model="$UP_WORK/tiny" --log-dir="$UP_WORK/logs" --run-dir="$UP_WORK/run" "$@" \
    >"$UP_WORK/up.log" 2>&1 &
  UP_PID=$!
  local deadline=$((SECONDS + ready_timeout_s + 10))
  until grep -q "Press Ctrl-C to stop" "$UP_WORK/up.log" 2>/dev/null &&
    [ -f "$UP_WORK/run/$ready_file" ]; do
    kill -0 "$UP_PID" 2>/dev/null || fail "expertmesh up exited before the cluster was ready"
    [ "$SECONDS" -lt "$deadline" ] || fail "the cluster was not ready within ${ready_timeout_s} s"
    sleep 0.2
  done
}

up_cluster_field() {
  node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1]))[process.argv[2]] ?? "")' \
    "$UP_WORK/run/cluster.json" "$1"
}
