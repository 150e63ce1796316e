#!/usr/bin/env bash
# The README's run command: installs what is missing, builds, then starts the local cluster
# (`expertmesh up`) on the default model. Extra arguments go to `expertmesh up`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/build.sh" release >&2
exec "$ROOT/build/cli/expertmesh" up "$@"
