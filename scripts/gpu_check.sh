#!/usr/bin/env bash
# Everything in hosl that needs a CUDA GPU, in one command, in a few minutes (single GPU, H200 class).
#
#   HOSL_GPU_BUDGET_S=570 PYTHON=python3 bash scripts/gpu_check.sh     # the run on a lent GPU machine
#   bash scripts/gpu_check.sh              # on a GPU machine of your own
#   bash scripts/gpu_check.sh --dry-run    # the same sequence on CPU at tiny sizes (Triton interpreter; CI)
#   bash scripts/gpu_check.sh --only tests,step      # some stages only (e.g. to rerun what failed)
#
# Stages, in this order (each under `timeout`; a failing stage is recorded and the next one runs; the
# exit status is non-zero when any stage failed). The order puts first what no GPU run has measured
# yet (rademacher, step, memory) and last what a short budget can most afford to lose (the tests' cold Triton
# compiles take ~5 min; kernels and linear were measured on 2026-11-30, docs/results.md "GPU"):
#   build    python setup.py build_ext --inplace: hosl._C and hosl._C_cuda for this GPU's arch
#            (TORCH_CUDA_ARCH_LIST defaults to the device's compute capability; MAX_JOBS to nproc)
#   info     torch / device / backends; fails unless the cuda and triton backends are available
#   rademacher  benchmarks/direction_kernels.py --cases (the Rademacher perturb, perturb into out,
#            update Q=1 and Q=10) for the cuda and triton backends against the copy roof, GB/s: the
#            kernels that draw one Philox word per 32 coordinates (2026-12-07), never timed on a GPU;
#            seconds, so it runs before the long stages
#   step     benchmarks/step.py --device cuda, OPT-125M and OPT-1.3B (random weights), 16x128, cut 5,
#            Q=10: one run per model (one model build) of every step variant: MeZO-style, sequential
#            exact (hosl), server-batched, batched exact (D = 2Q and auto), linear (both placements),
#            FO-SL; step-<model>.json
#   memory   benchmarks/memory.py --device cuda: client max_memory_allocated, FO-SL vs HOSL vs the floor,
#            OPT-125M and OPT-1.3B, batch 64, seq 256
#   tests    pytest of the tests that need CUDA for real: CUDA kernels, Triton compiled (not
#            interpreted), perturbed linear/embedding, fused forward on CUDA, cpu == cuda == triton
#            == reference (tests/test_backend_identity.py; the lowrank family's in tests/test_lowrank.py);
#            the dry run collects them and runs the GPU-marked ones, which skip
#   linear   benchmarks/perturbed_linear.py: fused perturbed linear vs F.linear on clean weights, D=1 and 2Q,
#            2048 rows per direction, and the lowrank family's x W^T + s (x V) U^T at ranks 1 and 4 (one
#            GEMM over the D x 2048 rows + a rank-R term per direction) against the same clean rows;
#            and 2048x2048 at 16, 64 and 256 rows (linear-rows<N>.json; these with the Rademacher family too)
#   kernels  benchmarks/direction_kernels.py --device cuda: hosl (cuda, triton) vs MeZO-style vs the copy roof, GB/s
#
# Output under $OUT (default gpu-results/), three files (the device tool brings back only a handful):
# summary.json (stages with status/rc/seconds), gpu-results.tgz (everything: <stage>.json per stage,
# tests.xml, logs/<stage>.log, gpu_check.log, summary.json) and gpu_check-tail.log (the log's last 300
# lines). `tar xzf gpu-results.tgz` unpacks it; scripts/gpu_report.py reads the folder or the archive
# and prints the Markdown of docs/results.md's "GPU" section.
#
# HOSL_GPU_BUDGET_S: wall-clock seconds for the whole run (default: none). Stage timeouts are cut to
# what is left (30 s kept for the summary and the archive); a stage with under 30 s left is not
# started (status no-time, counted as a failure). Set it below the device tool's per-command limit
# so the archive is always written. Cold, the tests stage takes ~5 min (Triton compiles every kernel
# specialisation; ~45 s warm): with pytest-xdist installed it runs on 8 workers.
#
# Python: $PYTHON, else python3. It must have a CUDA build of torch with triton, transformers,
# safetensors, numpy, pyyaml and pytest (nothing is downloaded when it does). Where it has no CUDA
# torch and a package registry is reachable, HOSL_GPU_PIP_INSTALL=1 makes a venv (.venv-gpu) and
# pip-installs torch and those packages first.
# The dry run uses $PYTHON (else .venv/bin/python, else python3) with hosl installed; no build.
# info.json records the commit and whether the tree was clean: from git, or where the copy has no
# .git, from a GIT_COMMIT file: run `python -m hosl.provenance --write` in the checkout before copying.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
ONLY=""
STAGE=""   # internal: run one stage's function in this process (what run_stage calls under `timeout`)
ARGS=("$@")
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --_stage) STAGE="$2"; shift ;;
    --only) ONLY="${2:?--only needs a comma-separated list of stages}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --only STAGES, --help)" >&2; exit 2 ;;
  esac
  shift
