"""benchmarks/accuracy.py: grid expansion, cells as processes, tables, resumability, provenance.

The end-to-end test runs two 2-step tiny-opt cells (zero-shot and HOSL) as separate processes,
then runs the same grid again and checks that nothing is rerun; then marks the HOSL cell superseded
and checks that the tables say so and that the next run reruns that cell only.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_git = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


grid = load_benchmark("accuracy")

TINY = {
    "description": "tiny smoke grid",
    "defaults": {"model": "tiny-opt", "data_dir": str(DATA), "cut": 1, "num_queries": 1, "steps": 2,
                 "batch_size": 2, "train_size": 4, "eval_size": 4, "max_length": 32, "lr_client": 1e-3,
                 "lr_server": 1e-2},
    "models": ["tiny-opt"],
    "tasks": ["sst2"],
    "variants": {"full": {}, "bogus": {"no_such_flag": 1}},
    "modes": ["zero-shot", "hosl"],
    "seeds": [0],
    "rules": [{"when": {"variant": "bogus", "mode": "zero-shot"}, "skip": "not needed"}],
}


def test_expand_merges_flags_in_order_and_applies_rules():
    config = {
        "defaults": {"steps": 10, "lr-client": 1.0},
        "models": {"m": {"model": "tiny-opt", "cut": 2}},
        "tasks": {"sst2": {"steps": 20}},
        "variants": {"full": {}, "lora": {"lora": True}},
        "modes": {"zero-shot": {}, "hosl": {"lr_client": 2.0}, "fo-sl-small-lr": {"mode": "fo-sl"}},
        "cuts": [1, 3],
        "seeds": [0, 1],
        "rules": [{"when": {"variant": "lora", "mode": "hosl"}, "set": {"eps": 5e-3}},
                  {"when": {"variant": "lora", "mode": "zero-shot"}, "skip": "same as full"}],
    }
    cells = {c.id: c for c in grid.expand(config)}
    assert len(cells) == 1 * 1 * 2 * 2 * 2 * 3
    assert cells["m/sst2/full/cut1/fo-sl-small-lr/s0"].flags["mode"] == "fo-sl"  # a label naming its mode
    hosl = cells["m/sst2/lora/cut3/hosl/s1"]
    assert hosl.flags["model"] == "tiny-opt" and hosl.flags["cut"] == 3 and hosl.flags["steps"] == 20
    assert hosl.flags["lr_client"] == 2.0 and hosl.flags["eps"] == 5e-3 and hosl.flags["lora"] is True
    assert hosl.flags["mode"] == "hosl" and hosl.flags["seed"] == 1 and hosl.skip is None
    zs = cells["m/sst2/full/cut1/zero-shot/s0"]
    assert zs.flags["steps"] == 0 and zs.flags["mode"] == "fo-sl" and "eps" not in zs.flags
    assert cells["m/sst2/lora/cut1/zero-shot/s0"].skip == "same as full"
    assert [c.id for c in grid.select(list(cells.values()), "m/sst2/full/*/hosl/s0")] == [
        "m/sst2/full/cut1/hosl/s0", "m/sst2/full/cut3/hosl/s0"]
    argv = grid.cli_argv("py", hosl.flags)
    assert argv[:4] == ["py", "-m", "hosl.cli", "train"] and "--lora" in argv and "--lr-client" in argv
    with pytest.raises(ValueError, match="set by the runner"):
        grid.expand({**config, "defaults": {"out": "x"}})


CONFIGS = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_give_valid_train_commands(path):
    """Every cell a shipped config would run parses with ``hosl train``'s own parser and validates."""
    from hosl import cli, cli_options

    parser = cli.build_parser()
    cells = [c for c in grid.expand(grid.load_config(path)) if c.skip is None]
    assert cells, f"{path.name} runs no cell"
    for cell in cells:
        args = parser.parse_args(grid.cli_argv("python", cell.flags)[3:])
        config = cli_options.config_from(args)
        config.validate()
        assert config.model == cell.flags["model"] and config.task == cell.axes["task"], cell.id
        assert config.steps == (0 if cell.axes["mode"] == "zero-shot" else cell.flags["steps"]), cell.id


