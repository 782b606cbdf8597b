"""The ``"lowrank"`` direction family's ops, composed from the Gaussian kernels of the current backend.

A 2-D tensor ``W`` (m x n) at offset ``o`` gets ``z = U V^T * c_R`` (``docs/directions.md``,
"lowrank"; the executable definition is :func:`hosl.directions.spec.lowrank_reference`):
``U = gaussian(u_seed, m*R, o)`` as [m, R] and ``V = gaussian(seed, n*R, o + m*R)`` as [n, R]
come from the backend's own Gaussian ``randn`` (bit-identical on every backend), and the sum over
``r`` is :func:`hosl.directions.spec.lowrank_outer_sum`, plain torch elementwise ops (each one
correctly rounded float32 operation, no FMA, on any device). So ``perturb_`` and ``zo_update_`` give
the same bits on every backend. Every tensor that is not 2-D gets the Gaussian direction through
the backend's Gaussian kernels.

The perturbed forwards never form ``W + s z``: ``x (W + s z)^T = x W^T + s c_R (x V) U^T`` and an
embedding row ``E[i] + s c_R U[i] V^T``; with ``D`` directions, one GEMM ``x W^T`` over all rows and
a batched rank-``R`` term per direction. They equal the forward at the materialised ``W + s z`` up to
matmul rounding (not bit for bit), as the fused Triton linear does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hosl.directions.spec import lowrank_factor, lowrank_max_rank, lowrank_outer_sum, split_seed
from hosl.ops import library

GAUSSIAN = "gaussian"


def check_rank(family: str, rank, name: str = "rank") -> int | None:
    """``rank``: an integer >= 1 for ``family="lowrank"``, None for every other family."""
    if family != "lowrank":
        if rank is not None:
            raise ValueError(f"{name} is only for family='lowrank', not family={family!r}")
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name} must be an integer >= 1 with family='lowrank', got {rank!r}")
    return rank


def check_shapes(shapes, rank: int, names) -> None:
    """Refuse a ``rank`` too large for any 2-D shape: ``(m + n) * rank <= m * n`` (U and V live in
    the tensor's own coordinates); the error names the tensor, its shape and the largest rank."""
    for shape, name in zip(shapes, names):
        if len(shape) == 2 and rank > lowrank_max_rank(shape):
            m, n = shape
            raise ValueError(
                f"rank={rank} is too large for {name} of shape ({m}, {n}): U and V take (m + n) * rank "
                f"of its m * n coordinates, so rank <= {lowrank_max_rank(shape)}"
            )


def factors(
    shape, seed: int, offset: int, rank: int, device, u_seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [m, R], V [n, R])`` float32 of a 2-D tensor of ``shape`` at ``offset``, from the backend's
    Gaussian ``randn``: ``U`` from ``u_seed`` (default ``seed``), ``V`` from ``seed``."""
    m, n = shape
    if u_seed is None or u_seed == seed:
        uv = library.randn_op(*split_seed(seed), (m + n) * rank, offset, torch.device(device), GAUSSIAN, 1.0)
        return uv[: m * rank].view(m, rank), uv[m * rank :].view(n, rank)
    u = library.randn_op(*split_seed(u_seed), m * rank, offset, torch.device(device), GAUSSIAN, 1.0)
    v = library.randn_op(*split_seed(seed), n * rank, offset + m * rank, torch.device(device), GAUSSIAN, 1.0)
    return u.view(m, rank), v.view(n, rank)


def direction(shape, seed: int, offset: int, rank: int, device, u_seed: int | None = None) -> torch.Tensor:
    """The float32 ``z`` of ONE tensor of ``shape`` at ``offset`` (flat): low rank if 2-D, else Gaussian."""
    shape = tuple(shape)
    if len(shape) != 2:
        numel = 1
        for d in shape:
            numel *= d
        return library.randn_op(*split_seed(seed), numel, offset, torch.device(device), GAUSSIAN, 1.0)
    u, v = factors(shape, seed, offset, rank, device, u_seed)
    return lowrank_outer_sum(u, v, rank).reshape(-1)


def _split(tensors) -> tuple[list[int], list[int]]:
    """Indices of the 2-D tensors and of the others."""
    shaped = [j for j, t in enumerate(tensors) if t.ndim == 2]
    return shaped, [j for j in range(len(tensors)) if tensors[j].ndim != 2]


def perturb(tensors, outs, offsets, seed: int, scale: float, rank: int, u_seed: int | None = None) -> None:
    """``out = w + scale * z`` (float32, rounded into the dtype), as the ops' ``perturb``."""
    shaped, plain = _split(tensors)
    if plain:
        library.perturb_op(
            [tensors[j] for j in plain],
            [outs[j] for j in plain],
            [offsets[j] for j in plain],
            *split_seed(seed),
            scale,
            GAUSSIAN,
            None,
        )
    for j in shaped:
        w = tensors[j]
        z = direction(w.shape, seed, offsets[j], rank, w.device, u_seed)
        scaled = torch.tensor(scale, dtype=torch.float32, device=w.device) * z
        outs[j].copy_((w.reshape(-1).float() + scaled).view_as(w))


def zo_update(tensors, offsets, seeds, coeffs, decay: float, rank: int, u_seeds=None) -> None:
    """``acc = w - decay*w``, then ``acc = acc - c_q * z_q`` for each q in order (``coeffs``: the
    float32 ``lr * c_q``), as the ops' ``zo_update``; every 2-D ``z_q`` materialised (the reference)."""
    shaped, plain = _split(tensors)
    if plain:
        library.zo_update_op(
            [tensors[j] for j in plain],
            [offsets[j] for j in plain],
            [split_seed(s)[0] for s in seeds],
            [split_seed(s)[1] for s in seeds],
            list(coeffs),
            decay,
            GAUSSIAN,
            None,
        )
    u_seeds = list(seeds) if u_seeds is None else list(u_seeds)
    for j in shaped:
        w = tensors[j]
        w32 = w.reshape(-1).float()
        acc = w32 - torch.tensor(decay, dtype=torch.float32, device=w.device) * w32
        for seed, u_seed, c in zip(seeds, u_seeds, coeffs):
            z = direction(w.shape, seed, offsets[j], rank, w.device, u_seed)
            acc = acc - torch.tensor(c, dtype=torch.float32, device=w.device) * z
        w.copy_(acc.view_as(w))


def _stacked_factors(shape, seeds, u_seeds, offset: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` [D, m, R] and ``V`` [D, n, R] of the ``D`` directions."""
    pairs = [factors(shape, s, offset, rank, device, us) for s, us in zip(seeds, u_seeds)]
    return torch.stack([u for u, _ in pairs]), torch.stack([v for _, v in pairs])


def _coefficients(scales, rank: int, device) -> torch.Tensor:
    """``s_d * c_R`` per direction, float32 [D]."""
    return torch.tensor(scales, dtype=torch.float32, device=device) * lowrank_factor(rank)


def _perturbed_bias(bias, b_offset, seeds, scales, device) -> torch.Tensor:
    """``[D, out]``: the bias perturbed along each direction's Gaussian ``z``, as ``perturb_`` rounds it."""
    rows = []
    for seed, scale in zip(seeds, scales):
        out = torch.empty_like(bias)
        library.perturb_op([bias], [out], [b_offset], *split_seed(seed), scale, GAUSSIAN, None)
        rows.append(out)
    return torch.stack(rows)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias,
    w_offset: int,
    b_offset,
    seeds,
    scales,
    shared_x: bool,
    rank: int,
    u_seeds=None,
) -> torch.Tensor:
    """``y[d] = x[d] W^T + s_d c_R (x[d] V_d) U_d^T + b_d`` as ``[D, rows, out]``: one GEMM ``x W^T`` over
    every row (once, when ``x`` is shared), one batched rank-``R`` term. ``x``: ``[rows, in]`` shared,
    else ``[D, rows, in]``; ``b_d`` is the bias perturbed along direction ``d`` (``b_offset`` given)."""
    num_dirs = len(seeds)
    u_seeds = list(seeds) if u_seeds is None else list(u_seeds)
    m, n = weight.shape
    xs = x.unsqueeze(0) if shared_x else x
    rows = xs.shape[1]
    base = F.linear(xs.reshape(-1, n), weight).view(xs.shape[0], rows, m)
    u, v = _stacked_factors((m, n), seeds, u_seeds, w_offset, rank, x.device)
    xv = torch.matmul(xs, v.to(x.dtype))  # [D, rows, R] (a shared x broadcasts over D)
    xv = xv * _coefficients(scales, rank, x.device).to(x.dtype)[:, None, None]
    ut = u.to(x.dtype).transpose(1, 2)
    # in place where base has a row block per direction; a shared x's base broadcasts over D
    y = base.baddbmm_(xv, ut) if not shared_x else torch.baddbmm(base, xv, ut)
    if bias is not None:
        b = (
            _perturbed_bias(bias, b_offset, seeds, scales, x.device)
            if b_offset is not None
            else bias.expand(num_dirs, m)
        )
        y.add_(b[:, None, :].to(y.dtype))
    return y


def embedding(
    ids: torch.Tensor, weight: torch.Tensor, w_offset: int, seeds, scales, shared_ids: bool, rank: int, u_seeds=None
) -> torch.Tensor:
    """``y[d] = E[ids[d]] + s_d c_R U_d[ids[d]] V_d^T`` as ``[D, rows, H]``. ``ids``: ``[rows]`` shared, else
    ``[D, rows]``."""
    num_dirs = len(seeds)
    u_seeds = list(seeds) if u_seeds is None else list(u_seeds)
    ids2 = ids.unsqueeze(0).expand(num_dirs, -1) if shared_ids else ids
    u, v = _stacked_factors(tuple(weight.shape), seeds, u_seeds, w_offset, rank, weight.device)
    picked = torch.gather(u, 1, ids2[:, :, None].expand(-1, -1, rank))  # [D, rows, R]
    picked = picked * _coefficients(scales, rank, weight.device)[:, None, None]
    low = torch.bmm(picked, v.transpose(1, 2))  # [D, rows, H] float32
    base = F.embedding(ids2, weight)
    return (base.float() + low).to(weight.dtype) if weight.dtype != torch.float32 else base + low
