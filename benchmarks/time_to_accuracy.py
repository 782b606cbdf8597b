"""Time to accuracy: does training the client pay for its forwards?

    python benchmarks/time_to_accuracy.py --out runs/tta-cut5 \\
        --model minilm-l6 --task sst2 --cut 5 --steps 200 --eval-every 25 --seeds 0 \\
        --train-args "--data-dir ../shared/data --batch-size 16 --num-queries 2 --lr-server 1e-2" \\
        --recipe frozen="--mode frozen-client" --recipe fo-sl="--mode fo-sl --lr-client 1e-3" \\
        --recipe hosl="--mode hosl --lr-client 1e-5" --recipe hosl-lr1e-4="--mode hosl --lr-client 1e-4"

Runs every (recipe, seed) on one setting (model, task, cut, steps, evaluation interval), each as its
own ``hosl train`` process through ``benchmarks/accuracy.py``'s runner: a finished run (its folder
holds ``summary.json``) is never rerun, a killed one resumes from its checkpoint, and each run's
``cell.json`` records the commit, dirty flag and resolved config it ran with. Run folders are
``OUT/cells/<model>/<task>/full/cut<N>/<recipe>/s<seed>``; logs are in ``OUT/logs/``.

A *recipe* is ``NAME="hosl train flags"``: the flags (``--mode`` among them) that make it what it
is. ``--train-args`` are the flags every recipe shares; the script owns ``--model --task --cut
--steps --eval-every --seed`` (its own options) and the run-folder flags, so a recipe may not set
them. Every recipe is checked against ``hosl train``'s parser before anything runs.

Each run gives a curve: evaluation accuracy at each evaluation against training steps, client
forward passes (steps x the summary's ``forward_passes_per_step["client_forward"]``) and training
seconds (the evaluation record's ``seconds``: the run's training time so far, evaluations not
counted). Targets: the *baseline*'s final accuracy (the frozen client, mean over seeds) plus 50% and
90% of the *reference*'s gain over it (FO-SL's final accuracy, mean over seeds). For each run the
report gives the steps, client forwards and seconds at its first evaluation at or above each target
("not reached" otherwise), and its final and best accuracy.

Writes ``OUT/time_to_accuracy.json`` (every curve point, targets and provenance: git commit, dirty
flag, command line, threads, CPU), ``OUT/time_to_accuracy.md`` (the table) and
``OUT/time_to_accuracy.png`` (accuracy vs steps and vs seconds), after every run and at the end.
``--report-only`` rewrites them from what is on disk. Seconds are wall-clock: compare them only
between runs on the same machine under the same load (``--threads`` sets OMP_NUM_THREADS and
MKL_NUM_THREADS for every run; default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import accuracy as grid  # the grid runner beside this script: Cell, Runner, provenance helpers

# flags the script sets itself (its own options, the run folder)
OWNED_FLAGS = ("model", "task", "cut", "steps", "eval_every", "seed") + grid.RESERVED_FLAGS
TARGET_FRACTIONS = (0.5, 0.9)
MODE_OF_ROLE = {"baseline": "frozen-client", "reference": "fo-sl"}


# ---------------------------------------------------------------------------------------------
# recipes and runs


@dataclass
class Recipe:
    name: str
    text: str  # the flags as given
    flags: dict  # hosl train flags, underscores


def flags_from_text(text: str, where: str) -> dict:
    """``"--mode hosl --lr-client 1e-4 --lora"`` -> ``{"mode": "hosl", "lr_client": "1e-4", "lora": True}``.
    A flag followed by another flag (or nothing) is a switch."""
    try:
        tokens = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"{where}: cannot split {text!r}: {err}") from None
    flags: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"{where}: expected a --flag, got {token!r} in {text!r}")
        name = token[2:]
        if "=" in name:  # --lr-client=1e-4
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = True
            i += 1
        name = name.replace("-", "_")
        if name in flags:
            raise ValueError(f"{where}: --{name.replace('_', '-')} given twice")
        flags[name] = value
    return flags


def parse_recipe(text: str) -> Recipe:
    """``NAME=FLAGS`` (``hosl-lr1e-4=--mode hosl --lr-client 1e-4``) -> a Recipe."""
    if "=" not in text:
        raise ValueError(f"--recipe {text!r}: expected NAME=\"hosl train flags\", e.g. "
                         "frozen=\"--mode frozen-client\"")
    name, flag_text = text.split("=", 1)
    name = name.strip()
    if not grid.LABEL_RE.match(name):
        raise ValueError(f"--recipe {text!r}: the name {name!r} must match {grid.LABEL_RE.pattern} (it names a folder)")
    flags = flags_from_text(flag_text, f"--recipe {name}")
    owned = [f for f in flags if f in OWNED_FLAGS]
    if owned:
        raise ValueError(f"--recipe {name}: " + ", ".join("--" + f.replace("_", "-") for f in owned)
                         + " is set by this script (its own options), not by a recipe")
    return Recipe(name, flag_text.strip(), flags)


def check_train_flags(flags: dict, where: str) -> None:
    """Refuse flags ``hosl train`` would refuse (unknown flag, unknown --mode, bad value), with its message."""
    from hosl import cli, cli_options

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config = cli_options.config_from(cli.build_parser().parse_args(grid.cli_argv("python", flags)[3:]))
        config.validate()
    except SystemExit:
        message = err.getvalue().strip().splitlines()
        raise ValueError(f"{where}: hosl train refuses these flags: {message[-1] if message else 'parse error'}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class Setting:
    model: str
    task: str
    cut: int
    steps: int
    eval_every: int
    seeds: list[int]
    train_args: dict  # shared hosl train flags


def run_flags(setting: Setting, recipe: Recipe, seed: int) -> dict:
    """One run's ``hosl train`` flags: the shared ones, the recipe's, then the script's own."""
    return {**setting.train_args, **recipe.flags, "model": setting.model, "task": setting.task,
            "cut": setting.cut, "steps": setting.steps, "eval_every": setting.eval_every, "seed": seed}


