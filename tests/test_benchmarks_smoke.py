"""The benchmark scripts run end to end on tiny configurations and write consistent JSON.

No timing or memory figure is asserted against a threshold (benchmarks are benchmarks); what is
checked is that each figure is what it says: timings positive and finite, a speedup the ratio of
the two timings it reports, a peak the sum of its parts, pass counts those of the variant.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 120) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_memory_script_tiny(tmp_path):
    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    run_script("memory.py", "--tiny", "--json", str(out), "--plot", str(png), "--fo-sl-leanest", "2",
               "--fo-sl-fused-step", timeout=300)
    data = json.loads(out.read_text())
    assert set(data) == {"tiny-opt", "details", "meta"}
    assert set(data["tiny-opt"]) == {"fo-sl", "zo-sl", "hosl", "floor"}
    assert all(isinstance(v, int) for v in data["tiny-opt"].values())
    for mode, row in data["details"]["tiny-opt"].items():
        assert {"peak", "weights", "gradients", "optimizer_state", "scratch", "activations", "batch",
                "seq", "dtype"} <= set(row), mode
        assert row["peak"] == data["tiny-opt"].get(mode, row["peak"])
        assert sum(row[k] for k in ("weights", "gradients", "optimizer_state", "scratch", "activations")) == row["peak"]
    details = data["details"]["tiny-opt"]
    # the lean FO-SL rows (hosl/training/lean_fo_client.py): what each ran, and the gradients it held
    lean, fused = details["fo-sl-lean-m2"], details["fo-sl-fused"]
    assert (lean["micro_batch"], lean["checkpointing"], lean["fused_step"]) == (2, True, True)
    assert lean["gradients"] == lean["weights"]  # accumulated over the slices
    assert (fused["micro_batch"], fused["fused_step"], fused["gradients"]) == (4, True, 0)  # freed inside backward
    # the commit and clean-tree flag of the code that ran (hosl/provenance.py)
    from hosl.provenance import checkout_state

    here = checkout_state(ROOT)
    assert {k: data["meta"]["provenance"][k] for k in ("commit", "dirty")} == {k: here[k] for k in ("commit", "dirty")}
    assert details["fo-sl"]["gradients"] == details["fo-sl"]["weights"]  # one gradient per fp32 weight
    assert details["fo-sl"]["optimizer_state"] == details["fo-sl"]["weights"]  # SGD momentum
    assert details["hosl"]["scratch"] > 0 and details["hosl"]["gradients"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_step_script_tiny(tmp_path):
    out = tmp_path / "step.json"
    run_script("step.py", "--tiny", "--variants", "mezo,hosl,hosl-qb,hosl-linear,fo-sl", "--json", str(out))
    data = json.loads(out.read_text())
    assert set(data) == {f"{v}/q{q}" for v in ("mezo", "hosl", "hosl-qb", "hosl-linear", "fo-sl") for q in (1, 2)} | {"meta"}
    timing = ("step_s", "client_forward", "server_forward", "server_backward", "perturb_update", "fwd_equiv")
    for key in ("mezo/q1", "hosl/q2", "fo-sl/q2"):
        row = data[key]
        assert all(isinstance(row[k], float) and math.isfinite(row[k]) and row[k] >= 0 for k in timing), key
        assert row["step_s"] > 0
    for q in (1, 2):  # every speedup is the positive finite ratio of the two step times it compares
        for v in ("hosl", "hosl-qb", "hosl-linear", "fo-sl"):
            speedup = data[f"{v}/q{q}"]["speedup_vs_mezo"]
            assert math.isfinite(speedup) and speedup > 0
            assert speedup == pytest.approx(data[f"mezo/q{q}"]["step_s"] / data[f"{v}/q{q}"]["step_s"], rel=1e-12)
        assert "speedup_vs_mezo" not in data[f"mezo/q{q}"]
    # Q=2, central: 5 client passes; batched: all 4 perturbed points in one forward; linear: one server pass
    assert data["hosl-qb/q2"]["query_batch_used"] == 4 and data["hosl-qb/q2"]["passes"]["client_fwd"] == 5
    assert data["hosl/q2"]["passes"]["server_fwd"] == 5 and data["hosl-linear/q2"]["passes"]["server_fwd"] == 1
    assert data["hosl-linear/q2"]["bytes_up"] == 3 / 5 * data["hosl/q2"]["bytes_up"]  # Q+1 vs 2Q+1 activations
    assert data["meta"]["model"] == "tiny-opt"


@pytest.mark.parametrize("script", ["direction_kernels.py"])
def test_kernel_script_small(tmp_path, script):
    out = tmp_path / "kernels.json"
    run_script(script, "--numel", "4096", "--tensors", "2", "--repeats", "1", "--json", str(out))
    data = json.loads(out.read_text())
    for case in ("perturb", "perturb_out", "update_q1", "update_q10"):
        row = data[case]
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("hosl_ns", "mezo_ns", "roof_ns")), case
        assert row["speedup_vs_mezo"] == pytest.approx(row["mezo_ns"] / row["hosl_ns"], rel=1e-12)
        assert row["hosl_over_roof"] == pytest.approx(row["hosl_ns"] / row["roof_ns"], rel=1e-12)


def test_kernel_script_times_only_the_cases_asked_for(tmp_path):
    """--cases (what scripts/gpu_check.sh's rademacher stage passes): only those rows, per backend;
    an unknown case is refused before anything is timed or written."""
    out = tmp_path / "kernels.json"
    run_script("direction_kernels.py", "--numel", "1000", "--tensors", "1", "--repeats", "1",
               "--cases", "perturb_rademacher,update_q10_rademacher", "--json", str(out))
    assert set(json.loads(out.read_text())) == {"perturb_rademacher", "update_q10_rademacher", "meta"}
    bad = tmp_path / "bad.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "direction_kernels.py"), "--cases",
                           "perturb,rademacher", "--json", str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--cases: unknown rademacher" in proc.stderr and not bad.exists()


def test_linear_script_refuses_a_family_without_a_kernel(tmp_path):
    """--families takes the families with kernels of their own other than the Gaussian (which always
    runs); lowrank has --ranks. Refused before anything is timed or written."""
    out = tmp_path / "linear.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perturbed_linear.py"), "--device", "cpu",
                           "--families", "rademacher,lowrank", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--families: lowrank is not one of" in proc.stderr and not out.exists()


def test_kernel_script_names_cpu_model_and_forced_isa(tmp_path):
    """--isa forces the SIMD variant of the C++ kernels; meta (and so docs/results.md rows) names it
    and the CPU model."""
    cpu = pytest.importorskip("hosl.ops.backends.cpu")
    if not cpu.is_available():
        pytest.skip(cpu.unavailable_reason())
    out = tmp_path / "kernels.json"
    run_script("direction_kernels.py", "--isa", "scalar", "--numel", "1000", "--tensors", "1", "--repeats", "1",
               "--json", str(out))
    meta = json.loads(out.read_text())["meta"]
    assert meta["cpu_isa"] == "scalar"
    assert meta["cpu_model"] == cpu.cpu_model() and meta["cpu_model"]
    assert meta["threads"] == 1


@pytest.mark.slow
def test_message_auth_script_tiny(tmp_path):
    out = tmp_path / "auth.json"
    run_script("message_auth.py", "--hidden", "16", "--batch-size", "2", "--max-length", "4", "--queries", "1",
               "--repeats", "1", "--json", str(out))
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"none", "mac", "encrypt"}
    copies, tokens = 3, 2 * 4  # 2Q+1 activations of batch x sequence x hidden fp32, the mask, the labels
    assert data["config"]["payload_bytes_per_step"] > copies * tokens * 16 * 4 + tokens * 8
    for mode, row in data["modes"].items():
        assert math.isfinite(row["total_s"]) and row["total_s"] >= 0, mode
        assert row["total_s"] == pytest.approx(row["seal_s"] + row["open_s"])


def test_step_directions_option_keys_each_family_apart():
    step = load_benchmark("step")
    assert step.parse_direction("gaussian") == {"direction": "gaussian"}
    assert step.parse_direction("lowrank:4") == {"direction": "lowrank", "rank": 4}
    assert [step.direction_tag(d) for d in ("gaussian", "lowrank:1", "lowrank:4")] == ["", "/lowrank-r1", "/lowrank-r4"]
