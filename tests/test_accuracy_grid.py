"""benchmarks/accuracy.py: grid expansion, cells as processes, tables, resumability, provenance.

The end-to-end test runs two 2-step tiny-opt cells (zero-shot and HOSL) as separate processes,
then runs the same grid again and checks that nothing is rerun; then marks the HOSL cell superseded
and checks that the tables say so and that the next run reruns that cell only.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_git = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


grid = _load_script("accuracy")

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
    table = (out / "results.md").read_text()
    assert f"| tiny-opt | sst2 | full | {100 * majority:.1f} |" in table
    assert "| tiny-opt | sst2 | full |" in table and "not run" in table and "--no-such-flag not available" in table
    assert (out / "results.csv").exists()
    assert "pending" not in table  # the legend for pending cells only when some are

    # the client-size plot reads the same cells
    plot = _load_script("client_size")
    assert plot.main(["--runs", str(out), "--model", "tiny-opt", "--out", str(tmp_path / "curves.png"),
                      "--window", "1", "--last", "2"]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    # its table names each row's cell and the commit that cell ran on
    text = plot.table(plot.collect([out], None, "tiny-opt", "sst2", "full"), 2)
    assert f"| `tiny-opt/sst2/full/hosl/s0` | {(run['commit'] or 'unknown')[:10]} |" in text

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