def build_cells(setting: Setting, recipes: list[Recipe]) -> list[grid.Cell]:
    """The runs, seed-major (every recipe at seed 0 first), as the grid runner's cells; the recipe
    name is the cell's mode axis."""
    cells = []
    for seed in setting.seeds:
        for recipe in recipes:
            flags = run_flags(setting, recipe, seed)
            variant = "lora" if flags.get("lora") else "full"
            axes = dict(model=setting.model, task=setting.task, variant=variant, cut=setting.cut,
                        mode=recipe.name, seed=seed)
            cells.append(grid.Cell(axes, flags))
    return cells


def role_recipe(recipes: list[Recipe], given: str | None, role: str) -> str | None:
    """The recipe that plays ``role`` (baseline: the frozen client; reference: FO-SL): ``given`` if
    named, else the one recipe whose --mode is the role's mode; None if there is none."""
    names = [r.name for r in recipes]
    if given is not None:
        if given not in names:
            raise ValueError(f"--{role} {given!r} is not a recipe (recipes: {', '.join(names)})")
        return given
    mode = MODE_OF_ROLE[role]
    matching = [r.name for r in recipes if r.flags.get("mode") == mode]
    if len(matching) > 1:
        raise ValueError(f"recipes {', '.join(matching)} all run --mode {mode}: name the {role} with --{role}")
    return matching[0] if matching else None


# ---------------------------------------------------------------------------------------------
# curves and targets (pure functions)


def step_seconds(metrics_path: Path) -> dict[int, float]:
    """Training seconds after each step, from ``metrics.jsonl`` (for runs whose evaluation records
    predate their ``seconds`` field); a resumed run's repeated steps: the later record wins."""
    out = {0: 0.0}
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "event" not in rec and "seconds" in rec and "step" in rec:
                    out[rec["step"]] = rec["seconds"]
    return out


def curve_points(eval_history: list[dict], client_forwards_per_step: int,
                 seconds_at_step: dict[int, float] | None = None) -> list[dict]:
    """One point per evaluation: step, accuracy (0-1), client forward passes, training seconds."""
    points = []
    for rec in eval_history:
        step = rec["step"]
        seconds = rec.get("seconds")
        if seconds is None and seconds_at_step is not None:
            seconds = seconds_at_step.get(step)
        points.append({"step": step, "accuracy": rec["eval_accuracy"], "client_forwards": step * client_forwards_per_step,
                       "seconds": seconds})
    return points


