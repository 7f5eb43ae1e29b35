#!/usr/bin/env bash
# Creates .venv (once) and installs X-Learner with pinned torch. Sourced by run.sh and test.sh.
# Re-running is cheap: it only checks that the environment imports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XLEARNER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  # --system-site-packages: reuse a torch that the machine already has (e.g. a GPU image with torch 2.11)
  "$PY" -m venv --system-site-packages "$VENV"
fi
quiet() {  # this machine's pip config lists local mirrors that pip warns about once per package
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
if ! "$VENV/bin/python" -c "import torch, torchvision, xlearner, pytest" >/dev/null 2>&1; then
  if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
    quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==2.14.1" "torchvision==0.29.1"
  fi
  echo "[setup] installing xlearner and its dependencies"
  quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$ROOT[test]"
  "$VENV/bin/python" -c "import torch, torchvision, xlearner" || { echo "[setup] install failed"; exit 1; }
fi
export PATH="$VENV/bin:$PATH"
