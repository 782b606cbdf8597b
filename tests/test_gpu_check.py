"""scripts/gpu_check.sh --dry-run: the GPU check's whole sequence on CPU at tiny sizes, so it cannot rot.

Runs the script once (module fixture) with OUT in a temporary folder and checks what each stage
wrote: every stage listed in summary.json with its status, the JSON of each benchmark present with
positive finite figures, and scripts/gpu_report.py turning the folder into Markdown.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["build", "info", "tests", "kernels", "linear", "step", "memory"]

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-results")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself for the dry run
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return out, proc


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


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
    assert "stage memory: ok" in (out / "gpu_check.log").read_text()


def test_info_reports_the_interpreted_triton_backend(dry_run):
    info = json.loads((dry_run[0] / "info.json").read_text())
    assert info["device"] == "cpu" and info["triton_interpret"] == "1"
    assert {"reference", "cpu", "triton"} <= set(info["backends"])


def test_tests_stage_collected_the_gpu_tests(dry_run):
    tests = json.loads((dry_run[0] / "tests.json").read_text())
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0 and tests["failed"] == []
    assert tests["skipped"] == tests["tests"]  # no GPU here: every GPU-marked test skips, none is deselected silently


def test_kernel_figures(dry_run):
    data = json.loads((dry_run[0] / "kernels.json").read_text())
    assert data["meta"]["backends"] == ["cpu", "triton"]
    for case in ("perturb", "update_q10", "perturb[triton]", "update_q10[triton]"):
        row = data[case]
        for key in ("hosl_gbps", "mezo_gbps", "roof_gbps", "roof_fraction", "speedup_vs_mezo"):
            assert _positive_finite(row[key]), (case, key, row[key])
        assert math.isclose(row["roof_fraction"], row["hosl_gbps"] / row["roof_gbps"])


def test_linear_figures(dry_run):
    data = json.loads((dry_run[0] / "linear.json").read_text())
    rows = {k: v for k, v in data.items() if k != "meta"}
    directions = {v["directions"] for v in rows.values()}
    assert directions == {1, 4}
    for d in directions:
        for case in ("clean", "triton", "triton/shared", "cpu"):
            row = rows[f"float32/32x48/D{d}/{case}"]
            assert _positive_finite(row["seconds"]) and _positive_finite(row["tflops"])
        assert rows[f"float32/32x48/D{d}/clean"]["over_clean"] == 1.0


def test_step_figures(dry_run):
    data = json.loads((dry_run[0] / "step-tiny-opt.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["model"] == "tiny-opt"
    steps = {k: v for k, v in data.items() if k != "meta"}
    assert {"mezo/q2", "hosl/q2"} <= set(steps)
    for key, row in steps.items():
        assert _positive_finite(row["step_s"]), key


def test_memory_figures(dry_run):
    data = json.loads((dry_run[0] / "memory.json").read_text())
    assert data["meta"]["device"] == "cpu"
    assert set(data["tiny-opt"]) == {"fo-sl", "hosl"}
    assert all(isinstance(v, int) and v > 0 for v in data["tiny-opt"].values())


def test_report_renders_the_folder(dry_run):
    out = dry_run[0]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_report.py"), str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = proc.stdout
    assert md.startswith("## GPU")
    for heading in ("Stages", "Direction kernels", "Perturbed linear", "Step time", "Client memory"):
        assert f"### {heading}" in md, heading
    assert "| update_q10 |" in md and "| tiny-opt |" in md


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--only", "nonsense"], cwd=ROOT,
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown stage nonsense" in proc.stderr
