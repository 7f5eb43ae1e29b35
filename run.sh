#!/usr/bin/env bash
# The main job on the embedded benchmark: set-up, data fetch, expansion, squeeze, baselines, transfer, report.
# Extra arguments go to `xlearner run` (e.g. ./run.sh --preset quick).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec xlearner run "$@"
