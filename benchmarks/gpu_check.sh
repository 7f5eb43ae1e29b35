#!/usr/bin/env bash
# GPU check (issues 9, 28), for a GPU machine WITHOUT network (Python 3.12, torch 2.11 present), in
# ONE command of at most BUDGET seconds (default 540: 9 minutes; the device tool allows 600 a command).
# Without a GPU (no nvidia-smi) it runs the same parts on the CPU, without dmon: the CPU fallback
# that tries the script before a GPU run (e.g. PRESET=quick BUDGET=420 benchmarks/gpu_check.sh OUT).
# Installs nothing from the network: it uses .offline/ made beforehand, on a machine with the
# registries, by ../shared/gpu/bundle.sh (wheels for pycocotools/pydantic, the data cache as xz).
#
#   benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu_check_out)
#
# In order, each under nvidia-smi dmon (SM utilisation, 1 s samples):
#   0. bench_stages.py --count-ops (operators per step, bf16) and --graph-breaks  (at most 60 s each)
#   1. benchmarks/bench_stages.py on CUDA at the preset's shapes      (at most 150 s)
#   2. `xlearner run --preset $PRESET` (default gpu): every stage, every transfer, 3 seeds
#      (at most what is left of BUDGET less 15 s; a run cut short says "timed out")
#   3. benchmarks/bench_loader.py with 1, 2, 6, 14 workers            (at most 60 s of what is left)
#   4. unless COMPILE_BENCH=0: bench_stages.py on COMPILE_STAGES (msst_det,msst_seg) with train.compile=true,
#      once per mode in COMPILE_MODES (default: "default reduce-overhead")  (what is left)
# OUT_DIR gets at most 8 files (what the device tool brings back): summary.txt (wall time and
# SM utilisation per part, the ratios, the run's per-part times), env.txt, bench_stages.txt,
# run.log, report.md, figures.tgz (dmon samples, bench_loader.txt, bench_stages.json and the
# run's small files: results.json, timings.json, logs; no checkpoints).
# SKIP_BENCH=1, SKIP_RUN=1, SKIP_LOADER=1 skip parts; PRESET and RUN_OVERRIDES change the run,
# BENCH_OVERRIDES the benchmarks' config (e.g. "sources.glyph_det.batch_size=256": a det step that
# is no longer launch-bound).
set -uo pipefail
T_START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WORK=/tmp/gpu_check_work
rm -rf "$WORK"; mkdir -p "$WORK"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
HAVE_GPU=0; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && HAVE_GPU=1
PRESET="${PRESET:-gpu}"
left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }

