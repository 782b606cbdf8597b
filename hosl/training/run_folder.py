"""What ``--out`` holds, and whether this command may use it.

A *hosl run folder* holds ``config.json`` (the configuration it was started with, never
rewritten) and ``metrics.jsonl``; it may hold ``checkpoints/``, ``summary.json`` and
``resumes.jsonl`` (one record per resume: the checkpoint, and settings changed with
``--override``). Other files (a grid's notes, say) are left alone.

The rules (every refusal is a ``RunFolderError`` raised before anything in the folder changes):

* a missing or empty folder: a new run (a missing one is created; one that cannot be is refused);
* a hosl run folder: refused unless ``--resume`` (continue it, see ``resume_plan``) or
  ``--overwrite`` (start afresh: hosl's own files there are replaced, others kept);
* anything else (a file, a folder of other files, a run missing ``metrics.jsonl`` or with a
  ``config.json`` that is not hosl's): refused, even with ``--resume``; ``--overwrite`` starts a new run there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from hosl.optim.config import train_fields, train_name
from hosl.training import checkpoint as ckpt
from hosl.training.config import TrainConfig

CONFIG, METRICS, SUMMARY, RESUMES, CHECKPOINTS = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "resumes.jsonl",
    "checkpoints",
)
TRACKER_DIRS = ("tensorboard", "wandb")  # what --report-to writes (hosl/training/tracking.py)
HOSL_FILES = (CONFIG, METRICS, SUMMARY, RESUMES, CHECKPOINTS, *TRACKER_DIRS)
# config.json keys that mark it as hosl's (every hosl run has had these)
CONFIG_SIGNATURE = ("model", "task", "mode", "cut", "seed", "steps", "out")

# Settings a resume never compares: where the run lives, how it is shown, which kernels compute it
# (the backends are bit-identical), and the resume switches themselves.
# The ZO options' rules are their ZOConfig field's ``on_resume`` (hosl/optim/config.py): ``backend`` is not
# compared; ``lr_client``, ``server_batch`` and ``client_micro_batch`` are overridable.
_ZO_ON_RESUME = {train_name(f): f.metadata["on_resume"] for f in train_fields()}
NOT_COMPARED = frozenset(
    {"out", "resume", "overwrite", "overrides", "progress", "report_to", "notes"}
    | {k for k, rule in _ZO_ON_RESUME.items() if rule == "ignore"}
)
# Settings that change how long the run goes and what it records, not the trajectory of its steps:
# a resume may change them freely (each change is recorded). Not ``steps`` under a decaying
# ``lr_schedule``: there the rate of every step depends on it (then it needs --override steps).
FREE = frozenset({"steps", "eval_every", "checkpoint_every", "eval_batch_size"})
# Settings that change the trajectory but that a resume may change with --override FIELD: the
# learning rates, where the data lives, and how passes are batched (same math, other rounding).
OVERRIDABLE = frozenset(
    {"lr_server", "data_dir", "client_memory_budget", "steps", "client_checkpointing", "client_fused_step"}
    | {k for k, rule in _ZO_ON_RESUME.items() if rule == "override"}
)


class RunFolderError(ValueError):
    """``--out`` cannot be used as asked; the message says why and what would work."""


@dataclass
class ResumePlan:
    """What a resume will do, decided before anything is written."""

    checkpoint: Path | None  # None: no checkpoint yet, the run starts again from step 0
    state: dict | None  # the checkpoint's state.pt (verified)
    changes: dict  # field -> {"was": old, "now": new}, FREE and overridden fields only
    notes: list[str] = field(default_factory=list)


def _listing(path: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _hosl_config(path: Path) -> dict | None:
    """The folder's config.json if it is a hosl configuration, else None."""
    try:
        data = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(k in data for k in CONFIG_SIGNATURE) else None


def kind_of(path: Path) -> str:
    """ "absent", "file", "empty", "run" (a hosl run folder) or "other"."""
    if not path.exists():
        return "file" if path.is_symlink() else "absent"
    if not path.is_dir():
        return "file"
    if not any(path.iterdir()):
        return "empty"
    if _hosl_config(path) is not None and (path / METRICS).is_file():
        return "run"
    return "other"


def check_out(cfg: TrainConfig) -> str:
    """Refuse an ``--out`` this command may not use; return its kind (see ``kind_of``)."""
    path = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pass one")
    try:
        kind = kind_of(path)
    except OSError as exc:
        raise RunFolderError(f"--out {path}: cannot be read ({exc.strerror or exc})") from None
    if kind == "file":
        raise RunFolderError(f"--out {path} is a file, not a folder; choose a folder for the run")
    if kind == "absent":
        _check_creatable(path)
    elif not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {path}: the folder is not writable")
    if kind == "run" and not (cfg.resume or cfg.overwrite):
        raise RunFolderError(
            f"--out {path} already holds a hosl run; pass --resume to continue it, --overwrite "
            "to replace it, or choose another --out"
        )
    if kind == "other" and not cfg.overwrite:
        what = _other_description(path)
        raise RunFolderError(
            f"--out {path} is not empty and {what} ({_listing(path)}); choose an empty or new "
            "folder, or pass --overwrite to start a run there (hosl's files config.json, "
            "metrics.jsonl, summary.json, resumes.jsonl, checkpoints/ would be replaced)"
        )
    return kind


