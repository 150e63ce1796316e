#!/usr/bin/env bash
# ctest monitoring_test: the real Prometheus server (Debian `prometheus`) on loopback scrapes a
# live `expertmesh up` cluster through the file_sd targets file `up` writes, with the rules of
# monitoring/rules loaded, while requests go through the gateway; then every dashboard
# expression, every recording rule and every alert expression without its comparison must return
# data through the HTTP API (check_queries.mjs). Also runs `promtool check rules` and
# `promtool test rules` on monitoring/.
# Usage: run_monitoring_test.sh EXPERTMESH_BINARY
#
# Missing prometheus, promtool, node or curl FAIL the test (scripts/setup.sh installs them).
# The cluster, Prometheus and the load loop are stopped on every exit path.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MON="$(cd "$HERE/../../monitoring" && pwd)"
CLI="${1:?usage: run_monitoring_test.sh EXPERTMESH_BINARY}"
# Bounds: under ctest's TIMEOUT (180 s) on a loaded 2-core machine.
READY_TIMEOUT_S=90
QUERY_DEADLINE_S=60

fail() { echo "monitoring_test: FAILED: $*" >&2; exit 1; }
source "$HERE/../testing/up_cluster.sh"
for tool in prometheus promtool curl; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed (run scripts/setup.sh)"
done
up_require "$CLI"

echo "=== promtool check rules / test rules ===" >&2
promtool check rules "$MON"/rules/*.yml || fail "promtool check rules"
promtool test rules "$MON"/tests/*.yml || fail "promtool test rules"
rule_count="$(promtool check rules "$MON"/rules/*.yml 2>&1 |
  sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p' | awk '{s+=$1} END {print s+0}')"
[ "$rule_count" -gt 0 ] || fail "no rules found in $MON/rules"

up_cluster_init em-mon
work="$UP_WORK"
prom_pid="" load_pid=""
stop_users() {
  up_stop_pid "$load_pid" 2
  up_stop_pid "$prom_pid" 10
}
UP_CLEANUP_FIRST=stop_users
UP_FAILURE_LOGS=(prometheus.log load.log)

# Two expert workers, so that the expert panels have more than one worker to tell apart.
up_cluster_start "$CLI" "$READY_TIMEOUT_S" prometheus-targets.json --expert-workers=2
targets="$work/run/prometheus-targets.json"
node -e '
  const g = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const kinds = g.map((t) => t.labels.service).sort().join(",");
  const want = "attention-worker,expert-worker,expert-worker,gateway,kv-store,router";
  if (kinds !== want) { console.error(`targets file lists ${kinds}, want ${want}`); process.exit(1); }
  for (const t of g) if (!t.labels.instance || t.targets.length !== 1)
    { console.error("target group without instance or one target: " + JSON.stringify(t)); process.exit(1); }
' "$targets" || fail "$targets is not the cluster's target list"
http_url="$(up_cluster_field http_url)"

# The shipped configuration, pointed at this cluster's targets file and the rule files by
# absolute path, scraping and evaluating every second.
prom_port="$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
sed -e "s|\"../var/run/prometheus-targets.json\"|\"$targets\"|" \
    -e "s|^  - rules/|  - $MON/rules/|" \
    -e "s|^\(  scrape_interval:\).*|\1 1s|" -e "s|^\(  evaluation_interval:\).*|\1 1s|" \
    -e "s|^\(        refresh_interval:\).*|\1 1s|" \
    "$MON/prometheus-local.yml" >"$work/prometheus.yml"
grep -q "$targets" "$work/prometheus.yml" || fail "prometheus-local.yml no longer reads ../var/run/prometheus-targets.json"
promtool check config "$work/prometheus.yml" >/dev/null || fail "promtool check config"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
prom="http://127.0.0.1:$prom_port"

# Load: chat requests one after another until stopped, each with a prompt long enough to span
# kv blocks, so that the prefix cache and kv-store series move too.
prefix="$(printf 'The expert mesh serves mixture of experts models across many machines. %.0s' $(seq 40))"
(
  i=0
  while :; do
    i=$((i + 1))
    curl -sS -m 30 -o /dev/null -w '%{http_code}\n' "$http_url/v1/chat/completions" \
      -H 'content-type: application/json' \
      -d "{\"model\":\"tiny\",\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"$prefix request $i\"}]}" \
      || true
  done
) >"$work/load.log" 2>&1 &
load_pid=$!

# Discovery is throttled to about 5 s: wait for every target to be scraped before judging.
deadline=$((SECONDS + 30))
until [ "$(curl -s -m 2 "$prom/api/v1/query?query=count(up%7Bjob%3D%22expertmesh%22%7D%3D%3D1)" |
  node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{const r=JSON.parse(s).data.result;console.log(r.length?r[0].value[1]:0)}catch{console.log(0)}})')" = 6 ]; do
  kill -0 "$prom_pid" 2>/dev/null || fail "prometheus exited"
  [ "$SECONDS" -lt "$deadline" ] || fail "Prometheus did not scrape all 6 targets within 30 s"
  sleep 0.5
done
echo "monitoring_test: Prometheus scrapes all 6 targets" >&2

node "$HERE/check_queries.mjs" "$prom" "$MON/dashboards" "$rule_count" "$QUERY_DEADLINE_S" ||
  fail "some monitoring queries returned no data"
grep -q '^200$' "$work/load.log" || fail "no request through the gateway succeeded"
echo "monitoring_test: PASSED" >&2
