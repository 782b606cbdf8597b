"""The ZO update rules, one :class:`UpdateRule` each in the registry :data:`RULES`.

A rule turns the directional estimates ``g_q`` of one step into a weight update. Its entry holds
its name (``variant=``, ``--zo-optimizer``), the float32 state it keeps per trainable element (the
client memory planner charges it), its step over a whole
:class:`~hosl.forward.layout.ParameterLayout`, the worst-case ``|w|`` after that step (the finite
guard, :func:`update_is_safe`) and its help text. :func:`zo_step` and :func:`update_is_safe` are
all the optimizers call; ``ZOConfig.variant`` and ``hosl train --zo-optimizer`` take their choices
and help from the registry.

Every step and bound takes the hyperparameters of :data:`hosl.optim.functional.STEP_HYPERPARAMETERS`
as keywords (each rule reads the ones it needs and ignores the rest). The per-tensor rules
materialise the estimate ``g`` of one parameter tensor at a time (:func:`per_tensor_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

import torch

from hosl._registry import Registry
from hosl.directions.families import family_max_abs
from hosl.forward.layout import ParameterLayout
from hosl.optim import functional as F

State = MutableMapping[torch.Tensor, dict]


@dataclass(frozen=True)
class UpdateRule:
    """One update rule.

    ``step(layout, seeds, grads, state, *, direction, scales, backend, **hyper)`` applies it to every
    tensor of ``layout`` (creating its state in ``state[param]`` on first use). ``bound(m, d, params,
    state, **hyper)`` is an upper bound on ``|w|`` after that step, given ``m = max|w|`` and ``d``, a
    bound on ``|g + wd*w|`` per coordinate; ``math.inf`` when the rule's float32 state would overflow.
    """

    name: str
    state_elements: int
    step: Callable[..., None]
    bound: Callable[..., float]
    help: str


RULES: Registry[UpdateRule] = Registry("variant")

_F32_MAX = torch.finfo(torch.float32).max * (1 - 2**-8)


def per_tensor_step(tensor_step: Callable[..., None]) -> Callable[..., None]:
    """A layout step from ``tensor_step(param, state, g, *, weight_decay, **hyper)``, which updates one
    tensor from its float32 estimate ``g`` (consumed). Weight decay is passed only to the layout's
    decay group."""

    def step(
        layout: ParameterLayout,
        seeds,
        grads,
        state: State,
        *,
        weight_decay: float,
        direction: str = "gaussian",
        scales=None,
        backend: str | None = None,
        rank: int | None = None,
        u_seeds=None,
        **hyper,
    ) -> None:
        coeffs = [g / len(seeds) for g in grads]
        for j, slot in enumerate(layout.slots):
            p = slot.param.data
            g = F.materialise_estimate(
                p,
                slot.offset,
                seeds,
                coeffs,
                direction=direction,
                scales=None if scales is None else [row[j] for row in scales],
                backend=backend,
                rank=rank,
                u_seeds=u_seeds,
            )
            tensor_step(p, state[slot.param], g, weight_decay=weight_decay if slot.decay else 0.0, **hyper)
            del g

    return step


# -- the rules ------------------------------------------------------------------------------------
def _sgd_step(
    layout, seeds, grads, state, *, lr, weight_decay, direction, scales, backend, rank=None, u_seeds=None, **_
):
    F.zo_sgd(
        layout,
        seeds,
        grads,
        lr=lr,
        weight_decay=weight_decay,
        direction=direction,
        scales=scales,
        backend=backend,
        rank=rank,
        u_seeds=u_seeds,
    )


def _sgd_bound(m, d, params, state, *, lr, **_):
    return m + lr * d


def _momentum_tensor(p, st, g, *, lr, momentum, weight_decay, **_):
    if "momentum_buffer" not in st:
        st["momentum_buffer"] = torch.zeros_like(g)
    F.momentum_step_(p, st["momentum_buffer"], g, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _momentum_bound(m, d, params, state, *, lr, momentum, **_):
    bufs = [state[p]["momentum_buffer"] for p in params if "momentum_buffer" in state.get(p, {})]
    b = momentum * F.max_abs(bufs) + d
    return m + lr * b if b < _F32_MAX else math.inf


def _adam_tensor(p, st, g, *, lr, betas, adam_eps, weight_decay, **_):
    if "exp_avg" not in st:
        st.update(step=0, exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g))
    st["step"] += 1
    F.adam_step_(
        p,
        st["exp_avg"],
        st["exp_avg_sq"],
        g,
        step=st["step"],
        lr=lr,
        betas=betas,
        adam_eps=adam_eps,
        weight_decay=weight_decay,
    )


def _adam_bound(m, d, params, state, *, lr, betas, adam_eps, **_):
    beta1, beta2 = betas
    sts = [state[p] for p in params if "exp_avg" in state.get(p, {})]
    step = 1 + (max(int(st["step"]) for st in sts) if sts else 0)
    m1 = beta1 * F.max_abs([st["exp_avg"] for st in sts]) + (1 - beta1) * d
    v1 = beta2 * F.max_abs([st["exp_avg_sq"] for st in sts]) + (1 - beta2) * d * d
    if not (m1 < _F32_MAX and v1 < _F32_MAX):
        return math.inf
    bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
    bound = m + lr / bias1 * m1 / adam_eps  # denominator >= adam_eps
    if beta1 * beta1 < beta2:  # |m| <= k sqrt(v) for a state built by this rule from zero
        k = (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1 * beta1 / beta2))
        bound = min(bound, m + lr / bias1 * k * math.sqrt(bias2))
    return bound


def _sign_tensor(p, st, g, *, lr, weight_decay, **_):
    F.sign_step_(p, g, lr=lr, weight_decay=weight_decay)


def _sign_bound(m, d, params, state, *, lr, weight_decay, **_):
    return m + lr * (1.0 + weight_decay * m)


RULES.register(UpdateRule("sgd", 0, _sgd_step, _sgd_bound, help="no state"))
RULES.register(
    UpdateRule(
        "momentum",
        1,
        per_tensor_step(_momentum_tensor),
        _momentum_bound,
        help="float32 state on the client: 1x the trainable parameters",
    )
)
RULES.register(UpdateRule("adam", 2, per_tensor_step(_adam_tensor), _adam_bound, help="2x"))
RULES.register(UpdateRule("sign", 0, per_tensor_step(_sign_tensor), _sign_bound, help="sign of the estimate"))


# -- what the optimizers call ---------------------------------------------------------------------
def rule_state_nbytes(variant: str, trainable_numel: int) -> int:
    """Bytes of optimizer state ``variant`` keeps for ``trainable_numel`` trainable elements."""
    return 4 * RULES[variant].state_elements * trainable_numel


def zo_step(
    variant: str,
    layout: ParameterLayout,
    seeds: Sequence[int],
    grads: Sequence[float],
    state: State,
    *,
    direction: str = "gaussian",
    scales: Sequence[Sequence[float]] | None = None,
    backend: str | None = None,
    rank: int | None = None,
    u_seeds: Sequence[int] | None = None,
    **hyper,
) -> None:
    """One update of ``variant`` (a name in :data:`RULES`) from ``Q`` seeds and their estimates ``g_q``.

    ``state`` maps each parameter to its dict of float32 state tensors (an ``Optimizer.state``),
    created by the rule on first use. Weight decay applies to the layout's decay group only.
    ``hyper``: every one of :data:`~hosl.optim.functional.STEP_HYPERPARAMETERS`
    (:func:`~hosl.optim.functional.step_hyperparameters` of a param group). ``rank`` and ``u_seeds``
    (the seeds of each direction's ``U``; default: ``seeds``) are the ``"lowrank"`` family's, passed
    to the rule only with that family.
    """
    extra = {} if direction != "lowrank" else {"rank": rank, "u_seeds": u_seeds}
    RULES[variant].step(
        layout, seeds, grads, state, direction=direction, scales=scales, backend=backend, **extra, **hyper
    )


def update_is_safe(
    variant: str,
    layout: ParameterLayout,
    grads: Sequence[float],
    state: State,
    *,
    direction: str = "gaussian",
    rank: int | None = None,
    **hyper,
) -> bool:
    """True when ``zo_step`` with these arguments (and any seeds) is certain to leave every weight
    (and the rule's float32 state) finite; False means skip the update.

    Checked before anything is written, from bounds rather than from the result, so nothing needs
    undoing and no copy of the weights is held: with ``M = max|w|`` (one read of the weights),
    ``S = sum_q |g_q| / Q * max|z|`` (the estimate's largest coordinate, ``max|z|`` from the
    direction family's ``max_abs``, at ``rank`` for ``"lowrank"``) and the rule's state maxima, the rule's worst-case ``|w_new|``
    must stay below the weight dtype's largest finite value (with a margin for rounding). The bound
    is loose only for weights or updates near that limit.
    """
    rule = RULES[variant]
    lr, weight_decay = hyper["lr"], hyper["weight_decay"]
    if not F.all_finite([lr, weight_decay, *grads]):
        return False
    params = [s.param for s in layout.slots]
    dtype_max = min(torch.finfo(p.dtype).max for p in params) * (1 - 2**-8)
    zmax = max(family_max_abs(direction, p.numel(), rank) for p in params)
    s = sum(abs(g) for g in grads) / len(grads) * zmax
    m = F.max_abs(params)
    d = s + weight_decay * m  # |estimate + decay|, the rules' input
    bound = rule.bound(m, d, params, state, **hyper)
    return math.isfinite(bound) and bound < dtype_max and d < _F32_MAX