# --- offline set-up -----------------------------------------------------------------------
if [ -d .offline/wheels ] && [ -f .offline/xlhome.txz ]; then
  SITE=/tmp/xl_site
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .offline/wheels/*.whl 2>&1 | tail -2
  [ -d /tmp/xlhome ] || tar xJf .offline/xlhome.txz -C /tmp
  export XLEARNER_HOME=/tmp/xlhome PYTHONPATH="$SITE:$ROOT/src" PYTHONUNBUFFERED=1
elif "$PY" -c "import pycocotools, pydantic, xlearner" 2>/dev/null; then  # set up already (the CPU fallback in .venv)
  export PYTHONUNBUFFERED=1
else
  echo "no .offline/ bundle: run ../shared/gpu/bundle.sh on a machine with the registries first"; exit 2
fi

# the tree that travelled: a digest of its tracked sources (the device's git metadata may be older)
SRC_DIGEST=$(find src benchmarks tests -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.sh' \) | LC_ALL=C sort |
             xargs cat | sha256sum | cut -c1-12)
{ date -u; git log -1 --format='commit %h %s' 2>/dev/null; echo "source digest $SRC_DIGEST"; [ "$HAVE_GPU" = 1 ] && nvidia-smi; "$PY" -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; echo "cores $(nproc)"; } > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"
echo "set-up took $(( $(date +%s) - T_START )) s"

DMON_PID=""
dmon_start() {  # SM / memory utilisation every second, with timestamps (nothing without a GPU)
  [ "$HAVE_GPU" = 1 ] || return 0
  nvidia-smi dmon -s u -d 1 -o T > "$WORK/dmon_$1.txt" 2>&1 &
  DMON_PID=$!
}
dmon_stop() { [ -n "$DMON_PID" ] && kill "$DMON_PID" 2>/dev/null; wait "$DMON_PID" 2>/dev/null; DMON_PID=""; }
trap dmon_stop EXIT

part() {  # part NAME TIMEOUT_S COMMAND... : run under dmon, tee to NAME.txt, note the wall time
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then echo "=== $name: skipped, $limit s left"; return; fi
  echo "=== $name (at most $limit s): $*"
  dmon_start "$name"
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | tee "$WORK/$name.txt"
  local rc=${PIPESTATUS[0]}
  local wall
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  [ "$rc" = 124 ] && wall="$wall (timed out)"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && wall="$wall (exit $rc)"
  echo "$wall" > "$WORK/wall_$name.txt"
  dmon_stop
}

# operators per step (what a launch-bound GPU step pays for) and graph breaks under torch.compile
[ "${SKIP_COUNTS:-0}" = 1 ] || {
  part count_ops $(( $(left) < 60 ? $(left) : 60 )) "$PY" benchmarks/bench_stages.py --preset "$PRESET" --count-ops \
    train.amp=bf16 ${BENCH_OVERRIDES:-}
  part graph_breaks $(( $(left) < 60 ? $(left) : 60 )) "$PY" benchmarks/bench_stages.py --preset "$PRESET" \
    --graph-breaks ${BENCH_OVERRIDES:-}
}
BENCH_LIMIT=$(( $(left) < 150 ? $(left) : 150 ))
[ "${SKIP_BENCH:-0}" = 1 ] || part bench_stages "$BENCH_LIMIT" "$PY" benchmarks/bench_stages.py --preset "$PRESET" \
  --steps 10 --rounds 2 --json "$WORK/bench_stages.json" ${BENCH_OVERRIDES:-}
# shellcheck disable=SC2086
[ "${SKIP_RUN:-0}" = 1 ] || part run $(( $(left) - 15 )) "$PY" -m xlearner.cli run --preset "$PRESET" --out "$WORK/run" \
  ${RUN_OVERRIDES:-}
[ "${SKIP_LOADER:-0}" = 1 ] || part bench_loader $(( $(left) < 60 ? $(left) - 8 : 60 )) "$PY" benchmarks/bench_loader.py \
  --workers 1,2,6,14 --batches 30 --batch-size 64
# torch.compile of the det and seg steps against the plain loop, compiled too (opt-in: compiling takes minutes),
# once per mode of COMPILE_MODES (default: "default"; "reduce-overhead" replays CUDA graphs)
if [ "${COMPILE_BENCH:-1}" = 1 ]; then
  for mode in ${COMPILE_MODES:-default reduce-overhead}; do
    part "bench_compile_$mode" $(( $(left) - 8 )) "$PY" benchmarks/bench_stages.py --preset "$PRESET" \
      --stages "${COMPILE_STAGES:-msst_det,msst_seg}" --steps 10 --rounds 2 train.compile=true "train.compile_mode=$mode" ${BENCH_OVERRIDES:-}
  done
fi

# --- summary: wall time and SM utilisation per part ----------------------------------------
{
  echo "gpu_check $(date -u +%FT%TZ) on $( [ "$HAVE_GPU" = 1 ] && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo "CPU (no GPU, $(nproc) cores)")," \
       "preset $PRESET, $(git log -1 --format=%h 2>/dev/null), source digest $SRC_DIGEST"
  for f in "$WORK"/wall_*.txt; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .txt); name=${name#wall_}
    # dmon -o T columns: time gpu sm mem enc dec ...; skip the '#' header lines (plain awk: no asort)
    awk '!/^#/ && NF >= 4 && $3 ~ /^[0-9]+$/ {print $3}' "$WORK/dmon_$name.txt" 2>/dev/null | sort -n |
      awk -v n="$name" -v w="$(cat "$WORK/wall_$name.txt")" '{v[++c]=$1; s+=$1}
        END {if (!c) {print n ": wall " w " s, no dmon samples"; exit}
             m = (c % 2) ? v[(c+1)/2] : (v[c/2] + v[c/2+1]) / 2
             printf "%s: wall %s s, SM utilisation mean %.0f %%, median %.0f %% (%d samples)\n", n, w, s/c, m, c}'
  done
  [ -f "$WORK/count_ops.txt" ] && grep -E "^(msst_[a-z]+|msmt|expansion|squeeze) +[0-9]" "$WORK/count_ops.txt" | sed "s/^/ops: /"
  [ -f "$WORK/graph_breaks.txt" ] && grep -E "^(msst_[a-z]+|msmt|expansion|squeeze) +[0-9]" "$WORK/graph_breaks.txt" | sed "s/^/graph: /"
  [ -f "$WORK/bench_stages.txt" ] && grep -E "^ratios" "$WORK/bench_stages.txt"
  for f in "$WORK"/bench_compile_*.txt; do
    [ -f "$f" ] && grep -E "^ratios|^msst_" "$f" | sed "s/^/$(basename "$f" .txt): /"
  done
  [ -f "$WORK/run/timings.json" ] && { echo "run timings.json:"; cat "$WORK/run/timings.json"; echo; }
  [ -d "$WORK/run" ] && "$PY" -c '
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/run.json")):
    r = json.loads(f.read_text())
    if "fit_eval_s" in r:
        print("%s: wall %.1f s, validation %.1f s, training %.0f images/s"
              % (f.parent.name, r["wall_s"], r["fit_eval_s"], r["train_images_per_s"]))' "$WORK/run"
  [ -f "$WORK/run.txt" ] && grep -E "done in|Can this run" "$WORK/run.txt" | tail -30
} | tee "$DEST/summary.txt"

# --- what comes back: at most 8 files -------------------------------------------------------
[ -f "$WORK/bench_stages.txt" ] && cp "$WORK/bench_stages.txt" "$DEST/"
[ -f "$WORK/run.txt" ] && cp "$WORK/run.txt" "$DEST/run.log"
[ -f "$WORK/run/report.md" ] && cp "$WORK/run/report.md" "$DEST/"
( cd "$WORK" && find . -type f \( -name '*.txt' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.yaml' \) \
    -size -4M | tar czf "$DEST/figures.tgz" -T - )
ls -la "$DEST"