def targets(baseline_final: float | None, reference_final: float | None,
            fractions: tuple[float, ...] = TARGET_FRACTIONS) -> dict[str, float]:
    """``{"+50%": baseline + 0.5 * gain, ...}`` with gain = reference - baseline; empty when either is
    unknown or the reference gains nothing (a target at or below the baseline says nothing)."""
    if baseline_final is None or reference_final is None or reference_final <= baseline_final:
        return {}
    gain = reference_final - baseline_final
    return {f"+{round(100 * f)}%": baseline_final + f * gain for f in fractions}


def first_reaching(points: list[dict], target: float) -> dict | None:
    """The first point (by step) whose accuracy is at or above ``target``; None if none is. 1e-9 of
    slack so that a run reaching exactly the target (the reference's own final accuracy) counts."""
    for point in sorted(points, key=lambda p: p["step"]):
        if point["accuracy"] is not None and point["accuracy"] >= target - 1e-9:
            return point
    return None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# reading the runs


def read_run(out: Path, cell: grid.Cell) -> dict:
    """A run's record: status, curve and totals (curve empty until it has finished)."""
    status, note, summary = grid.cell_status(out, cell, set(), {})
    run_dir = grid.cell_dir(out, cell)
    record = {"recipe": cell.axes["mode"], "seed": cell.axes["seed"], "id": cell.id, "status": status, "note": note,
              "run_dir": run_dir.as_posix(), "flags": cell.flags, "curve": []}
    if summary is None or status != "done":
        return record
    per_step = summary.get("forward_passes_per_step") or {}
    seconds_at = step_seconds(run_dir / "metrics.jsonl")
    curve = curve_points(summary.get("eval_history") or [], int(per_step.get("client_forward", 0)), seconds_at)
    accs = [p["accuracy"] for p in curve if p["accuracy"] is not None]
    runs = grid.cell_runs(run_dir)
    record.update(curve=curve, steps=summary.get("steps"), seconds=summary.get("seconds"),
                  forward_passes_per_step=per_step, final_accuracy=summary.get("eval_accuracy"),
                  best_accuracy=max(accs) if accs else None,
                  client_forwards=summary.get("steps", 0) * int(per_step.get("client_forward", 0)),
                  lr_client=summary.get("lr_client"), lr_server=summary.get("lr_server"),
                  commits=list(dict.fromkeys(r.get("commit") or "unknown" for r in runs)),
                  dirty=any(bool(r.get("dirty")) for r in runs))
    return record


def final_mean(runs: list[dict], recipe: str | None) -> float | None:
    if recipe is None:
        return None
    return mean([r["final_accuracy"] for r in runs if r["recipe"] == recipe and r.get("final_accuracy") is not None])


def with_targets(runs: list[dict], levels: dict[str, float]) -> list[dict]:
    """Each finished run with ``to_target``: level -> the first point reaching it (or None)."""
    for r in runs:
        if r["status"] == "done":
            r["to_target"] = {name: first_reaching(r["curve"], value) for name, value in levels.items()}
    return runs


# ---------------------------------------------------------------------------------------------
# reports


def _fmt_hit(point: dict | None) -> str:
    if point is None:
        return "not reached"
    secs = "?" if point["seconds"] is None else f"{point['seconds']:.0f}"
    return f"{point['step']} / {point['client_forwards']:,} / {secs}"