def test_paper_config_uses_the_authors_zo_settings():
    """paper.yaml's ZO halves: per-layer normalised (sphere) directions, central differences, Q=10,
    plain ZO-SGD; the flags reach ``hosl train`` and resolve to those values."""
    from hosl import cli, cli_options

    cells = [c for c in grid.expand(grid.load_config(ROOT / "benchmarks" / "configs" / "paper.yaml"))
             if c.skip is None and c.axes["mode"] in ("hosl", "zo-sl")]
    assert cells
    for cell in cells:
        argv = grid.cli_argv("python", cell.flags)
        assert argv[argv.index("--direction") + 1] == "sphere", cell.id
        config = cli_options.config_from(cli.build_parser().parse_args(argv[3:]))
        assert (config.direction, config.difference, config.num_queries, config.zo_optimizer, config.batch_size,
                config.cut) == ("sphere", "central", 10, "sgd", 64, 5), cell.id
        lora = cell.axes["variant"] == "lora"
        assert (config.resolved_lr_client(), config.resolved_eps()) == ((5e-5, 5e-3) if lora else (1e-6, 1e-3))


def test_cpu_config_covers_what_the_accuracy_issue_asks_for():
    """Both offline models on all six tasks in every compared mode (seed 0); MiniLM with two seeds."""
    cells = {c.id: c for c in grid.expand(grid.load_config(ROOT / "benchmarks" / "configs" / "cpu.yaml"))}
    for model in ("minilm-l6", "smollm2-135m"):
        for task in ("sst2", "rte", "cb", "boolq", "wsc", "wic"):
            for mode in ("zero-shot", "fo-sl", "zo-sl", "hosl"):
                seeds = (0, 1) if model == "minilm-l6" else (0,)
                for seed in seeds:
                    cell = cells[f"{model}/{task}/full/{mode}/s{seed}"]
                    assert cell.skip is None, (cell.id, cell.skip)
    # the same examples and passes per step for every trained mode of a (model, task, seed)
    for model in ("minilm-l6", "smollm2-135m"):
        budgets = {(cells[f"{model}/sst2/full/{m}/s0"].flags["steps"], cells[f"{model}/sst2/full/{m}/s0"].flags["batch_size"])
                   for m in ("fo-sl", "zo-sl", "hosl")}
        assert len(budgets) == 1, (model, budgets)


def test_status_marks_partial_and_stale_cells(tmp_path):
    cell = grid.expand({**TINY, "variants": ["full"], "modes": ["hosl"]})[0]
    run_dir = grid.cell_dir(tmp_path, cell)
    assert grid.cell_status(tmp_path, cell, set(), {})[0] == "pending"
    (run_dir / "checkpoints" / "step-1").mkdir(parents=True)
    assert grid.cell_status(tmp_path, cell, set(), {})[0] == "partial"
    (run_dir / "summary.json").write_text(json.dumps({"eval_accuracy": 0.5, "steps": 2}))
    (run_dir / "cell.json").write_text(json.dumps({"flags": {**cell.flags, "steps": 3}}))
    status, note, _ = grid.cell_status(tmp_path, cell, set(), {})
    assert status == "stale" and "steps" in note


def _git(*args) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


@needs_git
def test_superseded_means_some_run_lacks_the_fix(tmp_path):
    """A cell is superseded when a run of it was on a commit that does not contain the fix, or on an
    unknown commit; a cell the rule's ``when`` does not match never is."""
    head, parent = _git("rev-parse", "HEAD"), _git("rev-parse", "HEAD~1")
    cell = grid.expand({**TINY, "variants": ["full"], "modes": ["zo-sl"]})[0]
    run_dir = grid.cell_dir(tmp_path, cell)
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"eval_accuracy": 0.5, "steps": 2}))
    rules = grid.supersessions({"superseded": [{"when": {"mode": "zo-sl"}, "before": head, "reason": "tied"}]}, None)

    def status(runs):
        (run_dir / "cell.json").write_text(json.dumps({"flags": cell.flags, "runs": runs}))
        return grid.cell_status(tmp_path, cell, set(), {}, rules)[:2]

    assert status([{"commit": head}]) == ("done", "")
    assert status([{"commit": parent}]) == ("superseded", "tied")  # before the fix
    assert status([{"commit": parent}, {"commit": head}]) == ("superseded", "tied")  # resumed across it
    assert status([]) == ("superseded", "tied")  # run before commits were recorded
    assert status([{"commit": None}]) == ("superseded", "tied")
    other = grid.supersessions({"superseded": [{"when": {"mode": "fo-sl"}, "before": head}]}, None)
    (run_dir / "cell.json").write_text(json.dumps({"flags": cell.flags, "runs": [{"commit": parent}]}))
    assert grid.cell_status(tmp_path, cell, set(), {}, other)[0] == "done"
    # --stale-before applies to every cell; the fix's parent is contained in HEAD
    assert grid.cell_status(tmp_path, cell, set(), {}, grid.supersessions({}, parent))[0] == "done"
    assert grid.cell_status(tmp_path, cell, set(), {}, grid.supersessions({}, head))[0] == "superseded"
    with pytest.raises(ValueError, match=r"superseded\[0\]\.before: 'no-such-commit' is not a commit"):
        grid.supersessions({"superseded": [{"before": "no-such-commit"}]}, None)
    with pytest.raises(ValueError, match="superseded\\[0\\] needs 'before'"):
        grid.supersessions({"superseded": [{"when": {"mode": "zo-sl"}}]}, None)
    with pytest.raises(ValueError, match="--stale-before: 'no-such-commit'"):
        grid.supersessions({}, "no-such-commit")
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(TINY))
    assert grid.main(["--config", str(config), "--out", str(tmp_path / "o"), "--report-only",
                      "--stale-before", "no-such-commit"]) == 2


