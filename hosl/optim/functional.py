"""Functional core of the zeroth-order update (the classes in this package are thin shells).

``projected_gradients`` turns losses at perturbed points into the directional-derivative estimates
``g_q``; ``zo_sgd`` applies ``w -= lr * ((1/Q) sum_q g_q z(s_q) + wd * w)`` to every parameter in
one fused pass per decay group.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from hosl import ops
from hosl.optim.layout import ParameterLayout


def projected_gradients(
    losses_plus: Sequence[float],
    losses_minus: Sequence[float] | None,
    eps: float,
    clean_loss: float | None = None,
) -> list[float]:
    """``(L+ - L-) / (2 eps)`` (central), or ``(L+ - L0) / eps`` (forward, when ``losses_minus`` is None)."""
    if losses_minus is not None:
        return [(lp - lm) / (2.0 * eps) for lp, lm in zip(losses_plus, losses_minus)]
    if clean_loss is None:
        raise ValueError("forward differences need the clean loss")
    return [(lp - clean_loss) / eps for lp in losses_plus]


def all_finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def zo_sgd(
    layout: ParameterLayout,
    seeds: Sequence[int],
    grads: Sequence[float],
    *,
    lr: float,
    weight_decay: float = 0.0,
    backend: str | None = None,
) -> None:
    """One ZO-SGD step over all directions: ``w -= lr * (mean_q g_q z(s_q) + wd * w)``.

    Biases and norms (``layout``'s no-decay group) get no weight decay. Each group is one call of
    the fused multi-tensor ``zo_update_``: every weight is read and written once for all Q.
    """
    q = len(seeds)
    coeffs = [g / q for g in grads]
    decayed, plain = layout.groups()
    for slots, wd in ((decayed, weight_decay), (plain, 0.0)):
        if slots:
            ops.zo_update_(
                [s.param.data for s in slots],
                seeds,
                coeffs,
                lr=lr,
                weight_decay=wd,
                offsets=[s.offset for s in slots],
                backend=backend,
            )


def draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """``count`` seeds in [0, 2**64) from ``generator`` (two 32-bit draws each)."""
    halves = torch.randint(0, 2**32, (count, 2), generator=generator, dtype=torch.int64)
    return [int(lo) | (int(hi) << 32) for lo, hi in halves.tolist()]