def _fmt_commits(run: dict) -> str:
    """The commit(s) a run's attempts ran on, short, "+dirty" if any ran on a modified tree."""
    commits = " ".join(c[:7] for c in run.get("commits") or ["unknown"])
    return commits + (" +dirty" if run.get("dirty") else "")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def table_lines(report: dict) -> list[str]:
    """The markdown table: one row per run."""
    t = report["targets"]
    levels = t["levels"]
    head = ["recipe", "seed", "flags", "client fwd/step"] + [
        f"to {name} ({100 * value:.1f}%): steps / client fwd / s" for name, value in levels.items()] + [
        "final acc (%)", "best acc (%)", "train s", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in report["runs"]:
        flags = f"`{report['recipes'][r['recipe']]}`"
        if r["status"] != "done":
            cols = [r["recipe"], str(r["seed"]), flags, "—"] + ["—"] * len(levels) + [r["status"], "—", "—", "—"]
        else:
            cols = [r["recipe"], str(r["seed"]), flags, str(r["forward_passes_per_step"].get("client_forward", "?"))]
            cols += [_fmt_hit(r["to_target"][name]) for name in levels]
            cols += [_pct(r["final_accuracy"]), _pct(r["best_accuracy"]), f"{r['seconds']:.0f}", _fmt_commits(r)]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def markdown(report: dict) -> str:
    s, t, p = report["setting"], report["targets"], report["provenance"]
    lines = [f"# Time to accuracy: {s['model']} / {s['task']} / cut {s['cut']}", "",
             f"- command: `{p['command']}`",
             f"- report written on: {p['commit'] or 'unknown commit'}" + (" (dirty tree)" if p["dirty"] else "")
             + "; each run's commit is in the table (from its cell.json)",
             f"- machine: {p['machine']}; runs at {p['threads']} thread(s) each",
             f"- written: {p['written']}",
             f"- setting: {s['steps']} steps, evaluation every {s['eval_every']}, seeds "
             f"{', '.join(map(str, s['seeds']))}; shared flags `{s['train_args'] or '(none)'}`", ""]
    if t["levels"]:
        lines += [f"Targets: the baseline `{t['baseline']}` ends at {_pct(t['baseline_final'])}% and the reference "
                  f"`{t['reference']}` at {_pct(t['reference_final'])}% (final accuracy, mean over seeds): gain "
                  f"{100 * t['gain']:.1f} points; the targets are the baseline + "
                  + " and + ".join(f"{k[1:]} of the gain ({100 * v:.1f}%)" for k, v in t["levels"].items()) + "."]
    else:
        lines += [f"No targets: {t['why']}."]
    lines += ["", "Each target cell: the first evaluation at or above the target, as training steps / client forward "
              "passes / training seconds (wall-clock, evaluations not counted); *not reached* if no evaluation "
              "was. Final and best: evaluation accuracy at the last step and the best over all evaluations. Commit: "
              "the code each run ran on (+dirty: with uncommitted changes to tracked files).", ""]
    lines += table_lines(report)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy vs steps (left) and vs training seconds (right); one colour per recipe, one line style
    per seed, the targets as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_secs) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    recipes = list(report["recipes"])
    seeds = report["setting"]["seeds"]
    for r in report["runs"]:
        if not r["curve"]:
            continue
        color = colors[recipes.index(r["recipe"]) % len(colors)]
        style = styles[seeds.index(r["seed"]) % len(styles)] if r["seed"] in seeds else "-"
        label = f"{r['recipe']} s{r['seed']}"
        acc = [100 * p["accuracy"] for p in r["curve"]]
        ax_steps.plot([p["step"] for p in r["curve"]], acc, style, color=color, marker="o", ms=3, label=label)
        timed = [(p["seconds"], 100 * p["accuracy"]) for p in r["curve"] if p["seconds"] is not None]
        if timed:
            ax_secs.plot(*zip(*timed, strict=True), style, color=color, marker="o", ms=3, label=label)
    for name, value in report["targets"]["levels"].items():
        for ax in (ax_steps, ax_secs):
            ax.axhline(100 * value, color="gray", linestyle=":", linewidth=1)
        ax_steps.annotate(f"target {name}", (0, 100 * value), fontsize=7, color="gray", va="bottom")
    s = report["setting"]
    ax_steps.set(xlabel="training step", ylabel="eval accuracy (%)", title="accuracy vs steps")
    ax_secs.set(xlabel="training seconds (wall-clock, evaluation excluded)", title="accuracy vs seconds")
    ax_steps.legend(fontsize=7)
    for ax in (ax_steps, ax_secs):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{s['model']} / {s['task']} / cut {s['cut']}: time to accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(out: Path, setting: Setting, recipes: list[Recipe], cells: list[grid.Cell], roles: dict,
                 train_args_text: str, threads: int, command: str) -> dict:
    runs = [read_run(out, c) for c in cells]
    base, ref = final_mean(runs, roles["baseline"]), final_mean(runs, roles["reference"])
    levels = targets(base, ref)
    if levels:
        why = ""
    elif roles["baseline"] is None or roles["reference"] is None:
        why = "no baseline (frozen-client) or reference (fo-sl) recipe"
    elif base is None or ref is None:
        why = "the baseline or the reference has no finished run yet"
    else:
        why = f"the reference ({100 * ref:.1f}%) does not beat the baseline ({100 * base:.1f}%)"
    state = grid.checkout_state()
    return {
        "setting": {"model": setting.model, "task": setting.task, "cut": setting.cut, "steps": setting.steps,
                    "eval_every": setting.eval_every, "seeds": setting.seeds, "train_args": train_args_text},
        "recipes": {r.name: r.text for r in recipes},
        "targets": {"baseline": roles["baseline"], "reference": roles["reference"], "baseline_final": base,
                    "reference_final": ref, "gain": None if base is None or ref is None else ref - base,
                    "levels": levels, "why": why},
        "provenance": {"command": command, "commit": state["commit"], "dirty": state["dirty"],
                       "dirty_files": state["dirty_files"], "threads": threads, "cpu": grid.cpu_model(),
                       "machine": grid.machine_line(),
                       "written": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "runs": with_targets(runs, levels),
    }


def write_report(out: Path, report: dict) -> None:
    grid._write_atomic(out / "time_to_accuracy.json", json.dumps(report, indent=2) + "\n")
    grid._write_atomic(out / "time_to_accuracy.md", markdown(report))
    plot(report, out / "time_to_accuracy.png")


# ---------------------------------------------------------------------------------------------
# running


class Watcher:
    """While a run goes, print its latest step and evaluation every ``every`` seconds."""

    def __init__(self, run_dir: Path, steps: int, every: float):
        self.run_dir, self.steps, self.every = run_dir, steps, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.every > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    def _loop(self):
        while not self.stop.wait(self.every):
            print("[tta]     " + self.latest(), flush=True)

    def latest(self) -> str:
        step, evaluation = 0, None
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line being written
                    continue
                if rec.get("event") == "eval":
                    evaluation = rec
                elif "step" in rec and "event" not in rec:
                    step = rec["step"]
        shown = (f", eval {100 * evaluation['eval_accuracy']:.1f}% at step {evaluation['step']}"
                 if evaluation and evaluation.get("eval_accuracy") is not None else "")
        return f"step {step}/{self.steps}{shown}"


def child_threads_env(threads: int) -> None:
    """Every run inherits this process's environment (accuracy.py's runner copies it)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def run_all(out: Path, cells: list[grid.Cell], args, report) -> int:
    """Run what is not done; rewrite the report after each run. Returns the number of failed runs."""
    runner = grid.Runner(out, args.python, args.run_timeout)
    signal.signal(signal.SIGTERM, runner.handle_signal)
    signal.signal(signal.SIGINT, runner.handle_signal)
    todo = [c for c in cells if grid.cell_status(out, c, set(), {})[0] != "done"]
    print(f"[tta] {len(cells)} runs, {len(todo)} to run ({len(cells) - len(todo)} done before)", flush=True)
    failed = 0
    for i, cell in enumerate(todo, 1):
        run_dir = grid.cell_dir(out, cell)
        print(f"[tta] ({i}/{len(todo)}) {cell.id}; log: {grid.log_path(out, cell)}", flush=True)
        t0 = time.time()
        with Watcher(run_dir, cell.flags["steps"], args.progress_every):
            attempt = runner.run_cell(cell)
        if attempt["rc"] == 0 and (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text())
            shutil_rmtree(run_dir / "checkpoints")
            print(f"[tta]   done in {time.time() - t0:.0f} s: final accuracy {_pct(summary.get('eval_accuracy'))}%",
                  flush=True)
        else:
            failed += 1
            print(f"[tta]   failed (exit {attempt['rc']}); see {grid.log_path(out, cell)}; rerun to retry", flush=True)
        report()
    return failed


def shutil_rmtree(path: Path) -> None:
    """A finished run's checkpoints (only unfinished runs need them)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct integers, got {text!r}")
    return seeds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the runs and the report")
    p.add_argument("--model", required=True, help="hosl train --model (e.g. minilm-l6, smollm2-135m, tiny-opt)")
    p.add_argument("--task", required=True, help="hosl train --task (e.g. sst2, rte, cb)")
    p.add_argument("--cut", required=True, type=positive_int, help="client blocks")
    p.add_argument("--steps", required=True, type=positive_int, help="training steps per run")
    p.add_argument("--eval-every", required=True, type=positive_int, help="steps between evaluations (curve points)")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--recipe", action="append", default=[], metavar='NAME="FLAGS"',
                   help='a recipe: NAME="hosl train flags", e.g. frozen="--mode frozen-client" (repeatable; '
                        "NAME names its folder)")
    p.add_argument("--train-args", default="", metavar='"FLAGS"',
                   help='hosl train flags every recipe shares, e.g. "--data-dir ../shared/data --batch-size 16" '
                        '(one flag alone needs the = form: --train-args="--lora")')
    p.add_argument("--baseline", default=None, metavar="RECIPE",
                   help="the recipe the targets start from (default: the one with --mode frozen-client)")
    p.add_argument("--reference", default=None, metavar="RECIPE",
                   help="the recipe whose gain over the baseline sets the targets (default: the one with --mode fo-sl)")
    p.add_argument("--threads", type=positive_int, default=1, help="OMP/MKL threads of each run (default 1)")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds before a run is stopped (it resumes from its checkpoint next time)")
    p.add_argument("--progress-every", type=float, default=60.0,
                   help="seconds between progress lines while a run goes (0: none; default 60)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs (default: this one)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from what is on disk; run nothing")
    return p


