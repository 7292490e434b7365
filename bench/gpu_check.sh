#!/usr/bin/env bash
# The GPU check in one command (what it does: bench/gpu_check.py; docs/triton.md, "Running the GPU check"):
#
#   bash bench/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --budget-s 360 or --dry-run]
#
# Picks a python -- $PYTHON, else the first of python3, python, the repository's .venv that
# imports torch, else plain python3 (gpu_check.py then says what is missing) -- runs the check
# and keeps its console output in OUT_DIR/gpu_check.log. Exit status: gpu_check.py's (0 passed,
# 1 failed, 2 incomplete, 3 setup failed), or 3 when there is no python at all.
set -u
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [gpu_check.py options]" >&2
    exit 64
fi
out=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"

py=${PYTHON:-}
if [ -z "$py" ]; then
    for cand in python3 python "$repo/.venv/bin/python"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
            py=$cand
            break
        fi
    done
fi
if [ -z "$py" ]; then
    py=$(command -v python3 || command -v python || true)
fi
if [ -z "$py" ]; then
    echo "gpu_check: no python on this machine (set PYTHON=/path/to/python)" | tee "$out/gpu_check.log" >&2
    exit 3
fi
echo "gpu_check: python $(command -v "$py") ($("$py" --version 2>&1))" | tee "$out/gpu_check.log"
cd "$repo" || exit 3
"$py" -u bench/gpu_check.py "$out" "$@" 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
