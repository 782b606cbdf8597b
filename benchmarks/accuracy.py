"""Accuracy grid: HOSL vs FO-SL vs ZO-SL vs zero-shot, one ``hosl train`` process per cell.

    python benchmarks/accuracy.py --config benchmarks/configs/cpu.yaml --out runs/accuracy-cpu
    python benchmarks/accuracy.py --config ... --out ... --only 'minilm-l6/sst2/*' --dry-run
    python benchmarks/accuracy.py --config ... --out ... --report-only     # rebuild the tables
    python benchmarks/accuracy.py --config ... --out ... --report-only --previous docs/accuracy-cpu.csv

Run it from the repository root: relative paths in the config (``data_dir: ../shared/data``) are
relative to the working directory, which every cell process inherits.

A *cell* is one (model, task, variant, [cut,] mode, seed). Its id is
``model/task/variant/[cutN/]mode/sSEED`` (``--only`` takes shell patterns on it, comma-separated)
and its run folder is ``OUT/cells/<id>``. Resumability:

* a cell whose folder holds ``summary.json`` is done and is never rerun;
* a cell with a checkpoint (killed mid-run) is continued with ``--resume`` (if its flags are unchanged);
* a cell folder with neither (killed before its first checkpoint) is cleared and started again;
* failed cells (non-zero exit) are retried on the next invocation;
* a finished cell's checkpoints are deleted (``--keep-checkpoints`` keeps them).

While the runner waits on a cell it holds ``OUT/grid.lock``: a second runner on the same OUT stops.
SIGTERM/SIGINT to the runner stops the running cell as well; the grid continues where it stopped
the next time. Each cell's output goes to ``OUT/logs/<id with / as __>.log``.

After every cell the runner rewrites ``OUT/results.md`` (tables), ``OUT/results.csv`` (one row per
(model, task, variant, cut, mode): mean, std, min, max over seeds) and ``OUT/cells.csv`` (one row per
cell). Cells that were not run say why. ``cells.csv`` gives each cell with a result the size of its
evaluation set (``eval_examples``) beside the majority rate, and a ``verdict``: ``learnt`` (accuracy more
than two standard errors above the majority rate), ``not clearly learnt`` (above it by less) or ``not
learnt`` (at or below it); see ``learnt_verdict``. ``results.md`` lists the cells by verdict under
"Which cells learnt their task".

Provenance: before each attempt the runner appends to ``cells/<id>/cell.json`` ``runs`` the git commit
of this checkout, whether its tracked files differed from that commit (``dirty``, with the files), the
time, and whether it resumed; ``config`` there is the full ``TrainConfig`` the flags resolve to (defaults
and the lr/eps/eval-every a mode implies filled in). ``cells.csv`` repeats the commit, dirty flag and
config per cell; ``results.csv`` lists the commits behind each row. Cells run before this bookkeeping
have no ``runs`` (commit unknown).

Superseded results: a config's ``superseded`` list (or ``--stale-before COMMIT`` for every cell) names
cells whose results predate a fix::

    superseded:
      - when: {mode: zo-sl}            # same keys as rules; omit for every cell
        before: "1a2b3c4"              # the fixing commit (quoted: digits-only ids read as numbers)
        reason: tied-direction ZO-SL baseline

A finished cell it matches is *superseded* when any of its runs was on a commit that does not contain
``before`` (or on an unknown commit). Tables still show its number, marked, and list it with the
reason; running the grid reruns it (its old folder is moved to ``OUT/superseded/``).

Results from an earlier table: ``--previous CSV`` (repeatable) names a ``cells.csv`` an earlier run
wrote (``docs/accuracy-cpu.csv``, say) for cells whose folders are gone. A cell with no result in OUT
(no ``summary.json``) but a done or superseded row there is reported from that row: status ``done``,
note ``from CSV``, marked † in the tables and listed under them. The config's ``superseded`` rules
and ``--stale-before`` apply to it as to a cell in OUT, with the row's ``commit`` column as its runs'
commits; a row without one counts as run before every fix. A result in OUT always wins; given twice,
a later file's row replaces an earlier one's. ``--previous`` changes the tables only: which cells a
run runs is decided by OUT alone.

Config (YAML), see benchmarks/configs/cpu.yaml for a commented one::

    description: text for the table's header
    defaults: {flag: value}          # ``hosl train`` flags (dashes or underscores), every cell
    models:   {label: {flags}}       # or a list of labels; ``model:`` defaults to the label
    tasks:    {name: {flags}}        # or a list
    variants: {full: {}, lora: {lora: true}}   # optional (default: full only)
    modes:    {zero-shot: {}, fo-sl: {flags}, zo-sl: {...}, hosl: {...}}   # or a list; a label other
                                     # than a --mode names its mode: fo-sl-lr1e-3: {mode: fo-sl, lr_client: 1.0e-3}
    cuts:     [1, 2, 3, 5]           # optional axis; without it the cut is a flag like any other
    seeds:    [0, 1]
    rules:                           # applied in order, after the axes' flags
      - when: {variant: lora, mode: [hosl, zo-sl]}    # keys: model task variant mode cut seed
        set:  {lr_client: 5.0e-5, eps: 5.0e-3}
      - when: {variant: lora, mode: zero-shot}
        skip: same model as full zero-shot            # the cell is listed as not run, with this reason
    superseded: [{when: {...}, before: COMMIT, reason: text}]   # optional; see above

Flags merge in this order: defaults, model, task, variant, mode, cut, rules. ``zero-shot`` runs
``hosl train --steps 0`` (evaluate the starting weights once; ``--mode`` then only picks how the
halves are wired, default fo-sl). A flag the installed ``hosl train`` does not know (``--lora``
before LoRA lands, say) marks the cells that need it "not run: --flag not available".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import fcntl
import fnmatch
import functools
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ZERO_SHOT = "zero-shot"
AXES = ("model", "task", "variant", "cut", "mode", "seed")
LABEL_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Flags the runner owns: a config must not set them.
RESERVED_FLAGS = ("out", "resume", "overwrite", "progress", "no_progress")


# ---------------------------------------------------------------------------------------------
# config -> cells


@dataclass
class Cell:
    axes: dict  # model, task, variant, cut (or None), mode, seed
    flags: dict  # hosl train flags, underscores
    skip: str | None = None  # reason from a rule

    @property
    def id(self) -> str:
        a = self.axes
        parts = [a["model"], a["task"], a["variant"]]
        if a["cut"] is not None:
            parts.append(f"cut{a['cut']}")
        return "/".join(parts + [a["mode"], f"s{a['seed']}"])

    @property
    def group(self) -> tuple:
        """Cells that differ only in seed."""
        return tuple(self.axes[k] for k in AXES if k != "seed")


def _norm_flags(flags: dict | None, where: str) -> dict:
    out = {}
    for key, value in (flags or {}).items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in RESERVED_FLAGS:
            raise ValueError(f"{where}: --{name.replace('_', '-')} is set by the runner, not the config")
        out[name] = value
    return out


def _axis(config: dict, name: str, default=None) -> dict:
    """An axis as {label: flags}; a list means no per-entry flags."""
    value = config.get(name, default)
    if value is None:
        raise ValueError(f"config: '{name}' is missing")
    if isinstance(value, list):
        value = {label: {} for label in value}
    if not isinstance(value, dict) or not value:
        raise ValueError(f"config: '{name}' must be a non-empty list or mapping")
    out = {}
    for label, flags in value.items():
        label = str(label)
        if not LABEL_RE.match(label):
            raise ValueError(f"config: {name} label {label!r} must match {LABEL_RE.pattern} (it names a folder)")
        out[label] = _norm_flags(flags, f"{name}.{label}")
    return out


def _matches(when: dict, axes: dict) -> bool:
    for key, wanted in (when or {}).items():
        if key not in AXES:
            raise ValueError(f"config: rule key {key!r} is not one of {', '.join(AXES)}")
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if axes[key] not in allowed and str(axes[key]) not in [str(w) for w in allowed]:
            return False
    return True


def expand(config: dict) -> list[Cell]:
    """Every cell of the grid, in run order: model, task, variant, cut, seed, mode."""
    defaults = _norm_flags(config.get("defaults"), "defaults")
    models = _axis(config, "models")
    tasks = _axis(config, "tasks")
    variants = _axis(config, "variants", {"full": {}})
    modes = _axis(config, "modes")
    cuts = config.get("cuts") or [None]
    seeds = config.get("seeds", [0])
    rules = config.get("rules") or []
    for rule in rules:
        if not isinstance(rule, dict) or ("set" not in rule and "skip" not in rule):
            raise ValueError(f"config: each rule needs 'when' and 'set' or 'skip', got {rule!r}")
    cells = []
    for model, model_flags in models.items():
        for task, task_flags in tasks.items():
            for variant, variant_flags in variants.items():
                for cut in cuts:
                    for seed in seeds:
                        for mode, mode_flags in modes.items():
                            axes = dict(model=model, task=task, variant=variant, cut=cut, mode=mode, seed=seed)
                            flags = {"model": model, **defaults, **model_flags, "task": task, **task_flags,
                                     **variant_flags, **mode_flags, "seed": seed}
                            if cut is not None:
                                flags["cut"] = cut
                            skip = None
                            for rule in rules:
                                if _matches(rule.get("when"), axes):
                                    flags.update(_norm_flags(rule.get("set"), "rules"))
                                    if rule.get("skip"):
                                        skip = str(rule["skip"])
                            if mode == ZERO_SHOT:
                                flags["steps"] = 0
                                flags.setdefault("mode", "fo-sl")
                            else:  # a mode label may name the --mode it runs: fo-sl-lr1e-3: {mode: fo-sl, ...}
                                flags["mode"] = mode_flags.get("mode", mode)
                            cells.append(Cell(axes, flags, skip))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("config: two cells have the same id")
    return cells


def load_config(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import yaml  # a dependency of transformers; listed in the bench extra

    return yaml.safe_load(text)


def select(cells: list[Cell], only: str | None) -> list[Cell]:
    if not only:
        return cells
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


# ---------------------------------------------------------------------------------------------
# running cells


def cli_argv(python: str, flags: dict) -> list[str]:
    argv = [python, "-m", "hosl.cli", "train"]
    for name, value in flags.items():
        opt = "--" + name.replace("_", "-")
        if value is True:
            argv.append(opt)
        elif value is False or value is None:
            continue
        else:
            argv += [opt, str(value)]
    return argv


def known_train_flags(python: str) -> set[str]:
    """Option names ``hosl train --help`` lists, as underscores (``lora``, ``num_queries``...)."""
    out = subprocess.run([python, "-m", "hosl.cli", "train", "--help"], capture_output=True, text=True,
                         env=_child_env(), check=True).stdout
    return {m.replace("-", "_") for m in re.findall(r"--([a-z0-9][a-z0-9-]*)", out)}


def _child_env() -> dict:
    env = dict(os.environ)
    # the cells import this checkout's hosl, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """In the cell process: get SIGTERM if the runner dies (Linux), so no cell outlives its grid."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.id


