#!/usr/bin/env bash
# Lint, format check and type check of hosl/ (configuration: pyproject.toml, [tool.ruff] and [tool.mypy]).
#   .ci/lint.sh [VENV]    VENV: the virtual environment to install the pinned tools into (default .venv)
# Exits non-zero on any finding. All three cover all of hosl/ (a new module is checked from its first
# commit: `ruff format PATH` and fix what `mypy PATH` reports); .pre-commit-config.yaml pins the same ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}

RUFF_VERSION=0.17.5
MYPY_VERSION=2.4.1
LINTED=(hosl)                          # ruff check: all of hosl/
FORMATTED=(hosl)                       # ruff format --check: all of hosl/
TYPED=(hosl)                           # mypy: all of hosl/

if [ ! -x "$VENV/bin/python" ]; then
    echo "[lint] no virtual environment at $VENV (create it with: VENV=$VENV bash scripts/setup.sh)" >&2
    exit 2
fi
have() { [[ "$("$VENV/bin/python" -m pip show "$1" 2>/dev/null)" == *$'\nVersion: '"$2"$'\n'* ]]; }
if ! have ruff "$RUFF_VERSION" || ! have mypy "$MYPY_VERSION"; then
    echo "[lint] installing ruff==$RUFF_VERSION mypy==$MYPY_VERSION into $VENV"
    "$VENV/bin/python" -m pip install -q -c requirements/lock.txt "ruff==$RUFF_VERSION" "mypy==$MYPY_VERSION"
fi

status=0
run() {
    echo "[lint] $*"
    "$@" || status=1
}
run "$VENV/bin/ruff" check "${LINTED[@]}"
run "$VENV/bin/ruff" format --check "${FORMATTED[@]}"
run "$VENV/bin/mypy" "${TYPED[@]}"
if [ "$status" -ne 0 ]; then
    echo "[lint] FAILED (fix the findings above; \`ruff check --fix\` and \`ruff format PATH\` do the mechanical ones)" >&2
else
    echo "[lint] all passed"
fi
exit "$status"
