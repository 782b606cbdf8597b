#!/usr/bin/env bash
# CUDA checks that need no GPU.
#
#   (a) compile every csrc/cuda/*.cu to PTX for sm_80 and sm_90 and check the float math: no FMA
#       (fma.*.f32) anywhere, division and sqrt only in their correctly rounded .rn forms, no
#       approximate transcendental instructions;
#   (b) in a separate venv with a CUDA build of torch (default ~/.cache/hosl/venv-cuda, or $HOSL_CUDA_VENV;
#       created if missing: pip install torch==2.14.1 from the local index, ~5.5 GB), build the whole
#       extension in a temporary copy of the repository and import hosl._C_cuda (no GPU needed).
#
# Usage: .ci/check_cuda.sh [--ptx-only]
# Environment: CUDA_HOME (default: the real folder behind `nvcc` on PATH), HOSL_CUDA_VENV,
#              HOSL_CUDA_TORCH (default torch==2.14.1), MAX_JOBS (parallel compile jobs, default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HOSL_CUDA_VENV:-$HOME/.cache/hosl/venv-cuda}"
TORCH_SPEC="${HOSL_CUDA_TORCH:-torch==2.14.1}"
export MAX_JOBS="${MAX_JOBS:-2}"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# The toolkit's own folder: /usr/local/bin/nvcc may be a wrapper script, from which torch would
# guess CUDA_HOME wrongly; the real nvcc is the one `nvcc --version`'s toolkit ships.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [[ -x "$candidate/bin/nvcc" ]]; then CUDA_HOME="$(readlink -f "$candidate")"; break; fi
  done
fi
[[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || fail "no CUDA toolkit found; set CUDA_HOME"
export CUDA_HOME
NVCC="$CUDA_HOME/bin/nvcc"
echo "CUDA_HOME=$CUDA_HOME ($("$NVCC" --version | grep -o 'release [0-9.]*'))"

# ---------------------------------------------------------------------------------------------
step "(a) PTX of csrc/cuda/*.cu for sm_80 and sm_90: no FMA, correctly rounded div/sqrt"
t0=$(date +%s)
PTX_DIR="$(mktemp -d)"
trap 'rm -rf "$PTX_DIR"' EXIT
shopt -s nullglob
cu_files=("$ROOT"/csrc/cuda/*.cu)
(( ${#cu_files[@]} )) || fail "no csrc/cuda/*.cu files"
for cu in "${cu_files[@]}"; do
  for arch in 80 90; do
    ptx="$PTX_DIR/$(basename "$cu" .cu).sm_$arch.ptx"
    # the flags of setup.py's NVCC_FLAGS that matter for the math
    "$NVCC" -O3 -std=c++17 -fmad=false --prec-div=true --prec-sqrt=true -I"$ROOT/csrc" \
      -arch="compute_$arch" -ptx "$cu" -o "$ptx"
    fma=$(grep -cE '\bfma\.[a-z.]*f32\b' "$ptx" || true)
    approx=$(grep -cE '\b(div\.(approx|full)|sqrt\.approx|rcp\.approx|rsqrt|lg2|ex2|sin\.approx|cos\.approx)' "$ptx" || true)
    div_rn=$(grep -cE '\bdiv\.rn\.f32\b' "$ptx" || true)
    sqrt_rn=$(grep -cE '\bsqrt\.rn\.f32\b' "$ptx" || true)
    printf '  %-28s sm_%s: fma.f32=%s approx=%s div.rn.f32=%s sqrt.rn.f32=%s\n' \
      "$(basename "$cu")" "$arch" "$fma" "$approx" "$div_rn" "$sqrt_rn"
    (( fma == 0 )) || fail "$(basename "$cu") sm_$arch: fused multiply-add in the PTX"
    (( approx == 0 )) || fail "$(basename "$cu") sm_$arch: approximate float instruction in the PTX"
    (( div_rn > 0 && sqrt_rn > 0 )) || fail "$(basename "$cu") sm_$arch: no div.rn.f32/sqrt.rn.f32 (direction math missing?)"
  done
done
echo "PTX checks passed ($(elapsed "$t0"))"
[[ "${1:-}" == "--ptx-only" ]] && exit 0

# ---------------------------------------------------------------------------------------------
step "(b1) CUDA torch venv at $VENV"
t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating it: python3 -m venv + pip install $TORCH_SPEC numpy setuptools wheel ninja (several GB from local disk)"
  mkdir -p "$(dirname "$VENV")" && python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy setuptools wheel ninja
else
  echo "already has a CUDA torch; skipping the install"
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "venv ready ($(elapsed "$t0"))"

# ---------------------------------------------------------------------------------------------
step "(b2) build hosl (hosl._C + hosl._C_cuda) in a temporary copy"
t0=$(date +%s)
BUILD_DIR="$(mktemp -d)"
trap 'rm -rf "$PTX_DIR" "$BUILD_DIR"' EXIT
# sources only: no .git, no build outputs of the working tree
tar -C "$ROOT" --exclude=.git --exclude=build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=.pytest_cache --exclude=.benchmarks -cf - . | tar -C "$BUILD_DIR" -xf -
# the two archs the PTX checks above cover (setup.py's default would be every arch this torch has)
(cd "$BUILD_DIR" && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" \
  "$VENV/bin/python" setup.py build_ext --inplace > build.log 2>&1) \
  || { grep -E -m 30 'error|Error' "$BUILD_DIR/build.log"; tail -5 "$BUILD_DIR/build.log"; fail "build failed"; }
grep -E '^hosl:' "$BUILD_DIR/build.log" || true
ls "$BUILD_DIR"/hosl/_C*.so
echo "build done ($(elapsed "$t0"))"

# ---------------------------------------------------------------------------------------------
step "(b3) import hosl._C_cuda without a GPU"
(cd "$BUILD_DIR" && "$VENV/bin/python" - <<'EOF'
import torch
import hosl._C_cuda as ext
from hosl.ops.backends import cuda as backend
print("imported", ext.__file__)
print("functions:", sorted(n for n in dir(ext) if not n.startswith("_")))
print("torch.cuda.is_available():", torch.cuda.is_available())
print("backend available:", backend.is_available(), "-", backend.unavailable_reason() or "ok")
EOF
) || fail "import failed"
echo
echo "check_cuda.sh: all checks passed"