def _other_description(path: Path) -> str:
    if (path / CONFIG).exists() and _hosl_config(path) is None:
        return "its config.json is not a hosl configuration"
    if _hosl_config(path) is not None:
        return f"is not a complete hosl run: it has no {METRICS}"
    return "is not a hosl run"


def _check_creatable(path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunFolderError(f"--out {path}: {parent} is a file, so the run folder cannot be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {path}: {parent} is not writable, so the run folder cannot be made there")


def create(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"--out {path}: cannot make the run folder ({exc.strerror or exc})") from None


def clear_hosl_files(path: Path) -> None:
    """--overwrite: remove what an earlier run left (hosl's files only)."""
    for name in HOSL_FILES:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


# -- resume --------------------------------------------------------------------------------------------
def _effective(values: dict) -> dict:
    """The settings a run actually used (defaults resolved), from a config dict."""
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    out = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as config.json holds them
    out.update(
        lr_client=cfg.resolved_lr_client(),
        eps=cfg.resolved_eps(),
        difference=cfg.resolved_difference(),
        eval_every=cfg.resolved_eval_every(),
        checkpoint_every=cfg.resolved_checkpoint_every(),
        lora_targets=cfg.lora_target_list(),
        client_params=",".join(cfg.client_param_patterns() or ()) or None,  # the patterns, spaces dropped
    )
    if not cfg.lora:  # LoRA settings of a run without LoRA are not used
        for name in ("lora_r", "lora_alpha", "lora_targets", "lora_halves"):
            out.pop(name, None)
    return out


def normalise_override(name: str) -> str:
    key = name.strip().lstrip("-").replace("-", "_")
    if key in OVERRIDABLE or key in FREE:
        return key
    known = {f.name for f in fields(TrainConfig)}
    if key in known:
        raise RunFolderError(
            f"--override {name}: {key} changes the trajectory and cannot change on resume; "
            f"fields that may: {', '.join(sorted(OVERRIDABLE))}"
        )
    raise RunFolderError(
        f"--override {name}: no such setting; fields that may change on resume: {', '.join(sorted(OVERRIDABLE))}"
    )


def compare(run_values: dict, cfg: TrainConfig) -> dict:
    """Changes from the run's settings to ``cfg``'s allowed on resume (field -> was/now); raises
    ``RunFolderError`` naming every setting that differs and may not."""
    overrides = {normalise_override(o) for o in (cfg.overrides or [])}
    was, now = _effective(run_values), _effective(cfg.to_dict())
    changed = sorted(k for k in was.keys() | now.keys() if k not in NOT_COMPARED and was.get(k) != now.get(k))
    free = set(FREE)
    if was.get("lr_schedule") not in (None, "constant"):
        free.discard("steps")  # a linear/cosine schedule runs over --steps
    refused = [k for k in changed if k not in free and k not in overrides]
    if refused:

        def flag(k):
            return "--" + k.replace("_", "-")

        listing = "; ".join(f"{flag(k)} was {was.get(k)!r}, now {now.get(k)!r}" for k in refused)
        hint = [f"use the run's values (see {Path(cfg.out) / CONFIG} and {RESUMES})"]
        may = [k for k in refused if k in OVERRIDABLE]
        if may:
            hint.append(" ".join(f"--override {k}" for k in may) + " to change " + ("it" if len(may) == 1 else "them"))
        raise RunFolderError(f"--resume: settings differ from the run's checkpoint: {listing}; " + ", or ".join(hint))
    return {k: {"was": was.get(k), "now": now.get(k)} for k in changed}


def metrics_up_to(path: Path, step: int) -> list[str]:
    """metrics.jsonl lines of steps <= ``step`` (a torn last line, from a kill mid-write, is dropped)."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise RunFolderError(f"{path} is not UTF-8 text; fix or remove it to resume") from None
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise RunFolderError(f"{path}: line {number} is not JSON; fix or remove it to resume") from None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    return kept


def resume_plan(cfg: TrainConfig, module_names: list[str]) -> ResumePlan:
    """Check that the run in ``cfg.out`` may be resumed with ``cfg`` and pick its checkpoint."""
    path = Path(cfg.out)
    checkpoint, notes = ckpt.find_resumable(path, module_names)
    state = ckpt.read_state(checkpoint) if checkpoint is not None else None
    run_values = state.get("config") if state is not None else None
    if not isinstance(run_values, dict):
        run_values = _hosl_config(path) or {}
    changes = compare(run_values, cfg)
    metrics_up_to(path / METRICS, resume_step(state))  # refuses a damaged metrics.jsonl now, not after loading
    return ResumePlan(checkpoint, state, changes, notes)


def resume_step(state: dict | None) -> int:
    """The step a resume continues after; -1 without a checkpoint (every record is redone)."""
    return state["step"] if state is not None else -1
