"""``hosl plot RUN [RUN...] --out curves.png``: the training loss and the evaluation of runs, against
steps and against training seconds, several runs on one figure (matplotlib).

A run is a folder ``hosl train`` wrote (``config.json`` and ``metrics.jsonl``; see
``hosl/training/run_folder.py``). The figure has four panels: training loss against step and
against seconds (each run's loss averaged over a sliding window of ``smooth`` steps, the raw
values faint behind it) and the evaluation against step and against seconds (accuracy, or
perplexity for a ``--task lm`` run). Seconds are training time (evaluations not counted), as
``metrics.jsonl`` records them. Each run is labelled by its folder name, or by as many trailing
path parts as it takes to tell the runs apart (``hosl/s0`` and ``fo-sl/s0``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class PlotError(ValueError):
    """A folder that is not a run, or a run with nothing to plot; the message says which."""


@dataclass
class RunCurves:
    """One run's records from ``metrics.jsonl``."""

    path: Path
    label: str = ""
    steps: list[int] = field(default_factory=list)  # training steps
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    eval_metric: str = "accuracy"  # or "perplexity"


def read_run(path) -> RunCurves:
    """The curves of the run in ``path``; a :class:`PlotError` for a folder that is not a hosl run."""
    from hosl.training import run_folder

    path = Path(path)
    if run_folder.kind_of(path) != "run":
        raise PlotError(
            f"{path} is not a hosl run folder (expected the config.json and metrics.jsonl that hosl train writes)"
        )
    curves = RunCurves(path)
    evals = []
    for line in (path / run_folder.METRICS).read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line (a kill mid-write); the loop drops it on resume too
        if record.get("event") == "eval":
            evals.append(record)
        elif "event" not in record and "loss" in record:
            curves.steps.append(record["step"])
            curves.seconds.append(record["seconds"])
            curves.loss.append(record["loss"])
    if any(r.get("eval_perplexity") is not None for r in evals):
        curves.eval_metric = "perplexity"
    key = f"eval_{curves.eval_metric}"
    for record in evals:
        if record.get(key) is not None:
            curves.eval_steps.append(record["step"])
            curves.eval_seconds.append(record["seconds"])
            curves.eval_values.append(record[key])
    if not curves.steps and not curves.eval_steps:
        raise PlotError(f"{path}: metrics.jsonl holds no training step or evaluation yet")
    return curves


def run_labels(paths: list[Path]) -> list[str]:
    """Each path's folder name, or as many trailing parts as make the labels distinct."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same folder twice


def _smoothed(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs, out, *, smooth: int = 10, title: str | None = None) -> Path:
    """Draw ``runs`` (paths or :class:`RunCurves`) into the image ``out`` (its suffix picks the format)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("hosl plot needs matplotlib, which is not installed: pip install 'hosl[track]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"--smooth must be an integer >= 1, got {smooth!r}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    curves = [r if isinstance(r, RunCurves) else read_run(r) for r in runs]
    if not curves:
        raise ValueError("hosl plot: give at least one run folder")
    for c, label in zip(curves, run_labels([c.path for c in curves])):
        c.label = c.label or label
    metrics = {c.eval_metric for c in curves}
    metric = metrics.pop() if len(metrics) == 1 else "accuracy / perplexity"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        colour = colours[i % len(colours)]
        for ax, x in ((axes[0, 0], c.steps), (axes[0, 1], c.seconds)):
            if smooth > 1:
                ax.plot(x, c.loss, color=colour, alpha=0.2, linewidth=0.6)
            ax.plot(x, _smoothed(c.loss, smooth), color=colour, linewidth=1.2, label=c.label)
        for ax, x in ((axes[1, 0], c.eval_steps), (axes[1, 1], c.eval_seconds)):
            ax.plot(x, c.eval_values, color=colour, marker="o", markersize=3, linewidth=1.2, label=c.label)
    loss_label = "training loss" + (f" (mean of {smooth} steps)" if smooth > 1 else "")
    for ax, xlabel, ylabel in (
        (axes[0, 0], "step", loss_label),
        (axes[0, 1], "training seconds", loss_label),
        (axes[1, 0], "step", f"eval {metric}"),
        (axes[1, 1], "training seconds", f"eval {metric}"),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
