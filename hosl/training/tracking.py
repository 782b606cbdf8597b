"""``hosl train --report-to none|tensorboard|wandb``: every ``metrics.jsonl`` record also goes to
an experiment tracker, through the tracker's own maintained writer.

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing event files under
  ``RUN/tensorboard`` (``tensorboard --logdir RUN``). A resume purges the events after the
  checkpoint's step (``purge_step``), as ``metrics.jsonl`` forgets those records.
* ``wandb``: ``wandb.init(mode="offline", dir=RUN)``: the run is written under ``RUN/wandb``
  and uploaded later with ``wandb sync`` if you want it online.

Both are optional dependencies (``pip install 'hosl[track]'`` installs tensorboard; wandb is
``pip install wandb``); :func:`check_report_to` refuses a missing one before anything runs.
A training step's record becomes ``train/<key>``, an evaluation's ``eval/<key>`` (numbers only),
at the record's step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "wandb")
# the module each tracker needs, and the pip command that installs it
_NEEDS = {"tensorboard": ("tensorboard", "pip install 'hosl[track]'"), "wandb": ("wandb", "pip install wandb")}
TENSORBOARD_DIR = "tensorboard"  # one of run_folder.TRACKER_DIRS, which --overwrite clears


def check_report_to(report_to: str) -> None:
    """A ValueError for an unknown tracker, an ImportError naming the pip command for a missing one."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to in _NEEDS:
        module, command = _NEEDS[report_to]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"--report-to {report_to} needs the {module} package, which is not installed: {command}")


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a ``metrics.jsonl`` record: its numbers, under ``train/`` or ``eval/``."""
    section = "eval" if record.get("event") == "eval" else "train"
    values = {}
    for key, value in record.items():
        if key in ("step", "event") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"{section}/{key.removeprefix('eval_')}"] = float(value)
    return int(record["step"]), values


class Tracker:
    """Receives every record the loop writes to ``metrics.jsonl``."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, resumed_after: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # a resume forgets the records after its checkpoint (metrics.jsonl too); without one, all of them
        purge = (resumed_after + 1 if resumed_after else 0) if resumed_after is not None else None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run_dir), project="hosl", name=Path(run_dir).name, config=config)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, run_dir: Path, config: dict, resumed_after: int | None = None) -> Tracker:
    """The tracker ``--report-to`` names; ``resumed_after``: the checkpoint step a resume continues after."""
    check_report_to(report_to)
    if report_to == "tensorboard":
        return TensorBoardTracker(run_dir, resumed_after)
    if report_to == "wandb":
        return WandbTracker(run_dir, config)
    return Tracker()
