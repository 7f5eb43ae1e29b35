#!/usr/bin/env bash
# GPU check of issue 9, for a GPU machine WITHOUT network (Python 3.12, torch 2.11 present).
# Installs nothing from the network: it uses .offline/ made beforehand, on a machine with the
# registries, by ../shared/gpu/bundle.sh (wheels for pycocotools/pydantic, the data cache as xz).
#
#   benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu_check_out)
#
# Writes every figure to OUT_DIR:
#   env.txt                    nvidia-smi, Python, torch, CUDA
#   bench_stages.txt/.json     benchmarks/bench_stages.py on CUDA at the gpu preset's shapes
#   bench_loader.txt           loader samples/s with 1, 2, 6, 14 workers
#   run.log, run/              the full `gpu` preset (every stage, transfer, 3 seeds), its report
#   dmon_*.txt                 nvidia-smi dmon samples (1 s) during each part
#   summary.txt                wall times and SM utilisation (mean, median) per part
# Parts can be skipped: SKIP_BENCH=1, SKIP_LOADER=1, SKIP_RUN=1. RUN_TIMEOUT (s, default 560)
# bounds the preset run (its wall time is then reported as "timed out"). Where one command may
# run 10 minutes at most, call it twice into the same OUT_DIR (the summary covers both):
#   SKIP_RUN=1 benchmarks/gpu_check.sh "$OUT"                  # benchmarks, about 3-4 minutes
#   SKIP_BENCH=1 SKIP_LOADER=1 benchmarks/gpu_check.sh "$OUT"  # the preset, at most RUN_TIMEOUT
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
PY="${PYTHON:-python3}"

# --- offline set-up -----------------------------------------------------------------------
[ -d .offline/wheels ] && [ -f .offline/xlhome.txz ] || {
  echo "no .offline/ bundle: run ../shared/gpu/bundle.sh on a machine with the registries first"; exit 2; }
SITE=/tmp/xl_site
mkdir -p "$SITE"
"$PY" -m pip install -q --no-index --no-deps --target "$SITE" .offline/wheels/*.whl 2>&1 | tail -2
[ -d /tmp/xlhome ] || tar xJf .offline/xlhome.txz -C /tmp
export XLEARNER_HOME=/tmp/xlhome PYTHONPATH="$SITE:$ROOT/src" PYTHONUNBUFFERED=1

{ date -u; nvidia-smi; "$PY" -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; nproc; } > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

DMON_PID=""
dmon_start() {  # SM / memory utilisation every second, with timestamps
  nvidia-smi dmon -s u -d 1 -o T > "$DEST/dmon_$1.txt" 2>&1 &
  DMON_PID=$!
}
dmon_stop() { [ -n "$DMON_PID" ] && kill "$DMON_PID" 2>/dev/null; wait "$DMON_PID" 2>/dev/null; DMON_PID=""; }
trap dmon_stop EXIT

part() {  # part NAME TIMEOUT_S COMMAND... : run under dmon, tee to NAME.txt, note the wall time
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  dmon_start "$name"
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | tee "$DEST/$name.txt"
  local rc=${PIPESTATUS[0]}
  local wall
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  [ "$rc" = 124 ] && wall="$wall (timed out)"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && wall="$wall (exit $rc)"
  echo "$wall" > "$DEST/wall_$name.txt"
  dmon_stop
}

[ "${SKIP_BENCH:-0}" = 1 ] || part bench_stages 200 "$PY" benchmarks/bench_stages.py --preset gpu --steps 10 --rounds 2 \
  --json "$DEST/bench_stages.json"
[ "${SKIP_LOADER:-0}" = 1 ] || part bench_loader 150 "$PY" benchmarks/bench_loader.py --workers 1,2,6,14 --batches 30 --batch-size 64
[ "${SKIP_RUN:-0}" = 1 ] || part run "${RUN_TIMEOUT:-560}" "$PY" -m xlearner.cli run --preset gpu --out "$DEST/run"
[ -f "$DEST/run.txt" ] && mv "$DEST/run.txt" "$DEST/run.log"

# --- summary: wall time and SM utilisation per part ----------------------------------------
{
  echo "gpu_check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  for name in bench_stages bench_loader run; do
    [ -f "$DEST/dmon_$name.txt" ] || continue
    # dmon -o T columns: time gpu sm mem enc dec ...; skip the '#' header lines (plain awk: no asort)
    awk '!/^#/ && NF >= 4 && $3 ~ /^[0-9]+$/ {print $3}' "$DEST/dmon_$name.txt" | sort -n |
      awk -v n="$name" -v w="$(cat "$DEST/wall_$name.txt" 2>/dev/null || echo ?)" '{v[++c]=$1; s+=$1}
        END {if (!c) {print n ": wall " w " s, no dmon samples"; exit}
             m = (c % 2) ? v[(c+1)/2] : (v[c/2] + v[c/2+1]) / 2
             printf "%s: wall %s s, SM utilisation mean %.0f %%, median %.0f %% (%d samples)\n", n, w, s/c, m, c}'
  done
  [ -f "$DEST/bench_stages.txt" ] && grep -E "^ratios" "$DEST/bench_stages.txt"
  [ -f "$DEST/run.log" ] && grep -E "^\[[a-z_]+\] done in|main job|report" "$DEST/run.log" | tail -20
} | tee "$DEST/summary.txt"
