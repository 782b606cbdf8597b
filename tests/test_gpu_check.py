"""scripts/gpu_check.sh --dry-run: the GPU check's whole sequence on CPU at tiny sizes, so it cannot rot.

Runs the script once (module fixture) with OUT in a temporary folder and checks what each stage
wrote: OUT holds summary.json, gpu-results.tgz and gpu_check-tail.log only; in the archive every stage
listed in summary.json with its status, the JSON of each benchmark present with positive finite
figures; and scripts/gpu_report.py turning the folder (through the archive) into Markdown.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["build", "info", "rademacher", "step", "memory", "tests", "linear", "kernels"]

pytest.importorskip("triton")


OUT_FILES = {"summary.json", "gpu-results.tgz", "gpu_check-tail.log"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(the archive unpacked, the finished process); OUT itself is the folder ``gpu-results`` beside it."""
    base = tmp_path_factory.mktemp("gpu-check")
    out, unpacked = base / "gpu-results", base / "unpacked"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself for the dry run
    env.pop("HOSL_GPU_BUDGET_S", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    unpacked.mkdir()
    if (out / "gpu-results.tgz").exists():
        with tarfile.open(out / "gpu-results.tgz") as tar:
            tar.extractall(unpacked)
    return unpacked, proc


@pytest.mark.slow
def test_out_holds_the_archive_summary_and_log_tail(dry_run):
    unpacked, proc = dry_run
    out = unpacked.parent / "gpu-results"
    assert {p.name for p in out.iterdir()} == OUT_FILES, proc.stdout[-3000:]
    assert (out / "summary.json").read_text() == (unpacked / "summary.json").read_text()
    tail = (out / "gpu_check-tail.log").read_text()
    assert "stage kernels: ok" in tail and len(tail.splitlines()) <= 300


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_stage_ran_and_passed(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["ok"] is True
    assert [s["name"] for s in summary["stages"]] == STAGES
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status == {"build": "skipped", **{s: "ok" for s in STAGES[1:]}}
    for s in summary["stages"][1:]:
        assert (out / s["log"]).stat().st_size > 0, s["name"]
    assert "stage kernels: ok" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
def test_info_reports_the_interpreted_triton_backend(dry_run):
    info = json.loads((dry_run[0] / "info.json").read_text())
    assert info["device"] == "cpu" and info["triton_interpret"] == "1"
    assert {"reference", "cpu", "triton"} <= set(info["backends"])
    from hosl.provenance import checkout_state

    here = checkout_state(ROOT)  # git in a checkout, else its GIT_COMMIT file (a copy of the tree)
    assert (info["git_commit"], info["git_dirty"], info["commit_source"]) == (
        here["commit"], here["dirty"], here["commit_source"])


@pytest.mark.slow
def test_tests_stage_collected_the_gpu_tests(dry_run):
    tests = json.loads((dry_run[0] / "tests.json").read_text())
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0 and tests["failed"] == []
    assert tests["skipped"] == tests["tests"]  # no GPU here: every GPU-marked test skips, none is deselected silently


@pytest.mark.slow
def test_rademacher_stage_times_only_the_rademacher_kernels(dry_run):
    data = json.loads((dry_run[0] / "rademacher.json").read_text())
    cases = ["perturb_rademacher", "perturb_out_rademacher", "update_q1_rademacher", "update_q10_rademacher"]
    assert set(data) == {"meta", *cases, *(c + "[triton]" for c in cases)}
    for case in cases:
        assert _positive_finite(data[case + "[triton]"]["roof_fraction"]), case


@pytest.mark.slow
def test_kernel_figures(dry_run):
    data = json.loads((dry_run[0] / "kernels.json").read_text())
    assert data["meta"]["backends"] == ["cpu", "triton"]
    for case in ("perturb", "update_q10", "perturb[triton]", "update_q10[triton]"):
        row = data[case]
        for key in ("hosl_gbps", "mezo_gbps", "roof_gbps", "roof_fraction", "speedup_vs_mezo"):
            assert _positive_finite(row[key]), (case, key, row[key])
        assert math.isclose(row["roof_fraction"], row["hosl_gbps"] / row["roof_gbps"])


@pytest.mark.slow
def test_linear_figures(dry_run):
    data = json.loads((dry_run[0] / "linear.json").read_text())
    rows = {k: v for k, v in data.items() if k != "meta"}
    directions = {v["directions"] for v in rows.values()}
    assert directions == {1, 4}
    for d in directions:
        for case in ("clean", "triton", "triton/shared", "cpu", "lowrank-r1", "lowrank-r4", "lowrank-r4/shared",
                     "triton-rademacher", "triton-rademacher/shared", "cpu-rademacher"):
            row = rows[f"float32/32x48/D{d}/{case}"]
            assert _positive_finite(row["seconds"]) and _positive_finite(row["tflops"])
        assert rows[f"float32/32x48/D{d}/clean"]["over_clean"] == 1.0


@pytest.mark.slow
def test_step_figures(dry_run):
    data = json.loads((dry_run[0] / "step-tiny-opt.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["model"] == "tiny-opt"
    steps = {k: v for k, v in data.items() if k != "meta"}
    variants = load_benchmark("step").VARIANTS
    assert set(steps) == {f"{v}/q2" for v in variants}  # one run per model, every variant of step.py
    for key, row in steps.items():
        assert _positive_finite(row["step_s"]), key
    assert steps["hosl-qb/q2"]["query_batch_used"] == 4  # D = 2Q
    assert steps["hosl-linear/q2"]["server_estimate"] == "linear"
    assert steps["hosl-linear-client/q2"]["linear_on"] == "client"
    assert all(_positive_finite(steps[f"{v}/q2"]["vs_hosl"]) for v in variants if v != "hosl")


@pytest.mark.slow
def test_memory_figures(dry_run):
    data = json.loads((dry_run[0] / "memory.json").read_text())
    assert data["meta"]["device"] == "cpu"
    assert set(data["tiny-opt"]) == {"fo-sl", "hosl"}
    assert all(isinstance(v, int) and v > 0 for v in data["tiny-opt"].values())


@pytest.mark.slow
def test_report_renders_the_folder(dry_run):
    out = dry_run[0].parent / "gpu-results"  # the packed folder: the report reads its archive
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_report.py"), str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = proc.stdout
    assert md.startswith("## GPU")
    for heading in ("Stages", "Rademacher kernels (one Philox word per 32 coordinates)", "Direction kernels",
                    "Perturbed linear", "Step time", "Client memory"):
        assert f"### {heading}" in md, heading
    assert "| update_q10 |" in md and "| tiny-opt |" in md
    assert "| update_q10_rademacher | triton |" in md
    assert "| tiny-opt | 2x8 | hosl-qb | 2 | 4 |" in md


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--only", "nonsense"], cwd=ROOT,
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown stage nonsense" in proc.stderr


@pytest.mark.slow
def test_a_spent_budget_skips_stages_and_still_packs(tmp_path):
    """HOSL_GPU_BUDGET_S: a stage with no time left is not started (no-time, a failure), and the
    archive is written all the same."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, HOSL_GPU_BUDGET_S="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--only", "info"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s["name"]: s["status"] for s in summary["stages"]}["info"] == "no-time" and summary["ok"] is False
    assert {p.name for p in tmp_path.iterdir()} == OUT_FILES
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                         env=dict(env, HOSL_GPU_BUDGET_S="soon"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "HOSL_GPU_BUDGET_S must be whole seconds" in bad.stderr