def configure(args) -> tuple[Setting, list[Recipe], list[grid.Cell], dict]:
    """Recipes, setting, runs and roles from the arguments; ValueError on bad input."""
    if not args.recipe:
        raise ValueError("no --recipe: give at least one, e.g. --recipe frozen=\"--mode frozen-client\"")
    recipes = [parse_recipe(text) for text in args.recipe]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"two recipes share a name: {', '.join(names)}")
    shared = flags_from_text(args.train_args, "--train-args")
    owned = [f for f in shared if f in OWNED_FLAGS]
    if owned:
        raise ValueError("--train-args: " + ", ".join("--" + f.replace("_", "-") for f in owned)
                         + " is set by this script (its own options)")
    setting = Setting(args.model, args.task, args.cut, args.steps, args.eval_every, args.seeds, shared)
    for recipe in recipes:
        check_train_flags(run_flags(setting, recipe, setting.seeds[0]), f"--recipe {recipe.name}")
    roles = {role: role_recipe(recipes, getattr(args, role), role) for role in MODE_OF_ROLE}
    return setting, recipes, build_cells(setting, recipes), roles


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setting, recipes, cells, roles = configure(args)
    except ValueError as err:
        print(f"time_to_accuracy: error: {err}", file=sys.stderr)
        return 2
    out = args.out
    stale = [(c.id, grid.cell_status(out, c, set(), {})[1]) for c in cells
             if grid.cell_status(out, c, set(), {})[0] == "stale"]
    if stale:
        for cell_id, note in stale:
            print(f"time_to_accuracy: error: {cell_id}: {note}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + list(sys.argv[1:] if argv is None else argv))

    def report():
        write_report(out, build_report(out, setting, recipes, cells, roles, args.train_args, args.threads, command))

    if args.report_only:
        report()
        print(f"[tta] wrote {out / 'time_to_accuracy.md'}")
        return 0
    lock = open(out / "tta.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"time_to_accuracy: error: another time_to_accuracy.py is running on {out}", file=sys.stderr)
        return 3
    child_threads_env(args.threads)
    try:
        failed = run_all(out, cells, args, report)
    except grid.Stop as why:
        print(f"[tta] stopped by {why}; run the same command again to continue", file=sys.stderr)
        report()
        return 130
    report()
    print(f"[tta] wrote {out / 'time_to_accuracy.md'}, {out / 'time_to_accuracy.json'}, {out / 'time_to_accuracy.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