@needs_data
@pytest.mark.slow
def test_grid_runs_cells_as_processes_writes_tables_and_resumes(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "grid"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--config", str(config), "--out", str(out)]
    planned = subprocess.run(cmd + ["--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr[-2000:]
    assert "- pending: 2 cells:" in (out / "results.md").read_text()
    assert not list(out.glob("cells/**/summary.json"))  # a report runs nothing

    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "2 to run" in first.stdout

    summaries = sorted(out.glob("cells/**/summary.json"))
    assert [p.parent.relative_to(out / "cells").as_posix() for p in summaries] == [
        "tiny-opt/sst2/full/hosl/s0", "tiny-opt/sst2/full/zero-shot/s0"]
    zero_shot = json.loads((out / "cells/tiny-opt/sst2/full/zero-shot/s0/summary.json").read_text())
    assert zero_shot["steps"] == 0 and zero_shot["train_examples"] == 0 and len(zero_shot["eval_history"]) == 1
    assert not (out / "cells/tiny-opt/sst2/full/hosl/s0/checkpoints").exists()  # finished: pruned

    # provenance: the checkout's commit, whether it was dirty, and the config the flags resolve to
    record = json.loads((out / "cells/tiny-opt/sst2/full/hosl/s0/cell.json").read_text())
    (run,) = record["runs"]
    if (ROOT / ".git").exists():
        assert len(run["commit"]) == 40 and _git("merge-base", "--is-ancestor", run["commit"], "HEAD") == ""
        assert isinstance(run["dirty"], bool) and run["resumed"] is False
    config = record["config"]
    assert (config["mode"], config["num_queries"], config["steps"], config["cut"]) == ("hosl", 1, 2, 1)
    assert config["lr_client"] == 1e-3 and config["lr_server"] == 1e-2
    assert config["eps"] == 1e-3 and config["eval_every"] == 1  # defaults hosl train derives, filled in
    assert not {"out", "resume", "overwrite"} & set(config)  # the runner's, not the cell's

    rows = {r["id"]: r for r in csv.DictReader(open(out / "cells.csv"))}
    assert rows["tiny-opt/sst2/full/hosl/s0"]["status"] == "done"
    assert rows["tiny-opt/sst2/full/hosl/s0"]["commit"] == (run["commit"] or "unknown")
    assert json.loads(rows["tiny-opt/sst2/full/hosl/s0"]["config"]) == config
    assert rows["tiny-opt/sst2/bogus/hosl/s0"]["commit"] == "" and rows["tiny-opt/sst2/bogus/hosl/s0"]["config"] == ""
    assert rows["tiny-opt/sst2/full/hosl/s0"]["train_examples"] == "4"  # 2 steps x batch 2
    assert rows["tiny-opt/sst2/full/hosl/s0"]["client_forward_total"] == "6"  # 2 x (1 + 2Q), Q=1
    assert rows["tiny-opt/sst2/bogus/hosl/s0"]["status"] == "unavailable"
    assert rows["tiny-opt/sst2/bogus/zero-shot/s0"]["status"] == "skipped"
    from hosl.tasks.sampling import sample_task

    labels = [example["label"] for example in sample_task("sst2", DATA, 4, 4, seed=0).eval]
    majority = max(labels.count(v) for v in set(labels)) / len(labels)
    assert float(rows["tiny-opt/sst2/full/hosl/s0"]["majority_accuracy"]) == pytest.approx(majority)
    assert rows["tiny-opt/sst2/full/hosl/s0"]["eval_examples"] == str(len(labels))
    assert rows["tiny-opt/sst2/full/hosl/s0"]["verdict"] == grid.learnt_verdict(
        float(rows["tiny-opt/sst2/full/hosl/s0"]["eval_accuracy"]), majority, len(labels))
    assert rows["tiny-opt/sst2/bogus/hosl/s0"]["eval_examples"] == rows["tiny-opt/sst2/bogus/hosl/s0"]["verdict"] == ""
    table = (out / "results.md").read_text()
    assert f"| tiny-opt | sst2 | full | {100 * majority:.1f} |" in table
    assert "| tiny-opt | sst2 | full |" in table and "not run" in table and "--no-such-flag not available" in table
    assert (out / "results.csv").exists()
    assert "pending" not in table  # the legend for pending cells only when some are

    # the client-size plot reads the same cells
    plot = load_benchmark("client_size")
    assert plot.main(["--runs", str(out), "--model", "tiny-opt", "--out", str(tmp_path / "curves.png"),
                      "--window", "1", "--last", "2"]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    # its table names each row's cell and the commit that cell ran on
    text = plot.table(plot.collect([out], None, "tiny-opt", "sst2", "full"), 2)
    assert f"| `tiny-opt/sst2/full/hosl/s0` | {(run['commit'] or 'unknown')[:10]} | {config['dropout']} |" in text

    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 to run" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in summaries} == stamps

    if not (ROOT / ".git").exists():
        return
    # the HOSL cell ran before a fix: a cell run before commits were recorded (no "runs") is superseded
    hosl_json = out / "cells/tiny-opt/sst2/full/hosl/s0/cell.json"
    hosl_json.write_text(json.dumps({k: v for k, v in record.items() if k != "runs"}))
    marked = tmp_path / "marked.json"
    marked.write_text(json.dumps({**TINY, "superseded": [
        {"when": {"mode": "hosl"}, "before": run["commit"], "reason": "tied-direction baseline"}]}))
    cmd_marked = cmd[:3] + [str(marked)] + cmd[4:]
    report = subprocess.run(cmd_marked + ["--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    rows = {r["id"]: r for r in csv.DictReader(open(out / "cells.csv"))}
    assert rows["tiny-opt/sst2/full/hosl/s0"]["status"] == "superseded"
    assert rows["tiny-opt/sst2/full/hosl/s0"]["note"] == "tied-direction baseline"
    assert rows["tiny-opt/sst2/full/zero-shot/s0"]["status"] == "done"
    table = (out / "results.md").read_text()
    hosl_acc = 100 * float(rows["tiny-opt/sst2/full/hosl/s0"]["eval_accuracy"])
    assert f"{hosl_acc:.1f} (1 seed) ‡ |" in table  # the number stays, marked
    assert "- tied-direction baseline: 1 cells: `tiny-opt/sst2/full/hosl/s0`" in table
    assert "rerun pending" in table
    (agg,) = [r for r in csv.DictReader(open(out / "results.csv")) if r["mode"] == "hosl" and r["variant"] == "full"]
    assert agg["superseded"] == "1"

    rerun = subprocess.run(cmd_marked, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "1 to run" in rerun.stdout and "superseded result moved to" in rerun.stdout
    (archived,) = list((out / "superseded/tiny-opt/sst2/full/hosl/s0").iterdir())
    assert (archived / "summary.json").exists() and "runs" not in json.loads((archived / "cell.json").read_text())
    rows = {r["id"]: r for r in csv.DictReader(open(out / "cells.csv"))}
    assert rows["tiny-opt/sst2/full/hosl/s0"]["status"] == "done"  # rerun on a commit with the fix
    assert (out / "cells/tiny-opt/sst2/full/zero-shot/s0/summary.json").stat().st_mtime_ns == stamps[
        out / "cells/tiny-opt/sst2/full/zero-shot/s0/summary.json"]


# --previous: cells whose folders are gone, reported from an earlier cells table

PREV_GRID = {**TINY, "variants": ["full"], "modes": ["fo-sl", "hosl"], "seeds": [0, 1]}


def _finish(out: Path, cell, accuracy: float, commit: str | None = None) -> None:
    """A finished cell in ``out``, as the runner leaves it."""
    run_dir = grid.cell_dir(out, cell)
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"eval_accuracy": accuracy, "steps": 2, "seconds": 1.0}))
    runs = [{"commit": commit, "dirty": False}] if commit else []
    (run_dir / "cell.json").write_text(json.dumps({"flags": cell.flags, "runs": runs}))


NEW_COLUMNS = ("eval_examples", "verdict")  # cells tables written before the verdict lack them


def _previous_csv(path: Path, rows: dict[str, tuple[str, float | None]], commit: str | None = None,
                  extra: dict | None = None) -> Path:
    """A cells table as an earlier run wrote it (no commit column, like docs/accuracy-cpu.csv, unless given;
    no eval_examples or verdict column unless ``extra`` gives them, with a value for every row)."""
    left_out = ("commit", "dirty", "config") + tuple(c for c in NEW_COLUMNS if c not in (extra or {}))
    columns = [c for c in grid.CELL_COLUMNS if c not in left_out]
    columns += ["commit"] if commit else []
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for cell_id, (status, accuracy) in rows.items():
            writer.writerow({"id": cell_id, "status": status, "eval_accuracy": "" if accuracy is None else accuracy,
                             "majority_accuracy": 0.5, "steps": 2, "seconds": 3.0, "commit": commit or "",
                             **(extra or {})})
    return path


def _report(tmp_path: Path, config: dict, *extra: str) -> tuple[dict, str]:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(config))
    assert grid.main(["--config", str(path), "--out", str(tmp_path / "out"), "--report-only", *extra]) == 0
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "out" / "cells.csv"))}
    return rows, (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_previous_rows_fill_cells_without_a_result_and_lose_to_results_on_disk(tmp_path, capsys):
    cells = {c.id: c for c in grid.expand(PREV_GRID)}
    out = tmp_path / "out"
    _finish(out, cells["tiny-opt/sst2/full/hosl/s0"], 0.5)
    previous = _previous_csv(tmp_path / "earlier.csv", {
        "tiny-opt/sst2/full/hosl/s0": ("done", 0.9),      # on disk too: the disk wins
        "tiny-opt/sst2/full/hosl/s1": ("done", 0.7),
        "tiny-opt/sst2/full/fo-sl/s0": ("done", 0.4),
        "tiny-opt/sst2/full/fo-sl/s1": ("skipped", None),  # no result: stays pending
        "other/sst2/full/hosl/s0": ("done", 0.1),          # not a cell of this grid
    })
    rows, table = _report(tmp_path, PREV_GRID, "--previous", str(previous))
    source = previous.as_posix()

    assert rows["tiny-opt/sst2/full/hosl/s0"]["eval_accuracy"] == "0.5"
    assert (rows["tiny-opt/sst2/full/hosl/s0"]["status"], rows["tiny-opt/sst2/full/hosl/s0"]["note"]) == ("done", "")
    assert rows["tiny-opt/sst2/full/hosl/s1"]["eval_accuracy"] == "0.7"
    assert (rows["tiny-opt/sst2/full/hosl/s1"]["status"], rows["tiny-opt/sst2/full/hosl/s1"]["note"]) == (
        "done", f"from {source}")
    assert float(rows["tiny-opt/sst2/full/hosl/s1"]["majority_accuracy"]) == 0.5  # the earlier table's
    assert rows["tiny-opt/sst2/full/fo-sl/s0"]["status"] == "done"
    assert rows["tiny-opt/sst2/full/fo-sl/s1"]["status"] == "pending"
    assert "other/sst2/full/hosl/s0" not in rows

    # the aggregates merge both: HOSL over the disk's 50 and the earlier 70, FO-SL the earlier 40 alone
    assert "| 60.0 ± 14.1 [50.0–70.0] † | +20.0 |" in table
    assert "| 40.0 (1/2 seeds) † |" in table
    assert "90.0" not in table and "70.0 †" not in table
    assert (f"- from {source}: 2 cells: `tiny-opt/sst2/full/fo-sl/s0`, `tiny-opt/sst2/full/hosl/s1`" in table)
    assert "- pending: 1 cells: `tiny-opt/sst2/full/fo-sl/s1`" in table
    assert f"--previous {source}`" in table and f"; 2 from {source}" in table
    (agg,) = [r for r in csv.DictReader(open(out / "results.csv")) if r["mode"] == "hosl"]
    assert (agg["seeds_done"], agg["previous"], agg["superseded"]) == ("2", "1", "0")

    # without --previous the same folder has no result for those cells
    rows, table = _report(tmp_path, PREV_GRID)
    assert rows["tiny-opt/sst2/full/hosl/s1"]["status"] == "pending" and "†" not in table

    # a run is decided by the folder alone: --previous does not make a cell done
    capsys.readouterr()
    config = tmp_path / "grid.json"
    assert grid.main(["--config", str(config), "--out", str(out), "--dry-run", "--previous", str(previous)]) == 0
    assert "pending     tiny-opt/sst2/full/hosl/s1" in capsys.readouterr().out


@needs_git
@pytest.mark.slow
def test_previous_rows_under_a_superseded_rule_are_superseded(tmp_path, monkeypatch):
    """A row without a commit counts as run before every fix; one whose commit has the fix does not."""
    _stub_majority(monkeypatch, {0: (0.5, 500), 1: (0.5, 500)})
    head = _git("rev-parse", "HEAD")
    config = {**PREV_GRID, "superseded": [{"when": {"mode": "fo-sl"}, "before": head, "reason": "dropout on"}]}
    cells = {c.id: c for c in grid.expand(config)}
    _finish(tmp_path / "out", cells["tiny-opt/sst2/full/fo-sl/s1"], 0.6, commit=head)  # rerun with the fix
    old = _previous_csv(tmp_path / "old.csv", {"tiny-opt/sst2/full/fo-sl/s0": ("done", 0.4),
                                               "tiny-opt/sst2/full/hosl/s0": ("done", 0.8)})
    rows, table = _report(tmp_path, config, "--previous", str(old))
    fo = rows["tiny-opt/sst2/full/fo-sl/s0"]
    assert fo["status"] == "superseded" and fo["note"] == f"dropout on; from {old.as_posix()}"
    assert rows["tiny-opt/sst2/full/fo-sl/s1"]["status"] == "done"  # on disk, run with the fix
    assert rows["tiny-opt/sst2/full/hosl/s0"]["status"] == "done"  # no rule for HOSL
    assert "| 50.0 ± 14.1 [40.0–60.0] † ‡ |" in table  # the number stays, marked as a superseded cell's
    assert f"- dropout on; from {old.as_posix()}: 1 cells: `tiny-opt/sst2/full/fo-sl/s0`" in table
    assert "rerun pending" in table
    # the verdict section marks the cell as the main table does: from an earlier table, superseded
    assert "`tiny-opt/sst2/full/fo-sl/s0` 40.0 vs 50.0 (n=500) † ‡" in _verdict_lists(table)["Not learnt"]
    assert _verdict_lists(table)["Learnt"] == (  # the earlier table's HOSL cell, then the one on disk
        "- tiny-opt/sst2/full: `tiny-opt/sst2/full/hosl/s0` 80.0 vs 50.0 (n=500) †, "
        "`tiny-opt/sst2/full/fo-sl/s1` 60.0 vs 50.0 (n=500)\n")

    # a later table with the row's commit on the fix: not superseded (a later --previous wins)
    fixed = _previous_csv(tmp_path / "fixed.csv", {"tiny-opt/sst2/full/fo-sl/s0": ("done", 0.45)}, commit=head)
    rows, table = _report(tmp_path, config, "--previous", str(old), "--previous", str(fixed))
    fo = rows["tiny-opt/sst2/full/fo-sl/s0"]
    assert (fo["status"], fo["note"], fo["eval_accuracy"], fo["commit"]) == (
        "done", f"from {fixed.as_posix()}", "0.45", head)
    assert "‡" not in table


def test_previous_must_be_a_cells_table(tmp_path, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(PREV_GRID))
    cmd = ["--config", str(config), "--out", str(tmp_path / "out"), "--report-only", "--previous"]

    assert grid.main(cmd + [str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"--previous {tmp_path / 'missing.csv'}: ") and "No such file" in err
    assert err.count("\n") == 1

    aggregates = tmp_path / "results.csv"  # the per-group table: no id column
    aggregates.write_text("model,task,variant,cut,mode,seeds_done,accuracy_mean\ntiny-opt,sst2,full,,hosl,1,50.0\n")
    assert grid.main(cmd + [str(aggregates)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"--previous {aggregates}: no id, status, eval_accuracy column") and err.count("\n") == 1

    bad = _previous_csv(tmp_path / "bad.csv", {"tiny-opt/sst2/full/hosl/s0": ("done", 0.5)})
    bad.write_text(bad.read_text().replace(",0.5,", ",half,", 1))
    assert grid.main(cmd + [str(bad)]) == 2
    assert "--previous" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.md").exists()  # nothing written on an error


# did a cell learn its task: accuracy vs the majority rate, with a margin of two standard errors


def _stub_majority(monkeypatch, by_seed: dict[int, tuple[float | None, int | None]]) -> None:
    """Each seed's evaluation set: (majority share, size), as if sampled (no data read)."""
    monkeypatch.setattr(grid, "_majority", lambda task, data_dir, train_size, eval_size, seed: by_seed[seed])


def _verdict_lists(table: str) -> dict[str, str]:
    """The lists of results.md's verdict section by heading ("Learnt", "Not learnt", "Zero-shot cells"...)."""
    section = table.split("## Which cells learnt their task\n", 1)[1].split("\nBudget per run", 1)[0]
    out, heading = {}, None
    for line in section.splitlines():
        if line.endswith(":") and not line.startswith("- "):
            heading = line[:-1].split(" (")[0]
            out[heading] = ""
        elif line.startswith("- ") and heading:
            out[heading] += line + "\n"
    return out


def test_learnt_verdict_at_its_boundaries():
    v = grid.learnt_verdict
    assert grid.learnt_margin(500) == pytest.approx(0.0447, abs=1e-4)  # 4.5 points
    assert grid.learnt_margin(56) == pytest.approx(0.1336, abs=1e-4)  # 13.4 points
    for n in (56, 500):
        margin = grid.learnt_margin(n)
        assert v(0.5, 0.5, n) == "not learnt"  # exactly the majority rate
        assert v(0.4, 0.5, n) == "not learnt"
        assert v(0.5 + 1 / n, 0.5, n) == "not clearly learnt"  # one example above it
        assert v(0.5 + margin, 0.5, n) == "not clearly learnt"  # exactly at the margin
        assert v(0.5 + margin + 1e-6, 0.5, n) == "learnt"  # just above it
    # the same 10-point gap: learnt on 500 examples, not clearly on 56
    assert (v(0.6, 0.5, 500), v(0.6, 0.5, 56)) == ("learnt", "not clearly learnt")
    # CB's 56 examples: 8 above the majority's 28 is 14.3 points (learnt), 7 above is 12.5 (not clearly)
    assert (v(36 / 56, 28 / 56, 56), v(35 / 56, 28 / 56, 56)) == ("learnt", "not clearly learnt")
    assert v(66 / 104, 0.6346153846153846, 104) == "not learnt"  # the same rate computed two ways
    assert v(None, 0.5, 500) == v(0.6, None, 500) == v(0.6, 0.5, None) == v(0.6, 0.5, 0) == ""


VERDICT_GRID = {**PREV_GRID, "modes": ["zero-shot", "fo-sl", "hosl"]}


@pytest.mark.slow
def test_cells_csv_and_report_give_each_cell_its_verdict(tmp_path, monkeypatch):
    """eval_examples and verdict per cell in cells.csv; results.md lists each trained cell under its
    verdict and the zero-shot cells apart."""
    _stub_majority(monkeypatch, {0: (0.5, 500), 1: (0.5, 56)})
    cells = {c.id: c for c in grid.expand(VERDICT_GRID)}
    out = tmp_path / "out"
    for cell_id, accuracy in {"tiny-opt/sst2/full/fo-sl/s0": 0.55,   # +5.0 on 500: learnt
                              "tiny-opt/sst2/full/fo-sl/s1": 0.55,   # +5.0 on 56: not clearly
                              "tiny-opt/sst2/full/hosl/s0": 0.5,     # at the majority rate: not learnt
                              "tiny-opt/sst2/full/zero-shot/s0": 0.7}.items():  # hosl/s1 stays pending
        _finish(out, cells[cell_id], accuracy)
    rows, table = _report(tmp_path, VERDICT_GRID)

    columns = grid.CELL_COLUMNS
    assert columns[columns.index("majority_accuracy") + 1:][:2] == ["eval_examples", "verdict"]
    assert list(rows["tiny-opt/sst2/full/fo-sl/s0"]) == columns
    got = {i: (r["majority_accuracy"], r["eval_examples"], r["verdict"]) for i, r in rows.items()}
    assert got == {"tiny-opt/sst2/full/zero-shot/s0": ("0.5", "500", "learnt"),
                   "tiny-opt/sst2/full/fo-sl/s0": ("0.5", "500", "learnt"),
                   "tiny-opt/sst2/full/hosl/s0": ("0.5", "500", "not learnt"),
                   "tiny-opt/sst2/full/zero-shot/s1": ("", "", ""),  # pending: no result, no verdict
                   "tiny-opt/sst2/full/fo-sl/s1": ("0.5", "56", "not clearly learnt"),
                   "tiny-opt/sst2/full/hosl/s1": ("", "", "")}

    lists = _verdict_lists(table)
    assert list(lists) == ["Learnt", "Not clearly learnt", "Not learnt", "Zero-shot cells"]
    assert lists["Learnt"] == "- tiny-opt/sst2/full: `tiny-opt/sst2/full/fo-sl/s0` 55.0 vs 50.0 (n=500)\n"
    assert lists["Not clearly learnt"] == "- tiny-opt/sst2/full: `tiny-opt/sst2/full/fo-sl/s1` 55.0 vs 50.0 (n=56)\n"
    assert lists["Not learnt"] == "- tiny-opt/sst2/full: `tiny-opt/sst2/full/hosl/s0` 50.0 vs 50.0 (n=500)\n"
    assert lists["Zero-shot cells"] == (
        "- tiny-opt/sst2/full: `tiny-opt/sst2/full/zero-shot/s0` 70.0 vs 50.0 (n=500): learnt\n")
    assert "untrained reference" in table and "2·√(0.25/n)" in table
    # after the main table's footnotes, before the budget table
    assert table.index("| tiny-opt | sst2 | full |") < table.index("## Which cells") < table.index("Budget per run")

    # nothing to judge: no section
    (tmp_path / "empty").mkdir()
    rows, table = _report(tmp_path / "empty", VERDICT_GRID)
    assert "Which cells" not in table


@pytest.mark.slow
def test_previous_tables_without_the_new_columns_get_them(tmp_path, monkeypatch):
    """An earlier cells table without eval_examples/verdict: n from the cell's flags, the verdict by this
    script's rule; one with them: its n, the verdict recomputed; no data here: both empty, listed apart."""
    _stub_majority(monkeypatch, {0: (0.6, 500), 1: (0.6, 56)})
    old = _previous_csv(tmp_path / "old.csv", {"tiny-opt/sst2/full/hosl/s0": ("done", 0.6),
                                               "tiny-opt/sst2/full/hosl/s1": ("done", 0.6)})
    assert "eval_examples" not in old.read_text().splitlines()[0]
    rows, table = _report(tmp_path, PREV_GRID, "--previous", str(old))
    s0, s1 = rows["tiny-opt/sst2/full/hosl/s0"], rows["tiny-opt/sst2/full/hosl/s1"]
    # the table's majority rate (0.5) stays; n comes from the flags (seed 0: 500, seed 1: 56)
    assert (s0["majority_accuracy"], s0["eval_examples"], s0["verdict"]) == ("0.5", "500", "learnt")
    assert (s1["majority_accuracy"], s1["eval_examples"], s1["verdict"]) == ("0.5", "56", "not clearly learnt")
    lists = _verdict_lists(table)
    assert lists["Learnt"] == "- tiny-opt/sst2/full: `tiny-opt/sst2/full/hosl/s0` 60.0 vs 50.0 (n=500) †\n"
    assert lists["Not clearly learnt"] == "- tiny-opt/sst2/full: `tiny-opt/sst2/full/hosl/s1` 60.0 vs 50.0 (n=56) †\n"
    assert lists["Not learnt"] == "- none\n"

    # a table that has them: its n is kept, its verdict is not (the rule here decides)
    new = _previous_csv(tmp_path / "new.csv", {"tiny-opt/sst2/full/hosl/s0": ("done", 0.6)},
                        extra={"eval_examples": 56, "verdict": "not learnt"})
    rows, _ = _report(tmp_path, PREV_GRID, "--previous", str(new))
    s0 = rows["tiny-opt/sst2/full/hosl/s0"]
    assert (s0["eval_examples"], s0["verdict"]) == ("56", "not clearly learnt")

    # no data on this machine: n unknown, so no verdict; the cell is listed as such
    _stub_majority(monkeypatch, {0: (None, None), 1: (None, None)})
    rows, table = _report(tmp_path, PREV_GRID, "--previous", str(old))
    s0 = rows["tiny-opt/sst2/full/hosl/s0"]
    assert (s0["majority_accuracy"], s0["eval_examples"], s0["verdict"]) == ("0.5", "", "")
    assert ("No verdict (majority rate or evaluation set size unknown on this machine): 2 cells: "
            "`tiny-opt/sst2/full/hosl/s0`, `tiny-opt/sst2/full/hosl/s1`") in table
