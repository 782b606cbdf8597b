"""Functional core of the zeroth-order update (the classes in this package are thin shells).

``projected_gradients`` turns losses at perturbed points into the directional-derivative estimates
``g_q``. The update rules then use the gradient estimate ``g = (1/Q) sum_q g_q z(s_q)``:

* ``zo_sgd`` (the default, the memory figure of record): ``w -= lr * (g + wd * w)`` in one fused
  pass per decay group; ``g`` is never materialised.
* ``momentum_step_``, ``adam_step_``, ``sign_step_`` (ZO-Bench's ZO-SGD-MMT, ZO-Adam and
  ZO-SGD-Sign): ``g`` is materialised for one parameter tensor at a time
  (``materialise_estimate``) and fed to the rule's float32 state. ``zo_step`` applies any rule to a
  whole :class:`~hosl.forward.layout.ParameterLayout`.

``direction`` is the direction family of ``hosl.ops`` (``"gaussian"``, ``"rademacher"``,
``"sphere"``). For ``"sphere"``, ``scales[q][j]`` is slot ``j``'s factor for seed ``q`` (from
:class:`~hosl.forward.layout.SphereScales`); None lets the ops compute them (one extra pass each).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence

import torch

from hosl import ops
from hosl.forward.layout import ParameterLayout

VARIANTS = ("sgd", "momentum", "adam", "sign")
# Per rule, the float32 state elements it keeps per trainable element (the memory planner's figure).
STATE_ELEMENTS = {"sgd": 0, "momentum": 1, "adam": 2, "sign": 0}
# The param_groups keys the rules read (ZOConfig's fields with param_group=True, eps aside).
STEP_HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "betas", "adam_eps")


def step_hyperparameters(group: dict) -> dict:
    """The keyword arguments :func:`zo_step` and :func:`update_is_safe` take from a param group."""
    return {k: tuple(group[k]) if k == "betas" else group[k] for k in STEP_HYPERPARAMETERS}


def rule_state_nbytes(variant: str, trainable_numel: int) -> int:
    """Bytes of optimizer state ``variant`` keeps for ``trainable_numel`` trainable elements."""
    if variant not in STATE_ELEMENTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return 4 * STATE_ELEMENTS[variant] * trainable_numel


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


def _slot_scales(scales, indices: Sequence[int]):
    """``scales`` (per seed, per layout slot) restricted to the slots ``indices``; None stays None."""
    if scales is None:
        return None
    return [[row[j] for j in indices] for row in scales]


def zo_sgd(
    layout: ParameterLayout,
    seeds: Sequence[int],
    grads: Sequence[float],
    *,
    lr: float,
    weight_decay: float = 0.0,
    direction: str = "gaussian",
    scales: Sequence[Sequence[float]] | None = None,
    backend: str | None = None,
) -> None:
    """One ZO-SGD step over all directions: ``w -= lr * (mean_q g_q z(s_q) + wd * w)``.

    Biases and norms (``layout``'s no-decay group) get no weight decay. Each group is one call of
    the fused multi-tensor ``zo_update_``: every weight is read and written once for all Q.
    """
    q = len(seeds)
    coeffs = [g / q for g in grads]
    index = {id(s.param): j for j, s in enumerate(layout.slots)}
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
                family=direction,
                scales=_slot_scales(scales, [index[id(s.param)] for s in slots]),
                backend=backend,
            )


def materialise_estimate(
    like: torch.Tensor,
    offset: int,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    *,
    direction: str = "gaussian",
    scales: Sequence[float] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_q coeffs[q] * z(seeds[q])`` at the coordinates of a tensor shaped ``like`` placed at
    ``offset``, as a new float32 tensor (accumulated in float32, directions in order).

    ``scales[q]`` is the tensor's sphere factor for seed ``q`` (``direction="sphere"``). Written by
    the ops' own update (``0 - (1 * -c_q) * z_q`` for each ``q``), so every backend gives the same bits.
    """
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    ops.zo_update_([out], seeds, [-c for c in coeffs], lr=1.0, offsets=[offset], family=direction,
                   scales=None if scales is None else [[s] for s in scales], backend=backend)
    return out


def _write(param: torch.Tensor, value32: torch.Tensor) -> None:
    """Store a float32 result into ``param`` (rounded to nearest even for half types)."""
    if value32.data_ptr() != param.data_ptr():
        param.copy_(value32)


def _with_decay(grad: torch.Tensor, w32: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """``grad + wd * w`` in place on ``grad`` (L2 decay, as torch's SGD and Adam add it)."""
    return grad.add_(w32, alpha=weight_decay) if weight_decay else grad


@torch.no_grad()
def momentum_step_(param: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, *, lr: float, momentum: float,
                   weight_decay: float = 0.0) -> None:
    """ZO-SGD with momentum (torch's SGD, no dampening): ``b = mu*b + (g + wd*w)``; ``w -= lr*b``.

    ``buf`` (float32, the state) is updated in place; ``grad`` (float32) is consumed.
    """
    w32 = param.float()
    d = _with_decay(grad, w32, weight_decay)
    buf.mul_(momentum).add_(d)
    _write(param, w32.add_(buf, alpha=-lr))


@torch.no_grad()
def adam_step_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, *,
               step: int, lr: float, betas: tuple[float, float], adam_eps: float, weight_decay: float = 0.0) -> None:
    """ZO-Adam (torch's Adam with L2 decay) on the estimate; ``step`` is this update's 1-based count.

    ``d = g + wd*w``; ``m = b1*m + (1-b1)*d``; ``v = b2*v + (1-b2)*d^2``;
    ``w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + adam_eps)``. ``exp_avg``/``exp_avg_sq``
    (float32) are updated in place; ``grad`` (float32) is consumed and reused for the denominator.
    """
    beta1, beta2 = betas
    w32 = param.float()
    d = _with_decay(grad, w32, weight_decay)
    exp_avg.mul_(beta1).add_(d, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(d, d, value=1.0 - beta2)
    bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    denom = torch.sqrt(exp_avg_sq, out=grad).div_(math.sqrt(bias2)).add_(adam_eps)
    _write(param, w32.addcdiv_(exp_avg, denom, value=-lr / bias1))


@torch.no_grad()
def sign_step_(param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0) -> None:
    """ZO-sign-SGD: ``w -= lr * (sign(g) + wd*w)`` (the sign of the estimate, not of each ``g_q``)."""
    w32 = param.float()
    d = _with_decay(grad.sign_(), w32, weight_decay)
    _write(param, w32.add_(d, alpha=-lr))


def zo_step(
    variant: str,
    layout: ParameterLayout,
    seeds: Sequence[int],
    grads: Sequence[float],
    state: MutableMapping[torch.Tensor, dict],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    direction: str = "gaussian",
    scales: Sequence[Sequence[float]] | None = None,
    backend: str | None = None,
) -> None:
    """One update of ``variant`` (see :data:`VARIANTS`) from ``Q`` seeds and their estimates ``g_q``.

    ``state`` maps each parameter to its dict of float32 state tensors (an ``Optimizer.state``),
    created here on first use: ``momentum_buffer`` (momentum), ``exp_avg``, ``exp_avg_sq`` and
    ``step`` (adam); sgd and sign keep none. Weight decay applies to the layout's decay group only.
    """
    if variant == "sgd":
        zo_sgd(layout, seeds, grads, lr=lr, weight_decay=weight_decay, direction=direction, scales=scales,
               backend=backend)
        return
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    coeffs = [g / len(seeds) for g in grads]
    for j, slot in enumerate(layout.slots):
        p = slot.param.data
        wd = weight_decay if slot.decay else 0.0
        g = materialise_estimate(p, slot.offset, seeds, coeffs, direction=direction,
                                 scales=None if scales is None else [row[j] for row in scales], backend=backend)
        st = state[slot.param]
        if variant == "momentum":
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(g)
            momentum_step_(p, st["momentum_buffer"], g, lr=lr, momentum=momentum, weight_decay=wd)
        elif variant == "adam":
            if "exp_avg" not in st:
                st.update(step=0, exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g))
            st["step"] += 1
            adam_step_(p, st["exp_avg"], st["exp_avg_sq"], g, step=st["step"], lr=lr, betas=betas,
                       adam_eps=adam_eps, weight_decay=wd)
        else:
            sign_step_(p, g, lr=lr, weight_decay=wd)
        del g


def state_nbytes(state: MutableMapping[torch.Tensor, dict]) -> int:
    """Bytes of the tensors held in an optimizer ``state``."""
    return sum(t.numel() * t.element_size() for st in state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """``count`` seeds in [0, 2**64) from ``generator`` (two 32-bit draws each)."""
    halves = torch.randint(0, 2**32, (count, 2), generator=generator, dtype=torch.int64)
    return [int(lo) | (int(hi) << 32) for lo, hi in halves.tolist()]


# -- finite guard: is a ZO update certain to leave every weight finite? ------------------------
# The largest |z_i| each family can produce: Box-Muller's radius from the smallest uniform the spec
# allows (u = 2**-24: sqrt(-2 ln u) = 5.77), +-1, and a sphere slice of norm sqrt(numel) (a factor
# of slack for the float32 rounding of the factor).
_GAUSSIAN_MAX = 5.8


def direction_max(direction: str, numel: int) -> float:
    """An upper bound on ``|z_i|`` over the coordinates of a tensor of ``numel`` elements."""
    if direction == "rademacher":
        return 1.0
    if direction == "sphere":
        return math.sqrt(numel) * 1.01
    return _GAUSSIAN_MAX


def _max_abs(tensors: Sequence[torch.Tensor]) -> float:
    """``max |t|`` over the tensors, one read of each (nan if any holds a NaN, inf an inf).
    ``aminmax`` per tensor: about 13x faster on CPU than ``_foreach_norm(inf)``."""
    if not tensors:
        return 0.0
    ends = [torch.stack(torch.aminmax(t.detach())).float().abs().max().cpu() for t in tensors]
    return float(torch.stack(ends).max())


def update_is_safe(
    variant: str,
    layout: ParameterLayout,
    seeds: Sequence[int],
    grads: Sequence[float],
    state: MutableMapping[torch.Tensor, dict],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    direction: str = "gaussian",
) -> bool:
    """True when ``zo_step`` with these arguments is certain to leave every weight (and the rule's
    float32 state) finite; False means skip the update.

    Checked before anything is written, from bounds rather than from the result, so nothing needs
    undoing and no copy of the weights is held: with ``M = max|w|`` (one read of the weights),
    ``S = sum_q |g_q| / Q * max|z|`` (the estimate's largest coordinate) and the rule's state maxima,
    each rule's worst-case ``|w_new|`` must stay below the weight dtype's largest finite value
    (with a margin for rounding). The bound is loose only for weights or updates near that limit.
    """
    if not all_finite([lr, weight_decay, *grads]):
        return False
    params = [s.param for s in layout.slots]
    dtype_max = min(torch.finfo(p.dtype).max for p in params) * (1 - 2**-8)
    f32_max = torch.finfo(torch.float32).max * (1 - 2**-8)
    zmax = max(direction_max(direction, p.numel()) for p in params)
    s = sum(abs(g) for g in grads) / len(grads) * zmax
    m = _max_abs(params)
    d = s + weight_decay * m  # |estimate + decay|, the rules' input
    if variant == "sgd":
        bound = m + lr * d
    elif variant == "sign":
        bound = m + lr * (1.0 + weight_decay * m)
    elif variant == "momentum":
        bufs = [state[p]["momentum_buffer"] for p in params if "momentum_buffer" in state.get(p, {})]
        b = momentum * _max_abs(bufs) + d
        if not b < f32_max:
            return False
        bound = m + lr * b
    elif variant == "adam":
        beta1, beta2 = betas
        sts = [state[p] for p in params if "exp_avg" in state.get(p, {})]
        step = 1 + (max(int(st["step"]) for st in sts) if sts else 0)
        m1 = beta1 * _max_abs([st["exp_avg"] for st in sts]) + (1 - beta1) * d
        v1 = beta2 * _max_abs([st["exp_avg_sq"] for st in sts]) + (1 - beta2) * d * d
        if not (m1 < f32_max and v1 < f32_max):
            return False
        bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        bound = m + lr / bias1 * m1 / adam_eps  # denominator >= adam_eps
        if beta1 * beta1 < beta2:  # |m| <= k sqrt(v) for a state built by this rule from zero
            k = (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1 * beta1 / beta2))
            bound = min(bound, m + lr / bias1 * k * math.sqrt(bias2))
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return math.isfinite(bound) and bound < dtype_max and d < f32_max
