"""``--server-optimizer`` and ``--lr-schedule``/``--warmup-steps`` of ``hosl train``.

The schedule is a function of the step number alone (no scheduler state to checkpoint): before
step ``s`` (1-based) every optimizer's learning rate is set to its base rate (``--lr-client`` for
the client's optimizer and a zo-sl server's ZO optimizer, ``--lr-server`` for the server's and the
unsplit ``fo`` mode's) times

* warmup, ``s <= warmup_steps``: ``s / warmup_steps`` (the first step already trains);
* then with ``p = (s - 1 - warmup_steps) / (steps - warmup_steps)`` in ``[0, 1)``:
  ``constant`` 1, ``linear`` ``1 - p``, ``cosine`` ``(1 + cos(pi p)) / 2``.

Both processes of a two-process run compute it from the step number the client sends, so they
agree without exchanging anything. Why not ``transformers.get_scheduler`` (which ``HOSLTrainer``
uses): its schedulers are stateful ``LambdaLR`` objects counted from 0, whose first warmup step
trains at rate 0 (linear, warmup 2 of 6 steps: 0, 0.5, 1, 0.75, 0.5, 0.25 against this module's
0.5, 1, 1, 0.75, 0.5, 0.25), so they would change every scheduled run's trajectory and need state in
both processes. ``constant`` without warmup (the default) never touches a
learning rate.
"""

from __future__ import annotations

import math

import torch

SERVER_OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - 1 - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def is_scheduled(hp) -> bool:
    return getattr(hp, "lr_schedule", "constant") != "constant" or getattr(hp, "warmup_steps", 0) > 0


# which base rate each half trains at, per mode: the unsplit fo mode runs at --lr-server, zo and
# zo-sl's ZO server half at --lr-client (frozen-client's client rate resolves to 0)
_HALF_RATES = {"fo": ("lr_server", "lr_server"), "zo": ("lr_client", "lr_client"), "zo-sl": ("lr_client", "lr_client")}


def half_rates(mode: str, hp, step: int) -> tuple[float, float]:
    """(client, server) learning rate of step ``step`` (1-based) in ``mode``: the base rate each half
    trains at times the schedule's factor (the rates the optimizers are set to before that step)."""
    factor = lr_factor(hp.lr_schedule, step, hp.warmup_steps, hp.total_steps) if is_scheduled(hp) else 1.0
    client, server = _HALF_RATES.get(mode, ("lr_client", "lr_server"))
    return getattr(hp, client) * factor, getattr(hp, server) * factor


def set_lr(optimizer, base_lr: float, factor: float) -> None:
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor


def schedule_step(hp, step: int, optimizers: dict) -> None:
    """Set each ``{optimizer: base lr}`` to its scheduled rate for step ``step`` (no-op when unscheduled)."""
    if not is_scheduled(hp):
        return
    factor = lr_factor(hp.lr_schedule, step, hp.warmup_steps, hp.total_steps)
    for optimizer, base_lr in optimizers.items():
        set_lr(optimizer, base_lr, factor)


def schedule_client_step(mode, hp, step: int) -> None:
    """The client-side optimizers of ``mode`` (the unsplit ``fo`` mode's runs at ``--lr-server``)."""
    if is_scheduled(hp):
        schedule_step(
            hp, step, {opt: hp.lr_server if name == "fo" else hp.lr_client for name, opt in mode.optimizers().items()}
        )


def make_server_optimizer(params, hp) -> torch.optim.Optimizer:
    """The server half's optimizer over its trainable ``params``: SGD with momentum (default) or AdamW."""
    params = [p for p in params if p.requires_grad]
    name = getattr(hp, "server_optimizer", "sgd")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr_server, weight_decay=hp.weight_decay)
    if name != "sgd":
        raise ValueError(f"--server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {name!r}")
    return torch.optim.SGD(params, lr=hp.lr_server, momentum=hp.momentum, weight_decay=hp.weight_decay)
