"""benchmarks/time_to_accuracy.py: recipes, targets and time-to-target on synthetic curves, and one
end-to-end run on tiny-opt (three recipes as processes; JSON, table and PNG; nothing rerun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")

tta = load_benchmark("time_to_accuracy")


def _curve(points):
    """(step, accuracy, seconds) -> curve points at 5 client forwards per step."""
    return [{"step": s, "accuracy": a, "client_forwards": 5 * s, "seconds": t} for s, a, t in points]


def test_targets_are_the_baseline_plus_fractions_of_the_reference_gain():
    levels = tta.targets(0.70, 0.80)
    assert list(levels) == ["+50%", "+90%"]
    assert levels["+50%"] == pytest.approx(0.75) and levels["+90%"] == pytest.approx(0.79)
    assert tta.targets(0.80, 0.80) == {} and tta.targets(0.80, 0.75) == {}  # no gain: no target
    assert tta.targets(None, 0.8) == {} and tta.targets(0.7, None) == {}


def test_first_reaching_takes_the_first_evaluation_at_or_above_the_target():
    curve = _curve([(0, 0.5, 0.0), (50, 0.74, 10.0), (100, 0.76, 20.0), (150, 0.73, 30.0), (200, 0.79, 40.0)])
    assert tta.first_reaching(curve, 0.75) == {"step": 100, "accuracy": 0.76, "client_forwards": 500, "seconds": 20.0}
    assert tta.first_reaching(curve, 0.79)["step"] == 200  # exactly the target counts
    assert tta.first_reaching(curve, 0.5)["step"] == 0
    assert tta.first_reaching(curve, 0.80) is None
    assert tta.first_reaching(list(reversed(curve)), 0.75)["step"] == 100  # by step, whatever the order


def test_curve_points_count_client_forwards_and_fall_back_to_step_seconds():
    history = [{"step": 0, "eval_accuracy": 0.5, "seconds": 0.0}, {"step": 2, "eval_accuracy": 0.6},
               {"step": 4, "eval_accuracy": 0.7, "seconds": 9.0}]
    points = tta.curve_points(history, 5, {0: 0.0, 2: 4.5, 4: 8.0})
    assert [p["client_forwards"] for p in points] == [0, 10, 20]
    assert [p["seconds"] for p in points] == [0.0, 4.5, 9.0]  # the record's own seconds win
    assert tta.curve_points(history, 1)[1]["seconds"] is None


def test_report_table_gives_steps_forwards_seconds_or_not_reached():
    runs = [{"recipe": "frozen", "seed": 0, "status": "done", "curve": _curve([(0, 0.5, 0.0), (100, 0.70, 5.0)]),
             "final_accuracy": 0.70},
            {"recipe": "fo-sl", "seed": 0, "status": "done", "curve": _curve([(0, 0.5, 0.0), (100, 0.80, 9.0)]),
             "final_accuracy": 0.80},
            {"recipe": "hosl", "seed": 0, "status": "done",
             "curve": _curve([(0, 0.5, 0.0), (50, 0.76, 30.0), (100, 0.77, 60.0)]), "final_accuracy": 0.77}]
    levels = tta.targets(tta.final_mean(runs, "frozen"), tta.final_mean(runs, "fo-sl"))
    for r in tta.with_targets(runs, levels):
        r.update(forward_passes_per_step={"client_forward": 5}, best_accuracy=max(p["accuracy"] for p in r["curve"]),
                 seconds=r["curve"][-1]["seconds"], commits=["0123456789abcdef"], dirty=r["recipe"] == "hosl")
    report = {"targets": {"levels": levels}, "recipes": {"frozen": "--mode frozen-client", "fo-sl": "--mode fo-sl",
                                                         "hosl": "--mode hosl"}, "runs": runs}
    rows = {line.split(" | ")[0].strip("| "): line for line in tta.table_lines(report)[2:]}
    assert "to +50% (75.0%)" in tta.table_lines(report)[0] and "to +90% (79.0%)" in tta.table_lines(report)[0]
    assert "| 50 / 250 / 30 | not reached | 77.0 | 77.0 | 60 | 0123456 +dirty |" in rows["hosl"]
    assert "| 100 / 500 / 9 | 100 / 500 / 9 | 80.0 |" in rows["fo-sl"]
    assert "| not reached | not reached | 70.0 |" in rows["frozen"] and rows["frozen"].endswith("| 0123456 |")


@pytest.mark.parametrize("text, message", [
    ("hosl --mode hosl", "expected NAME="),
    ("bad/name=--mode hosl", "must match"),
    ("x=mode hosl", "expected a --flag"),
    ("x=--mode hosl --cut 3", "--cut is set by this script"),
    ("x=--out somewhere", "--out is set by this script"),
    ("x=--mode 'hosl", "cannot split"),
    ("x=--mode hosl --mode fo-sl", "--mode given twice"),
])
def test_bad_recipes_are_refused_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        tta.parse_recipe(text)


def test_recipe_flags_parse_values_switches_and_equals():
    recipe = tta.parse_recipe('hosl-lr1e-4=--mode hosl --lr-client=1e-4 --lora --lora-targets "q,v"')
    assert recipe.name == "hosl-lr1e-4"
    assert recipe.flags == {"mode": "hosl", "lr_client": "1e-4", "lora": True, "lora_targets": "q,v"}


def _args(*extra):
    return tta.build_parser().parse_args(["--out", "o", "--model", "tiny-opt", "--task", "sst2", "--cut", "1",
                                          "--steps", "2", "--eval-every", "1", *extra])


def test_configure_checks_recipes_against_hosl_train_and_finds_the_roles():
    with pytest.raises(ValueError, match="no --recipe"):
        tta.configure(_args())
    with pytest.raises(ValueError, match="--recipe x: hosl train refuses these flags: .*invalid choice: 'nope'"):
        tta.configure(_args("--recipe", "x=--mode nope"))
    with pytest.raises(ValueError, match="refuses these flags: .*--no-such-flag"):
        tta.configure(_args("--recipe", "x=--mode hosl --no-such-flag 1"))
    with pytest.raises(ValueError, match="two recipes share a name"):
        tta.configure(_args("--recipe", "a=--mode hosl", "--recipe", "a=--mode fo-sl"))
    with pytest.raises(ValueError, match="--train-args: --steps is set by this script"):
        tta.configure(_args("--recipe", "a=--mode hosl", "--train-args", "--steps 3"))
    with pytest.raises(ValueError, match="all run --mode fo-sl: name the reference with --reference"):
        tta.configure(_args("--recipe", "a=--mode fo-sl", "--recipe", "b=--mode fo-sl --lr-client 1e-2"))
    with pytest.raises(ValueError, match="--baseline 'zz' is not a recipe"):
        tta.configure(_args("--recipe", "a=--mode fo-sl", "--baseline", "zz"))
    setting, recipes, cells, roles = tta.configure(_args(
        "--seeds", "0,1", "--train-args", "--batch-size 2", "--recipe", "fz=--mode frozen-client",
        "--recipe", "fo=--mode fo-sl", "--recipe", "h=--mode hosl"))
    assert roles == {"baseline": "fz", "reference": "fo"}
    assert [c.id for c in cells][:3] == ["tiny-opt/sst2/full/cut1/fz/s0", "tiny-opt/sst2/full/cut1/fo/s0",
                                         "tiny-opt/sst2/full/cut1/h/s0"] and len(cells) == 6
    assert cells[-1].flags == {"batch_size": "2", "mode": "hosl", "model": "tiny-opt", "task": "sst2", "cut": 1,
                               "steps": 2, "eval_every": 1, "seed": 1}


@pytest.mark.slow
@needs_data
def test_runs_recipes_as_processes_and_writes_json_table_and_png(tmp_path):
    out = tmp_path / "tta"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--out", str(out),
           "--model", "tiny-opt", "--task", "sst2", "--cut", "1", "--steps", "4", "--eval-every", "2",
           "--train-args", f"--data-dir {DATA} --batch-size 2 --train-size 8 --eval-size 8 --max-length 32 "
                           "--num-queries 1 --lr-server 1e-2",
           "--recipe", "frozen=--mode frozen-client", "--recipe", "fo-sl=--mode fo-sl --lr-client 1e-2",
           "--recipe", "hosl=--mode hosl --lr-client 1e-3", "--progress-every", "0"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)  # a loaded machine
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "3 runs, 3 to run" in first.stdout

    report = json.loads((out / "time_to_accuracy.json").read_text())
    runs = {r["recipe"]: r for r in report["runs"]}
    assert list(runs) == ["frozen", "fo-sl", "hosl"] and all(r["status"] == "done" for r in runs.values())
    for name, per_step in (("frozen", 1), ("fo-sl", 1), ("hosl", 3)):  # hosl: 1 + 2Q client forwards, Q=1
        curve = runs[name]["curve"]
        assert [p["step"] for p in curve] == [0, 2, 4]
        assert [p["client_forwards"] for p in curve] == [0, 2 * per_step, 4 * per_step]
        assert curve[0]["seconds"] == 0.0 and curve[-1]["seconds"] == pytest.approx(runs[name]["seconds"])
        assert curve[1]["seconds"] > 0
        assert all(p["accuracy"] * 8 == round(p["accuracy"] * 8) for p in curve)  # right answers of 8
        assert runs[name]["final_accuracy"] == curve[-1]["accuracy"]
        assert runs[name]["best_accuracy"] == max(p["accuracy"] for p in curve)
        summary = json.loads((Path(runs[name]["run_dir"]) / "summary.json").read_text())
        assert summary["eval_history"][-1]["eval_accuracy"] == curve[-1]["accuracy"]
        assert not (Path(runs[name]["run_dir"]) / "checkpoints").exists()  # finished: pruned
    t = report["targets"]
    assert (t["baseline"], t["reference"]) == ("frozen", "fo-sl")
    assert t["baseline_final"] == runs["frozen"]["final_accuracy"]
    assert t["levels"] == tta.targets(runs["frozen"]["final_accuracy"], runs["fo-sl"]["final_accuracy"])
    for r in runs.values():
        assert r["to_target"] == {k: tta.first_reaching(r["curve"], v) for k, v in t["levels"].items()}
    p = report["provenance"]
    assert p["threads"] == 1 and p["cpu"] and "--recipe" in p["command"] and "dirty" in p
    cell = json.loads((Path(runs["hosl"]["run_dir"]) / "cell.json").read_text())
    assert cell["runs"][0]["commit"] == p["commit"] and cell["flags"]["lr_client"] == "1e-3"

    table = (out / "time_to_accuracy.md").read_text()
    assert "| hosl | 0 | `--mode hosl --lr-client 1e-3` | 3 |" in table
    final = f"{100 * runs['hosl']['final_accuracy']:.1f}"
    assert f"| {final} | {100 * runs['hosl']['best_accuracy']:.1f} |" in table
    assert runs["hosl"]["commits"] == [p["commit"] or "unknown"]
    if t["levels"]:
        assert "to +50% (" in table
    else:
        assert "No targets:" in table
    png = (out / "time_to_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "3 runs, 0 to run (3 done before)" in again.stdout