done

ALL_STAGES="build info rademacher step memory tests linear kernels"
if [[ -n "$ONLY" ]]; then
  for s in ${ONLY//,/ }; do
    [[ " $ALL_STAGES " == *" $s "* ]] || { echo "gpu_check.sh: --only: unknown stage $s (stages: $ALL_STAGES)" >&2; exit 2; }
  done
fi

BUDGET="${HOSL_GPU_BUDGET_S:-0}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: HOSL_GPU_BUDGET_S must be whole seconds, got $BUDGET" >&2; exit 2; }

OUT="${OUT:-gpu-results}"
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
export OUT
LOG="$OUT/gpu_check.log"
STAGES_TSV="$OUT/stages.tsv"
if [[ -z "$STAGE" ]]; then
  : > "$STAGES_TSV"
  : > "$LOG"
  exec > >(tee -a "$LOG") 2>&1
fi

say() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
START=$(date +%s)

# --------------------------------------------------------------------------------------------------
# Python and the environment
# --------------------------------------------------------------------------------------------------
if ((DRY)); then
  PY="${PYTHON:-}"
  [[ -z "$PY" && -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"
  PY="${PY:-python3}"
  export TRITON_INTERPRET=1          # Triton kernels on CPU tensors
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  DEVICE=cpu
else
  PY="${PYTHON:-python3}"
  unset TRITON_INTERPRET             # compiled Triton, never the interpreter
  DEVICE=cuda
  if [[ -z "$STAGE" ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null; then
    if [[ "${HOSL_GPU_PIP_INSTALL:-0}" == 1 ]]; then
      say "$PY has no CUDA torch with a visible GPU; HOSL_GPU_PIP_INSTALL=1: making .venv-gpu from the registry"
      python3 -m venv "$ROOT/.venv-gpu" && PY="$ROOT/.venv-gpu/bin/python" \
        && "$PY" -m pip install -q torch triton "transformers>=4.46" safetensors numpy pyyaml pytest peft setuptools ninja \
        || { say "FAILED: could not install a CUDA torch into .venv-gpu"; exit 3; }
    else
      say "FAILED: $PY has no CUDA build of torch or no GPU is visible (torch.cuda.is_available() is False)."
      say "Set PYTHON to an interpreter with a CUDA torch, or HOSL_GPU_PIP_INSTALL=1 where a registry is reachable."
      exit 3
    fi
  fi
fi
export PYTHON="$PY"
if [[ -z "$STAGE" ]]; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the in-place build (hosl/_C*.so) of this tree
  say "mode: $( ((DRY)) && echo dry-run || echo gpu ), python: $PY, out: $OUT"
fi

# sizes: the GPU run vs the dry run
if ((DRY)); then
  KERNEL_ARGS=(--device cpu --backends cpu,triton --numel 1024 --tensors 2 --repeats 1)
  LINEAR_ARGS=(--device cpu --backends triton,cpu --shapes 32x48 --tokens 8 --directions 1,4 --dtypes float32 --repeats 1
               --ranks 1,4 --families rademacher)
  STEP_MODELS=(tiny-opt:tiny-opt)
  STEP_ARGS=(--device cpu --cut 2 --batch 2 --seq 8 --queries 2 --repeats 1)
  MEMORY_ARGS=(--device cpu --models tiny-opt --dtypes float32 --batch 4 --seq 16 --cut 2 --threads 1 --modes fo-sl,hosl)
  TEST_FILTER=(-m gpu)    # collect everything, run the GPU-marked tests (they skip without a GPU)
  T_BUILD=60 T_INFO=60 T_RADEMACHER=120 T_TESTS=120 T_KERNELS=120 T_LINEAR=60 T_STEP=180 T_MEMORY=120
else
  KERNEL_ARGS=(--device cuda --numel $((1 << 24)) --tensors 16 --repeats 10)
  LINEAR_ARGS=(--device cuda --repeats 10 --ranks 1,4)
  STEP_MODELS=(opt-125m:opt-125m-random opt-1.3b:opt-1.3b-random)
  STEP_ARGS=(--device cuda --cut 5 --batch 16 --seq 128 --queries 10 --repeats 1 --threads "$(nproc)")
  MEMORY_ARGS=(--device cuda --models opt-125m,opt-1.3b --dtypes float32 --batch 64 --seq 256 --cut 5 --modes fo-sl,hosl,floor)
  TEST_FILTER=(-k "not test_ptx")  # the PTX checks need nvcc only and run in CI already
  # cold, the Triton JIT compiles dominate: spread them over processes where pytest-xdist exists
  if "$PY" -c 'import xdist' 2>/dev/null; then TEST_FILTER+=(-n 8); fi
  T_BUILD=300 T_INFO=60 T_RADEMACHER=90 T_TESTS=420 T_KERNELS=120 T_LINEAR=120 T_STEP=300 T_MEMORY=240
fi
TEST_FILES=(tests/test_cuda_kernels.py tests/test_backend_identity.py tests/test_triton_backend.py
            tests/test_perturbed_linear.py tests/test_perturbed_embedding.py tests/test_fused_forward.py
            tests/test_lowrank.py::test_every_backend_gives_the_reference_bits)
# (tests/test_triton_compile.py compiles for sm_90 without a GPU: it runs in CI, not here)

# --------------------------------------------------------------------------------------------------
# stage runner: run_stage NAME TIMEOUT_S COMMAND...; status ok | failed | timeout | skipped
# --------------------------------------------------------------------------------------------------
FAILED=0
wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES_TSV"; }

run_stage() {
  local name="$1" limit="$2"
  if ! wanted "$name"; then record "$name" skipped 0 0; return 0; fi
  if ((BUDGET > 0)); then
    local left=$(( START + BUDGET - 30 - $(date +%s) ))
    if ((left < 30)); then
      FAILED=1; record "$name" no-time 0 0; say "stage $name: no-time (HOSL_GPU_BUDGET_S=$BUDGET spent)"; return 0
    fi
    ((left < limit)) && limit=$left
  fi
  local stage_log="$OUT/logs/$name.log" t0 rc status
  say "stage $name (timeout ${limit}s)"
  t0=$(date +%s)
  # the stage runs as this script with --_stage NAME, so `timeout` can stop it and all its children
  timeout --kill-after=15 "$limit" bash "$0" "${ARGS[@]}" --_stage "$name" 2>&1 | tee "$stage_log"
  rc=${PIPESTATUS[0]}
  local seconds=$(( $(date +%s) - t0 ))
  if ((rc == 0)); then status=ok; elif ((rc == 124 || rc == 137)); then status=timeout; else status=failed; fi
  [[ $status == ok ]] || FAILED=1
  record "$name" "$status" "$rc" "$seconds"
  say "stage $name: $status (rc $rc, ${seconds}s)"
}

# --------------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------------
stage_build() {
  if [[ -z "${CUDA_HOME:-}" ]]; then
    local nvcc
    nvcc="$(command -v nvcc || true)"
    if [[ -n "$nvcc" ]]; then CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"; fi
    for candidate in /usr/local/cuda /usr/local/cuda-13.0; do
      [[ -z "${CUDA_HOME:-}" && -x "$candidate/bin/nvcc" ]] && CUDA_HOME="$(readlink -f "$candidate")"
    done
  fi
  [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || { echo "no nvcc found: set CUDA_HOME"; return 1; }
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  fi
  export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c 'import hosl._C_cuda as m; print("built", m.__file__)'
}

stage_info() {
  "$PY" - "$OUT/info.json" "$DEVICE" <<'EOF'
import json, os, platform, subprocess, sys

import torch

import hosl
from hosl import ops
# what `hosl info` prints (hosl.cli itself is not imported: it pulls in the task code and `datasets`)
print(f"hosl {hosl.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
print(f"backends available: {', '.join(ops.available_backends())}")
for name, why in ops.unavailable_reasons().items():
    print(f"  {name}: not available ({why})")

out, device = sys.argv[1], sys.argv[2]
info = {
    "device": device,
    "device_name": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
    "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
    "hosl": hosl.__version__, "backends": ops.available_backends(), "unavailable": ops.unavailable_reasons(),
    "triton_interpret": os.environ.get("TRITON_INTERPRET"), "cpus": os.cpu_count(),
}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
# the commit and clean-tree flag: git where it is, else the GIT_COMMIT file a copy of the tree carries
# (python -m hosl.provenance --write, run in the checkout before copying it; hosl/provenance.py)
from hosl.provenance import checkout_state
state = checkout_state()
info["git_commit"], info["git_dirty"], info["commit_source"] = state["commit"], state["dirty"], state["commit_source"]
if device == "cuda":
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                        capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        info["driver"] = None
json.dump(info, open(out, "w"), indent=2)
print(json.dumps(info, indent=2))
need = ["cuda", "triton"] if device == "cuda" else ["cpu", "triton"]
missing = [b for b in need if b not in info["backends"]]
if missing:
    sys.exit(f"backends missing: {missing} ({info['unavailable']})")
EOF
}

stage_tests() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider -rfEs "${TEST_FILTER[@]}" --junitxml "$OUT/tests.xml" "${TEST_FILES[@]}" || rc=$?
  "$PY" - "$OUT/tests.xml" "$OUT/tests.json" "$rc" <<'EOF' || rc=1
import json, sys
import xml.etree.ElementTree as ET

xml_path, out, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
root = ET.parse(xml_path).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
failed = []
for case in suite.iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        failed.append(f"{case.get('classname')}::{case.get('name')}")
counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
json.dump({**counts, "failed": failed, "pytest_rc": rc, "seconds": float(suite.get("time", 0))}, open(out, "w"), indent=2)
print("tests:", counts)
EOF
  return $rc
}

RADEMACHER_CASES=perturb_rademacher,perturb_out_rademacher,update_q1_rademacher,update_q10_rademacher
stage_rademacher() {
  "$PY" benchmarks/direction_kernels.py "${KERNEL_ARGS[@]}" --cases "$RADEMACHER_CASES" --json "$OUT/rademacher.json"
}

stage_kernels() {
  "$PY" benchmarks/direction_kernels.py "${KERNEL_ARGS[@]}" --json "$OUT/kernels.json"
}

stage_linear() {
  local rc=0 rows
  "$PY" benchmarks/perturbed_linear.py "${LINEAR_ARGS[@]}" --json "$OUT/linear.json" || rc=1
  # few rows per direction, where the optimizer still picks the fused kernel on CUDA (up to 64 rows,
  # hosl.ops.dispatch.FUSED_LINEAR_MAX_ROWS): measures that threshold, and the fused Rademacher tile
  if ((!DRY)); then
    for rows in 16 64 256; do
      "$PY" benchmarks/perturbed_linear.py "${LINEAR_ARGS[@]}" --shapes 2048x2048 --tokens "$rows" \
        --families rademacher --json "$OUT/linear-rows$rows.json" || rc=1
    done
  fi
  return $rc
}

stage_step() {
  local rc=0 label model variants
  # every variant benchmarks/step.py has (its VARIANTS); hosl-qb runs D = 2Q, hosl-auto the D it picks
  variants="$(PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import step; print(",".join(step.VARIANTS))')" || return 1
  for item in "${STEP_MODELS[@]}"; do
    label="${item%%:*}" model="${item#*:}"
    "$PY" benchmarks/step.py "${STEP_ARGS[@]}" --model "$model" --variants "$variants" \
      --json "$OUT/step-$label.json" || rc=1
  done
  return $rc
}

stage_memory() {
  "$PY" benchmarks/memory.py "${MEMORY_ARGS[@]}" --json "$OUT/memory.json"
}

if [[ -n "$STAGE" ]]; then
  "stage_$STAGE"
  exit $?
fi

if ((DRY)); then
  record build skipped 0 0
  say "stage build: skipped (dry run: uses the installed hosl)"
else
  run_stage build "$T_BUILD"
fi
run_stage info "$T_INFO"
run_stage rademacher "$T_RADEMACHER"
run_stage step "$T_STEP"
run_stage memory "$T_MEMORY"
run_stage tests "$T_TESTS"
run_stage linear "$T_LINEAR"
run_stage kernels "$T_KERNELS"

# --------------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, rc, seconds = line.split("\t")
    stages.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                   "log": f"logs/{name}.log" if status != "skipped" else None,
                   "json": sorted(p.name for p in out.glob(f"{name}*.json"))})
summary = {"mode": "dry-run" if dry else "gpu", "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
           "seconds": int(time.time()) - start, "ok": all(s["status"] in ("ok", "skipped") for s in stages),
           "stages": stages}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
for s in stages:
    print(f"  {s['name']:<8} {s['status']:<8} {s['seconds']:>4}s  {' '.join(s['json'])}")
EOF
say "done in $(( $(date +%s) - START ))s; $( ((FAILED)) && echo 'SOME STAGES FAILED' || echo 'all stages passed')"

# --------------------------------------------------------------------------------------------------
# one archive of what this script wrote; beside it only summary.json and the log's tail
# --------------------------------------------------------------------------------------------------
pack_out() {
  local items=() item
  for item in summary.json stages.tsv gpu_check.log tests.xml logs "$OUT"/*.json; do
    item="${item#"$OUT"/}"
    [[ -e "$OUT/$item" && " ${items[*]} " != *" $item "* ]] && items+=("$item")
  done
  tail -n 300 "$LOG" > "$OUT/gpu_check-tail.log"
  # tar's status 1 is "a file changed while read" (the log, still being written): not a failure
  tar -C "$OUT" -czf "$OUT/gpu-results.tgz" "${items[@]}"
  (( $? <= 1 )) || return 1
  for item in "${items[@]}"; do
    [[ "$item" == summary.json ]] || rm -rf "${OUT:?}/$item"
  done
}
if pack_out; then
  say "results: $OUT/gpu-results.tgz (all), $OUT/summary.json, $OUT/gpu_check-tail.log"
else
  say "could not write $OUT/gpu-results.tgz; results left unpacked in $OUT"; FAILED=1
fi
exit $FAILED