def log_path(out: Path, cell: Cell) -> Path:
    return out / "logs" / (cell.id.replace("/", "__") + ".log")


def has_checkpoint(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(ckpts.iterdir())


def stored_flags(run_dir: Path) -> dict | None:
    path = run_dir / "cell.json"
    return json.loads(path.read_text())["flags"] if path.exists() else None


# ---------------------------------------------------------------------------------------------
# provenance: which code and which resolved config produced a cell


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None


def checkout_state() -> dict:
    """The commit of this checkout (the code every cell imports) and whether its tracked files differ
    from it (``hosl/provenance.py``: git, else the tree's GIT_COMMIT file). ``commit``/``dirty`` are
    None where neither is available."""
    from hosl.provenance import checkout_state as state_of

    state = state_of(REPO_ROOT)
    return {"commit": state["commit"], "dirty": state["dirty"], "dirty_files": state["dirty_files"],
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def resolved_config(flags: dict) -> dict | None:
    """The full ``TrainConfig`` ``hosl train`` builds from these flags, with the values it derives
    (client lr and eps by mode/LoRA, evaluation and checkpoint intervals) filled in. None if this
    checkout's ``hosl train`` does not accept them."""
    from hosl import cli, cli_options

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints, then exits, on an unknown flag
            config = cli_options.config_from(cli.build_parser().parse_args(cli_argv("python", flags)[3:]))
        config.validate()
    except (SystemExit, ValueError):
        return None
    out = config.to_dict()
    out.update(lr_client=config.resolved_lr_client(), eps=config.resolved_eps(),
               eval_every=config.resolved_eval_every(), checkpoint_every=config.resolved_checkpoint_every(),
               zo_betas=list(config.zo_betas))
    for runner_owned in ("out", "resume", "overwrite", "progress", "notes"):
        out.pop(runner_owned, None)
    return out


def cell_runs(run_dir: Path) -> list[dict]:
    """The attempts recorded in a cell's cell.json (empty for cells run before provenance was kept)."""
    path = run_dir / "cell.json"
    return (json.loads(path.read_text()).get("runs") or []) if path.exists() else []


def _commit_of(ref: str, where: str) -> str:
    found = _git("rev-parse", "--verify", "--quiet", ref + "^{commit}")
    if found is None or found.returncode != 0 or not found.stdout.strip():
        raise ValueError(f"{where}: {ref!r} is not a commit of this repository ({REPO_ROOT})")
    return found.stdout.strip()


@functools.lru_cache(maxsize=None)
def contains_commit(commit: str | None, fix: str) -> bool:
    """Whether code at ``commit`` includes ``fix`` (fix is commit or one of its ancestors)."""
    if not commit:
        return False
    result = _git("merge-base", "--is-ancestor", fix, commit)
    return result is not None and result.returncode == 0


@dataclass
class Supersession:
    """Results of the cells ``when`` matches are superseded unless every run had ``before``."""
    when: dict
    before: str  # full commit id
    reason: str


def supersessions(config: dict, stale_before: str | None) -> list[Supersession]:
    entries = config.get("superseded") or []
    if not isinstance(entries, list):
        raise ValueError("config: 'superseded' must be a list of {when, before, reason}")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("before"):
            raise ValueError(f"config: superseded[{i}] needs 'before' (a commit) and may have 'when' and "
                             f"'reason', got {entry!r}")
        when = entry.get("when") or {}
        for key in when:
            if key not in AXES:
                raise ValueError(f"config: superseded[{i}].when key {key!r} is not one of {', '.join(AXES)}")
        before = _commit_of(str(entry["before"]), f"config: superseded[{i}].before")
        out.append(Supersession(when, before, str(entry.get("reason") or f"run before {entry['before']}")))
    if stale_before:
        out.append(Supersession({}, _commit_of(stale_before, "--stale-before"), f"run before {stale_before}"))
    return out


def superseded_reason(run_dir: Path, cell: Cell, rules: list[Supersession]) -> str | None:
    return superseded_by([r.get("commit") for r in cell_runs(run_dir)], cell, rules)


def superseded_by(commits: list[str | None], cell: Cell, rules: list[Supersession]) -> str | None:
    """The reason of the first rule matching ``cell`` that one of ``commits`` (its runs' commits) lacks;
    no commits at all (run before they were recorded) lack every fix."""
    for rule in rules:
        if _matches(rule.when, cell.axes):
            if not commits or not all(contains_commit(c, rule.before) for c in commits):
                return rule.reason
    return None


class Stop(Exception):
    pass


class Runner:
    def __init__(self, out: Path, python: str, cell_timeout: float | None):
        self.out, self.python, self.cell_timeout = out, python, cell_timeout
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def handle_signal(self, signum, _frame):
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        raise Stop(signal.Signals(signum).name)

    def archive(self, cell: Cell) -> Path:
        """Move a superseded cell's folder out of the grid (kept, never deleted) before it reruns."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = self.out / "superseded" / cell.id / stamp
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(cell_dir(self.out, cell)), str(dest))
        return dest

    def run_cell(self, cell: Cell) -> dict:
        """Run (or continue) one cell; returns its attempt record."""
        run_dir = cell_dir(self.out, cell)
        # continue from a checkpoint only if it was made with these very flags
        resume = has_checkpoint(run_dir) and stored_flags(run_dir) == json.loads(json.dumps(cell.flags))
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # no checkpoint (or one of other flags): nothing to keep
        runs = cell_runs(run_dir) if resume else []
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = cli_argv(self.python, {**cell.flags, "out": str(run_dir.resolve())})
        # a fresh start: the folder holds cell.json, so hosl train needs --overwrite to use it
        argv += ["--no-progress"] + (["--resume"] if resume else ["--overwrite"])
        runs.append({**checkout_state(), "resumed": resume})
        (run_dir / "cell.json").write_text(json.dumps({"id": cell.id, "axes": cell.axes, "flags": cell.flags,
                                                       "argv": argv, "config": resolved_config(cell.flags),
                                                       "runs": runs}, indent=2))
        log = log_path(self.out, cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "a") as fh:
            fh.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                     f"{'resume' if resume else 'start'}: {' '.join(argv)}\n")
            fh.flush()
            self.child = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(),
                                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            try:
                rc = self.child.wait(timeout=self.cell_timeout)
            except subprocess.TimeoutExpired:
                self.child.send_signal(signal.SIGTERM)
                try:
                    self.child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.child.kill()
                    self.child.wait()
                rc = "timeout"
            finally:
                if self.stopping and self.child.poll() is None:
                    self.child.wait()
                self.child = None
        return {"rc": rc, "resumed": resume, "wall_seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------
# status and tables


def cell_status(out: Path, cell: Cell, unknown_flags: set[str], failures: dict,
                superseded: list[Supersession] = ()) -> tuple[str, str, dict | None]:
    """(status, note, summary): status in done, superseded, stale, skipped, unavailable, failed, partial,
    pending. A superseded cell has a result (shown, marked) that a later fix replaces; note says why."""
    run_dir = cell_dir(out, cell)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        stored = stored_flags(run_dir)
        if stored is not None and stored != json.loads(json.dumps(cell.flags)):
            changed = sorted(k for k in set(stored) | set(cell.flags) if stored.get(k) != cell.flags.get(k))
            return "stale", "run with other flags (" + ", ".join(changed) + "); delete the folder to rerun", summary
        reason = superseded_reason(run_dir, cell, list(superseded))
        if reason:
            return "superseded", reason, summary
        return "done", "", summary
    if cell.skip:
        return "skipped", cell.skip, None
    missing = sorted(f for f in cell.flags if f in unknown_flags)
    if missing:
        return "unavailable", ", ".join("--" + m.replace("_", "-") for m in missing) + " not available", None
    if cell.id in failures:
        f = failures[cell.id]
        return "failed", f"exit {f['rc']}; see {log_path(Path('.'), cell).as_posix()}", None
    if has_checkpoint(run_dir):
        return "partial", "killed mid-run; resumes from its checkpoint", None
    return "pending", "", None


def _budget(summary: dict, cell: Cell) -> dict:
    steps = summary.get("steps", 0)
    per_step = summary.get("forward_passes_per_step") or {}
    return {
        "steps": steps,
        "batch_size": cell.flags.get("batch_size", ""),
        "num_queries": summary.get("num_queries", cell.flags.get("num_queries", "")),
        "train_examples": summary.get("train_examples", 0),
        **{f"{k}_total": steps * v for k, v in per_step.items()},
    }


CELL_COLUMNS = ["id", "model", "task", "variant", "cut", "mode", "seed", "status", "note", "start_accuracy",
                "eval_accuracy", "majority_accuracy", "eval_examples", "verdict", "steps", "batch_size",
                "num_queries", "train_examples", "client_forward_total", "server_forward_total",
                "client_backward_total", "server_backward_total", "seconds", "client_peak_bytes", "lr_client",
                "lr_server", "commit", "dirty", "config"]
HAS_RESULT = ("done", "superseded")


def _provenance(run_dir: Path) -> dict:
    """commit (the attempts' distinct commits, space-separated), dirty (any attempt), config (JSON)."""
    path = run_dir / "cell.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    runs = record.get("runs") or []
    commits = list(dict.fromkeys(r.get("commit") or "unknown" for r in runs))
    dirty = [r.get("dirty") for r in runs]
    return {"commit": " ".join(commits),
            "dirty": "" if not runs or None in dirty else any(dirty),
            "config": json.dumps(record["config"], sort_keys=True) if record.get("config") else ""}


def cell_row(out: Path, cell: Cell, unknown: set[str], failures: dict,
             superseded: list[Supersession] = ()) -> dict:
    status, note, summary = cell_status(out, cell, unknown, failures, superseded)
    share, n = majority(cell.flags) if status in HAS_RESULT else (None, None)
    row = {"id": cell.id, **{k: cell.axes[k] for k in AXES}, "status": status, "note": note,
           "majority_accuracy": share, "eval_examples": n,
           **({"commit": "", "dirty": "", "config": ""} if summary is None else _provenance(cell_dir(out, cell)))}
    if summary is not None:
        history = summary.get("eval_history") or []
        row.update(_budget(summary, cell))
        row.update(start_accuracy=history[0]["eval_accuracy"] if history else None,
                   eval_accuracy=summary.get("eval_accuracy"), seconds=round(summary.get("seconds", 0.0), 1),
                   client_peak_bytes=summary.get("client_peak_bytes"), lr_client=summary.get("lr_client"),
                   lr_server=summary.get("lr_server"))
    return _with_verdict(row)


# results from an earlier table (--previous)

INT_COLUMNS = ("eval_examples", "steps", "batch_size", "num_queries", "train_examples", "client_forward_total",
               "server_forward_total", "client_backward_total", "server_backward_total", "client_peak_bytes")
FLOAT_COLUMNS = ("start_accuracy", "eval_accuracy", "majority_accuracy", "seconds", "lr_client", "lr_server")
PREVIOUS_NEEDS = ("id", "status", "eval_accuracy")


def _read_previous(path: Path) -> list[dict]:
    """The rows of a cells table; a one-line ValueError naming --previous if it is not one."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows, columns = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"--previous {path}: {getattr(err, 'strerror', None) or err}") from None
    missing = [c for c in PREVIOUS_NEEDS if c not in columns]
    if missing:
        raise ValueError(f"--previous {path}: no {', '.join(missing)} column (not a cells table this script "
                         "writes, such as docs/accuracy-cpu.csv)")
    return rows


def _typed(row: dict, path: Path) -> dict:
    """A CSV row with its numbers as numbers (empty: None)."""
    out = dict(row)
    for kinds, columns in ((int, INT_COLUMNS), (float, FLOAT_COLUMNS)):
        for col in columns:
            text = (row.get(col) or "").strip()
            try:
                out[col] = kinds(float(text)) if text else None
            except ValueError:
                raise ValueError(f"--previous {path}: {row['id']}: {col} {text!r} is not a number") from None
    return out


def load_previous(paths: list[Path]) -> dict[str, dict]:
    """The rows with a result (done or superseded) of earlier cells tables, by cell id, each with
    ``source`` (its file); a later file's row replaces an earlier one's."""
    found = {}
    for path in paths:
        for row in _read_previous(path):
            if row["status"] in HAS_RESULT:
                found[row["id"]] = {**_typed(row, path), "source": path.as_posix()}
    return found


def previous_row(cell: Cell, prev: dict, superseded: list[Supersession] = ()) -> dict:
    """A cell's row from an earlier table: its numbers; done, or superseded by this config's rules with
    the row's commits (none recorded: run before every fix), as a cell in OUT would be."""
    commits = (prev.get("commit") or "").split()
    reason = superseded_by(commits, cell, list(superseded))
    note = f"from {prev['source']}"
    row = {col: prev.get(col) for col in CELL_COLUMNS}
    row.update({"id": cell.id, **{k: cell.axes[k] for k in AXES}, "status": "superseded" if reason else "done",
                "note": f"{reason}; {note}" if reason else note, "source": prev["source"],
                "commit": " ".join(commits), "dirty": prev.get("dirty") or "", "config": prev.get("config") or ""})
    if row["majority_accuracy"] is None or row["eval_examples"] is None:  # a table without them, or empty
        share, n = majority(cell.flags)
        if row["majority_accuracy"] is None:
            row["majority_accuracy"] = share
        if row["eval_examples"] is None:
            row["eval_examples"] = n
    return _with_verdict(row)  # the rule of this script, whatever verdict the earlier table gave


def with_previous(row: dict, cell: Cell, previous: dict[str, dict], superseded: list[Supersession] = ()) -> dict:
    """``row`` (from OUT) unless OUT has no result for the cell and an earlier table has one."""
    if row["status"] in HAS_RESULT + ("stale",) or cell.id not in previous:
        return row
    return previous_row(cell, previous[cell.id], superseded)


@functools.lru_cache(maxsize=None)
def _majority(task: str, data_dir: str | None, train_size: int, eval_size: int,
              seed: int) -> tuple[float | None, int | None]:
    """(share of the most common label, number of examples) of an evaluation set; (None, None) if it
    cannot be sampled here."""
    try:
        from hosl.tasks.sampling import sample_task

        data = sample_task(task, data_dir, train_size, eval_size, seed=seed)
    except Exception:  # no data here (a report written elsewhere), no hub: the columns stay empty
        return None, None
    counts = collections.Counter(example["label"] for example in data.eval)
    if not counts:
        return None, None
    n = sum(counts.values())
    return max(counts.values()) / n, n


def majority(flags: dict) -> tuple[float | None, int | None]:
    """(majority share, size) of a cell's evaluation set. The share of its most common label is the
    accuracy of always giving that answer: a run at this rate has learnt nothing the label counts do
    not give. The set is sampled as ``hosl train`` samples it (same task, data folder, sizes and seed);
    (None, None) where it cannot be (no data on this machine)."""
    from hosl.training.config import TrainConfig

    d = TrainConfig()
    return _majority(str(flags.get("task", d.task)), flags.get("data_dir", d.data_dir),
                     int(flags.get("train_size", d.train_size)), int(flags.get("eval_size", d.eval_size)),
                     int(flags.get("seed", d.seed)))


LEARNT, NOT_CLEARLY_LEARNT, NOT_LEARNT = "learnt", "not clearly learnt", "not learnt"
VERDICTS = (LEARNT, NOT_CLEARLY_LEARNT, NOT_LEARNT)


def learnt_margin(n: int) -> float:
    """Two standard errors of a proportion at 0.5 on ``n`` examples, 2 * sqrt(0.25 / n), as a fraction
    (0.045 at n=500, 0.134 at n=56)."""
    return 2.0 * math.sqrt(0.25 / n)


def learnt_verdict(acc: float | None, majority: float | None, n: int | None) -> str:
    """Did a cell learn its task? ``acc`` and ``majority`` are fractions (0-1) on the same evaluation
    set of ``n`` examples.

    * ``learnt``: acc > majority + 2 * sqrt(0.25 / n);
    * ``not clearly learnt``: majority < acc <= majority + 2 * sqrt(0.25 / n);
    * ``not learnt``: acc <= majority;
    * ``""``: acc, majority or n unknown.

    Why: always giving the most common label scores the majority rate, so a run at or below it has
    learnt nothing the label counts do not give. Above it, the margin is two standard errors of a
    proportion at 0.5 (the widest) for that set size, so that a handful of lucky examples on a small
    set (13.4 points at n=56, 4.5 at n=500) is not called learning. Comparisons allow 1e-9 for the
    rounding of numbers read back from a CSV: an accuracy equal to the majority rate is not learnt.
    """
    if acc is None or majority is None or not n or n < 1:
        return ""
    tol = 1e-9
    if acc <= majority + tol:
        return NOT_LEARNT
    if acc <= majority + learnt_margin(n) + tol:
        return NOT_CLEARLY_LEARNT
    return LEARNT


def _with_verdict(row: dict) -> dict:
    """``row`` with ``verdict`` set from its accuracy, majority rate and set size (empty without a result)."""
    has = row.get("status") in HAS_RESULT
    row["verdict"] = learnt_verdict(row.get("eval_accuracy"), row.get("majority_accuracy"),
                                    row.get("eval_examples")) if has else ""
    return row


def _stats(values: list[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def aggregate(rows: list[dict], cells: list[Cell]) -> list[dict]:
    """One row per group of seeds; accuracy in points (0-100)."""
    by_group: dict[tuple, list[tuple[Cell, dict]]] = {}
    for cell, row in zip(cells, rows, strict=True):
        by_group.setdefault(cell.group, []).append((cell, row))
    out = []
    for group, members in by_group.items():
        done = [r for _, r in members if r["status"] in HAS_RESULT]
        acc = _stats([100.0 * r["eval_accuracy"] for r in done if r["eval_accuracy"] is not None])
        majority = _stats([100.0 * r["majority_accuracy"] for r in done if r["majority_accuracy"] is not None])
        first = done[0] if done else {}
        notes = sorted({_short_status(r) for _, r in members if r["status"] not in HAS_RESULT})
        if len(notes) > 1 and "skipped" in notes:
            notes.remove("skipped")  # a seed a rule leaves out says nothing beside a pending one
        planned = [r for _, r in members if r["status"] != "skipped"]
        out.append({**dict(zip([k for k in AXES if k != "seed"], group, strict=True)),
                    "seeds_done": acc["n"], "seeds": len(planned) or len(members),
                    "accuracy_mean": acc["mean"], "accuracy_std": acc["std"],
                    "accuracy_min": acc["min"], "accuracy_max": acc["max"], "majority_mean": majority["mean"],
                    **{k: first.get(k) for k in ("steps", "batch_size", "num_queries", "train_examples",
                                                 "client_forward_total", "server_forward_total",
                                                 "client_backward_total", "server_backward_total")},
                    "seconds_mean": _stats([r["seconds"] for r in done if r["seconds"] is not None])["mean"],
                    "superseded": sum(r["status"] == "superseded" for r in done),
                    "previous": sum(bool(r.get("source")) for r in done),
                    "commits": " ".join(dict.fromkeys(c for r in done for c in r["commit"].split())),
                    "not_done": "; ".join(notes)})
    return out


def _short_status(row: dict) -> str:
    """What a table cell says for a cell without a result (details are listed under the table)."""
    if row["status"] == "unavailable":
        return f"not run ({row['note']})"
    if row["status"] == "failed":
        return "failed"
    return {"partial": "partial, resumes", "skipped": "skipped"}.get(row["status"], row["status"])


def _fmt_acc(agg: dict | None) -> str:
    if agg is None:
        return "—"
    if agg["seeds_done"] == 0:
        return agg["not_done"] or "not run"
    text = f"{agg['accuracy_mean']:.1f}"
    if agg["seeds_done"] > 1:
        text += f" ± {agg['accuracy_std']:.1f} [{agg['accuracy_min']:.1f}–{agg['accuracy_max']:.1f}]"
    if agg["seeds_done"] < agg["seeds"]:
        text += f" ({agg['seeds_done']}/{agg['seeds']} seeds)"
    elif agg["seeds_done"] == 1:
        text += " (1 seed)"
    return text + (PREVIOUS_MARK if agg["previous"] else "") + (SUPERSEDED_MARK if agg["superseded"] else "")


SUPERSEDED_MARK = " ‡"
PREVIOUS_MARK = " †"


def _sources(rows: list[dict]) -> dict[str, list[str]]:
    """Earlier tables (--previous) -> the ids of the cells reported from them."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r.get("source"):
            out.setdefault(r["source"], []).append(r["id"])
    return out


def _previous_lines(rows: list[dict]) -> list[str]:
    """Under the tables: which cells come from which earlier table."""
    sources = _sources(rows)
    if not sources:
        return []
    lines = ["", "Results from earlier tables (`--previous`; these cells have no result in this folder):", ""]
    for source, ids in sources.items():
        lines.append(f"- from {source}: {len(ids)} cells: " + ", ".join(f"`{i}`" for i in ids))
    return lines


def _verdict_entry(row: dict) -> str:
    """`id` acc vs majority (n=..), in points, marked as the main table marks it."""
    return (f"`{row['id']}` {100 * row['eval_accuracy']:.1f} vs {100 * row['majority_accuracy']:.1f} "
            f"(n={row['eval_examples']})" + (PREVIOUS_MARK if row.get("source") else "")
            + (SUPERSEDED_MARK if row["status"] == "superseded" else ""))


def _grouped(rows: list[dict], entry) -> list[str]:
    """One bullet per model/task/variant[/cut] (in grid order) listing its cells' entries."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        key = "/".join([r["model"], r["task"], r["variant"]] + ([f"cut{r['cut']}"] if r["cut"] is not None else []))
        groups.setdefault(key, []).append(entry(r))
    return [f"- {key}: " + ", ".join(entries) for key, entries in groups.items()] or ["- none"]


def _verdict_lines(rows: list[dict]) -> list[str]:
    """The section "Which cells learnt their task": the trained cells with a result under their verdict
    (``learnt_verdict``), then the zero-shot cells apart, as the untrained reference (the starting
    weights, not trained: their verdict says whether the task is learnt before training), then the
    cells without a verdict (majority rate or set size unknown here). Rows are in grid order."""
    results = [r for r in rows if r["status"] in HAS_RESULT and r.get("eval_accuracy") is not None]
    if not results:
        return []
    judged = [r for r in results if r.get("verdict")]
    trained = [r for r in judged if r["mode"] != ZERO_SHOT]
    zero_shot = [r for r in judged if r["mode"] == ZERO_SHOT]
    lines = ["", "## Which cells learnt their task", "",
             "A cell *learnt* its task when its accuracy is more than two standard errors of a proportion at "
             "0.5 (2·√(0.25/n) on its n evaluation examples: 4.5 points at n=500, 13.4 at n=56) above the "
             "majority rate, is *not clearly learnt* when above the majority rate by at most that, and *not "
             "learnt* at or below it. Entries: accuracy vs majority rate, in %, and n."]
    for verdict in VERDICTS:
        lines += ["", f"{verdict[0].upper() + verdict[1:]}:", ""]
        lines += _grouped([r for r in trained if r["verdict"] == verdict], _verdict_entry)
    if zero_shot:
        lines += ["", "Zero-shot cells (the untrained reference: the starting weights, steps 0; the same rule):", ""]
        lines += _grouped(zero_shot, lambda r: f"{_verdict_entry(r)}: {r['verdict']}")
    unknown = [r["id"] for r in results if not r.get("verdict")]
    if unknown:
        lines += ["", f"No verdict (majority rate or evaluation set size unknown on this machine): {len(unknown)} "
                  "cells: " + ", ".join(f"`{i}`" for i in unknown)]
    return lines


def _diff(a: dict | None, b: dict | None) -> str:
    if not a or not b or a["accuracy_mean"] is None or b["accuracy_mean"] is None:
        return "—"
    return f"{a['accuracy_mean'] - b['accuracy_mean']:+.1f}" + (SUPERSEDED_MARK if a["superseded"] or b["superseded"] else "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    cpu = cpu_model()
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, torch {torch_version}"


def _write_atomic(path: Path, text: str) -> None:
    """Readers (``--report-only`` while a grid runs, say) never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _csv_text(fieldnames: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_tables(out: Path, config: dict, config_path: Path, cells: list[Cell], rows: list[dict]) -> None:
    aggs = aggregate(rows, cells)
    _write_atomic(out / "cells.csv", _csv_text(CELL_COLUMNS, rows))
    if aggs:
        _write_atomic(out / "results.csv", _csv_text(list(aggs[0]), aggs))

    modes = list(dict.fromkeys(c.axes["mode"] for c in cells))
    index = {(a["model"], a["task"], a["variant"], a["cut"], a["mode"]): a for a in aggs}
    # rows whose every cell a rule skips say nothing (the skipped cells are listed under the table)
    row_keys = list(dict.fromkeys((a["model"], a["task"], a["variant"], a["cut"]) for a in aggs
                                  if a["seeds_done"] or a["not_done"] != "skipped"))
    has_cut = any(k[3] is not None for k in row_keys)
    counts = {s: sum(r["status"] == s for r in rows) for s in
              ("done", "superseded", "stale", "skipped", "unavailable", "failed", "partial", "pending")}

    lines = [f"# Accuracy grid: {config_path.name}", ""]
    if config.get("description"):
        lines += [str(config["description"]).strip(), ""]
    previous = "".join(f" --previous {s}" for s in _sources(rows))
    lines += [f"- command: `python benchmarks/accuracy.py --config {config_path.as_posix()} --out {out.as_posix()}"
              f"{previous}`",
              f"- machine: {machine_line()}",
              f"- written: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
              "- cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
              + "".join(f"; {len(ids)} from {s}" for s, ids in _sources(rows).items()), ""]
    lines += ["Accuracy (%) on the evaluation set at the end of training: mean ± sample std [min–max] over "
              "seeds. Differences are of the means, in points. *majority*: the share of the evaluation set's "
              "most common label (the accuracy of always giving that answer), mean over the seeds' sets.", ""]
    head = ["model", "task", "variant"] + (["cut"] if has_cut else []) + ["majority"] + modes
    extra = []
    if "hosl" in modes and "fo-sl" in modes:
        extra.append(("HOSL − FO-SL", "hosl", "fo-sl"))
    if "hosl" in modes and "zo-sl" in modes:
        extra.append(("HOSL − ZO-SL", "hosl", "zo-sl"))
    head += [e[0] for e in extra]
    numeric = 1 + len(modes) + len(extra)  # majority, the modes, the differences
    lines += ["| " + " | ".join(head) + " |",
              "|" + "|".join(["---"] * (len(head) - numeric) + ["---:"] * numeric) + "|"]
    for key in row_keys:
        cols = [key[0], key[1], key[2]] + ([str(key[3])] if has_cut else [])
        shares = [index[key + (m,)]["majority_mean"] for m in modes if key + (m,) in index]
        shares = [v for v in shares if v is not None]
        cols.append(f"{sum(shares) / len(shares):.1f}" if shares else "—")
        cols += [_fmt_acc(index.get(key + (m,))) for m in modes]
        cols += [_diff(index.get(key + (a,)), index.get(key + (b,))) for _, a, b in extra]
        lines.append("| " + " | ".join(cols) + " |")
    if counts["superseded"]:
        lines += ["", f"{SUPERSEDED_MARK.strip()}: includes results superseded by a later fix (listed under "
                  "\"Superseded results\" below); rerun pending."]
    if _sources(rows):
        lines += ["", f"{PREVIOUS_MARK.strip()}: includes results from an earlier table, not from this folder's "
                  "cells (listed under \"Results from earlier tables\" below)."]
    lines += _verdict_lines(rows)

    lines += ["", "Budget per run (same for every seed): training steps and examples, and forward/backward "
              "passes over training batches (client and server halves; evaluation passes not counted).", ""]
    bhead = ["model", "task", "variant"] + (["cut"] if has_cut else []) + [
        "mode", "steps", "batch", "Q", "train examples", "client fwd", "server fwd", "client bwd", "server bwd",
        "seconds (mean)"]
    lines += ["| " + " | ".join(bhead) + " |", "|" + "|".join(["---"] * (len(bhead) - 9) + ["---:"] * 9) + "|"]
    for a in aggs:
        if not a["seeds_done"]:
            continue
        cols = [a["model"], a["task"], a["variant"]] + ([str(a["cut"])] if has_cut else []) + [a["mode"]]
        uses_q = a["mode"] in ("hosl", "zo-sl", "zo")
        cols += [str(a[k]) if a[k] is not None and (uses_q or k != "num_queries") else "—" for k in
                 ("steps", "batch_size", "num_queries", "train_examples", "client_forward_total",
                  "server_forward_total", "client_backward_total", "server_backward_total")]
        cols.append(f"{a['seconds_mean']:.0f}" if a["seconds_mean"] is not None else "")
        lines.append("| " + " | ".join(cols) + " |")
    superseded: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] == "superseded":
            superseded.setdefault(r["note"], []).append(r["id"])
    if superseded:
        lines += ["", "Superseded results (shown above, marked; running the grid reruns them):", ""]
        for note, ids in sorted(superseded.items()):
            lines.append(f"- {note}: {len(ids)} cells: " + ", ".join(f"`{i}`" for i in ids))
    lines += _previous_lines(rows)
    reasons: dict[tuple, list[str]] = {}
    for r in rows:
        if r["status"] not in HAS_RESULT:
            reasons.setdefault((r["status"], r["note"]), []).append(r["id"])
    if reasons:
        legend = " (pending: not run yet)" if any(status == "pending" for status, _ in reasons) else ""
        lines += ["", f"Cells without a result{legend}:", ""]
        for (status, note), ids in sorted(reasons.items()):
            shown = ", ".join(f"`{i}`" for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            lines.append(f"- {status}" + (f" ({note})" if note else "") + f": {len(ids)} cells: {shown}")
    _write_atomic(out / "results.md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------


TO_RUN = ("pending", "partial", "failed", "superseded")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="grid config (.yaml or .json)")
    p.add_argument("--out", required=True, type=Path, help="grid folder (cells/, logs/, results.*)")
    p.add_argument("--only", default=None, help="comma-separated shell patterns on cell ids, e.g. 'minilm-l6/sst2/*'")
    p.add_argument("--dry-run", action="store_true", help="print each cell's status and command; run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the tables from what is on disk; run nothing")
    p.add_argument("--python", default=sys.executable, help="interpreter for the cells (default: this one)")
    p.add_argument("--cell-timeout", type=float, default=None,
                   help="seconds before a cell is stopped (it resumes from its checkpoint next time)")
    p.add_argument("--stale-before", default=None, metavar="COMMIT",
                   help="mark every finished cell whose runs were not all on COMMIT or a later commit as "
                        "superseded (tables mark it; a run reruns it); see 'superseded' in the config")
    p.add_argument("--previous", action="append", type=Path, default=[], metavar="CSV",
                   help="a cells.csv an earlier run wrote (docs/accuracy-cpu.csv, say; repeatable): the tables "
                        "report a cell with no result in --out from its row there, marked; changes the tables only")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep a finished cell's checkpoints (default: delete them once summary.json is written)")
    args = p.parse_args(argv)

    config = load_config(args.config)
    try:
        all_cells = expand(config)
        superseded = supersessions(config, args.stale_before)
    except ValueError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    try:
        previous = load_previous(args.previous)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    cells = select(all_cells, args.only)
    if not cells:
        print(f"no cell matches --only {args.only!r}", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    failures_path = out / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else {}
    known = known_train_flags(args.python)
    unknown = {f for c in all_cells for f in c.flags if f not in known}

    def report():
        rows = [with_previous(cell_row(out, c, unknown, failures, superseded), c, previous, superseded)
                for c in all_cells]
        write_tables(out, config, args.config, all_cells, rows)

    if args.dry_run or args.report_only:
        if args.dry_run:
            for cell in cells:
                status, note, _ = cell_status(out, cell, unknown, failures, superseded)
                print(f"{status:11} {cell.id}" + (f"  ({note})" if note else ""))
                if status in TO_RUN:
                    print("            " + " ".join(cli_argv(args.python, cell.flags)))
        else:
            report()
            print(f"wrote {out / 'results.md'}")
        return 0

    lock = open(out / "grid.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another accuracy.py is running on {out}", file=sys.stderr)
        return 3
    runner = Runner(out, args.python, args.cell_timeout)
    signal.signal(signal.SIGTERM, runner.handle_signal)
    signal.signal(signal.SIGINT, runner.handle_signal)
    todo = [c for c in cells if cell_status(out, c, unknown, failures, superseded)[0] in TO_RUN]
    print(f"[accuracy] {len(cells)} cells selected, {len(todo)} to run", flush=True)
    try:
        for i, cell in enumerate(todo, 1):
            print(f"[accuracy] ({i}/{len(todo)}) {cell.id}", flush=True)
            if cell_status(out, cell, unknown, failures, superseded)[0] == "superseded":
                print(f"[accuracy]   superseded result moved to {runner.archive(cell)}", flush=True)
            attempt = runner.run_cell(cell)
            if attempt["rc"] == 0 and (cell_dir(out, cell) / "summary.json").exists():
                failures.pop(cell.id, None)
                if not args.keep_checkpoints:  # only unfinished cells need them (SmolLM2: ~1 GB each)
                    shutil.rmtree(cell_dir(out, cell) / "checkpoints", ignore_errors=True)
            else:
                failures[cell.id] = attempt
                print(f"[accuracy]   failed (exit {attempt['rc']}); log: {log_path(out, cell)}", flush=True)
            failures_path.write_text(json.dumps(failures, indent=2))
            report()
    except Stop as why:
        print(f"[accuracy] stopped by {why}; run the same command again to continue", file=sys.stderr)
        report()
        return 130
    report()
    print(f"[accuracy] tables: {out / 'results.md'}, {out / 'results.csv'}, {out / 'cells.csv'}")
    return 1 if any(c.id in failures for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
