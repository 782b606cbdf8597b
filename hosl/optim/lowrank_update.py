"""The ZO-SGD update of the ``"lowrank"`` direction family: one GEMM of rank ``Q*R`` per weight matrix.

``W -= lr * (sum_q c_q z_q + wd * W)`` with ``z_q = U_q V_q^T * c_R`` is
``W = (W - (lr*wd) W) + [U_1 .. U_Q] diag(-lr c_q c_R) [V_1 .. V_Q]^T``: the scaled ``U`` columns
and the ``V`` columns of all ``Q`` directions side by side, added in place with one ``addmm_``
(float32; a weight of another dtype is updated in a float32 copy and rounded back). Every tensor that
is not 2-D (biases, norms) gets the Gaussian update of ``hosl.ops.zo_update_``.

Not bit-identical to ``hosl.ops.zo_update_(family="lowrank")`` (the reference, which materialises
each ``z_q`` and subtracts them in order): the GEMM sums in its own order.
``tests/test_lowrank.py`` bounds the difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hosl import ops
from hosl.directions.spec import lowrank_factor
from hosl.ops import lowrank
from hosl.ops.dispatch import use_backend


def _matrix_step_(w: torch.Tensor, offset: int, seeds, u_seeds, coeffs, decay: float, rank: int) -> None:
    """``w = (w - decay*w) + sum_q (-coeffs[q] * c_R) U_q V_q^T`` in float32, one ``addmm_``."""
    w32 = w if w.dtype == torch.float32 else w.float()
    if decay:
        w32.sub_(w32 * torch.tensor(decay, dtype=torch.float32, device=w.device))
    m, n = w.shape
    us, vs = [], []
    for seed, u_seed, c in zip(seeds, u_seeds, coeffs):
        u, v = lowrank.factors((m, n), seed, offset, rank, w.device, u_seed)
        us.append(u * (-c * lowrank_factor(rank)))
        vs.append(v)
    w32.addmm_(torch.cat(us, dim=1), torch.cat(vs, dim=1).t())
    if w32 is not w:
        w.copy_(w32)


def lowrank_sgd(
    layout,
    seeds: Sequence[int],
    grads: Sequence[float],
    *,
    lr: float,
    weight_decay: float = 0.0,
    rank: int,
    u_seeds: Sequence[int] | None = None,
    backend: str | None = None,
) -> None:
    """One ZO-SGD step ``w -= lr * (mean_q g_q z_q + wd * w)`` of the ``"lowrank"`` family over a
    :class:`~hosl.forward.layout.ParameterLayout` (weight decay on its decay group only)."""
    q = len(seeds)
    coeffs = [lr * g / q for g in grads]
    u_seeds = list(seeds) if u_seeds is None else list(u_seeds)
    decayed, plain = layout.groups()
    for slots, wd in ((decayed, weight_decay), (plain, 0.0)):
        vectors = [s for s in slots if s.param.ndim != 2]
        if vectors:
            ops.zo_update_(
                [s.param.data for s in vectors],
                seeds,
                [g / q for g in grads],
                lr=lr,
                weight_decay=wd,
                offsets=[s.offset for s in vectors],
                family="gaussian",
                backend=backend,
            )
        decay = float(torch.tensor(lr * wd, dtype=torch.float32))
        with use_backend(backend), torch.no_grad():
            for s in slots:
                if s.param.ndim == 2:
                    _matrix_step_(s.param.data, s.offset, seeds, u_seeds, coeffs, decay, rank)
