"""Public direction ops: ``randn``, ``perturb_``, ``zo_update_``.

Coordinates of a list of tensors are numbered consecutively in list order, starting at ``offset``:
tensor ``j`` holds coordinates ``offset + sum(numel of tensors[:j]) + e``. ``z(seed, i)`` is the
direction spec of :mod:`hosl.directions.spec`; every backend gives the same bits.

``backend=`` (tests, benchmarks): run on the backend named, through :func:`hosl.ops.use_backend`;
None: the fastest available for the tensors' device.

These functions check and convert the user's arguments into the ops' (seeds into Philox keys,
``offset`` into per-tensor offsets that fit int64, ``lr * coeffs`` into float32...); the ops of
:mod:`hosl.ops.library` check the rest (tensor dtypes, devices, shapes, overlap, list lengths,
sphere sizes) whoever calls them.
"""

from __future__ import annotations

import math
from itertools import accumulate

import torch

from hosl.directions.families import FAMILIES
from hosl.directions.spec import sphere_scale, split_seed
from hosl.ops import library, lowrank, validation
from hosl.ops.dispatch import use_backend


def _offsets(tensors, offset: int, offsets) -> list[int]:
    """Each tensor's first coordinate: consecutive from ``offset``, or the explicit ``offsets``."""
    numels = [t.numel() for t in tensors]
    if offsets is None:
        offset = validation.check_index(offset, "offset")
        validation.check_coordinates(offset, sum(numels))
        return [offset + start for start in accumulate([0] + numels[:-1])] if numels else []
    if offset:
        raise ValueError("pass either offset or offsets, not both")
    checked = [validation.check_index(o, f"offsets[{j}]") for j, o in enumerate(offsets)]
    for j, (o, n) in enumerate(zip(checked, numels)):
        validation.check_coordinates(o, n, f"offsets[{j}]")
    return checked


def randn(
    seed: int,
    numel: int,
    offset: int = 0,
    *,
    family: str = "gaussian",
    device="cpu",
    backend: str | None = None,
    rank: int | None = None,
    shape=None,
    u_seed: int | None = None,
) -> torch.Tensor:
    """Coordinates ``offset .. offset+numel-1`` of ``z(seed)`` as a float32 tensor on ``device``.

    ``family``: ``"gaussian"`` (default), ``"rademacher"`` (+-1), or ``"sphere"``, for which the
    ``numel`` coordinates are treated as ONE tensor and rescaled to norm ``sqrt(numel)`` (the
    direction a tensor placed at ``offset`` gets from ``perturb_``/``zo_update_``).

    ``"lowrank"`` (``rank=R``): the ``numel`` coordinates are ONE tensor of ``shape`` (default: a
    vector, which gets the Gaussian z); a 2-D ``shape`` gives ``U V^T * c_R`` flattened, ``U`` from
    ``u_seed`` (default ``seed``). ``shape`` and ``u_seed`` are only for ``"lowrank"``.
    """
    family = validation.check_family(family)
    seed = validation.check_seed(seed)
    numel = validation.check_index(numel, "numel")
    offset = validation.check_index(offset, "offset")
    validation.check_coordinates(offset, numel)
    rank = lowrank.check_rank(family, rank)
    key_lo, key_hi = split_seed(seed)
    device = torch.device(device)
    if rank is None and (shape is not None or u_seed is not None):
        raise ValueError("shape and u_seed are only for family='lowrank'")
    if rank is not None:
        shape = (numel,) if shape is None else tuple(int(d) for d in shape)
        if math.prod(shape) != numel:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements, numel is {numel}")
        lowrank.check_shapes([shape], rank, ["shape"])
        u_seed = None if u_seed is None else validation.check_seed(u_seed, "u_seed")
    if device.type == "meta":  # shapes only, as torch.randn(..., device="meta") gives
        return torch.empty(numel if shape is None else shape, dtype=torch.float32, device=device)
    if rank is not None:
        with use_backend(backend):
            return lowrank.direction(shape, seed, offset, rank, device, u_seed)
    with use_backend(backend):
        factor = _sphere_factors([numel], [offset], seed, device)[0] if FAMILIES[family].per_tensor_factor else 1.0
        return library.randn_op(key_lo, key_hi, numel, offset, device, family, factor)


def _sphere_factors(numels, offsets, seed: int, device) -> list[float]:
    """Per tensor, the float32 factor of the sphere family (norms from the backend, scale on the host)."""
    if not numels:
        return []
    key_lo, key_hi = split_seed(seed)
    norms = library.sq_norms_op(list(numels), list(offsets), key_lo, key_hi, torch.device(device))
    return [sphere_scale(n, int(sq)) for n, sq in zip(numels, norms.tolist())]


def sphere_scales(tensors, seed: int, *, offset: int = 0, offsets=None, backend: str | None = None) -> list[float]:
    """The per-tensor factors of the ``"sphere"`` family for direction ``seed``: one float per tensor.

    ``perturb_``/``zo_update_`` compute them when ``family="sphere"`` is given without ``scales``;
    an optimizer that perturbs with one seed several times (+eps, -eps, restore, update) computes
    them once here and passes ``scales=`` (each computation is one extra pass of Philox+Box-Muller
    over the coordinates, with no memory traffic). Tensors are only read for numel and device.
    """
    tensors = validation.as_tensor_list(tensors, "tensors")
    seed = validation.check_seed(seed)
    offsets = _offsets(tensors, offset, offsets)
    numels = [t.numel() for t in tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    with use_backend(backend):
        return _sphere_factors(numels, offsets, seed, device)


def _family_scales(tensors, offsets, family: str, seeds, scales) -> list[float] | None:
    """Checked sphere factors, flattened ``[q * len(tensors) + j]``; None for the other families."""
    if not FAMILIES[family].per_tensor_factor:
        if scales is not None:
            raise ValueError(f"scales is only for family='sphere', not family={family!r}")
        return None
    if scales is None:
        numels = [t.numel() for t in tensors]
        device = tensors[0].device if tensors else torch.device("cpu")
        return [f for seed in seeds for f in _sphere_factors(numels, offsets, seed, device)]
    flat = []
    for q, row in enumerate(scales):
        flat += validation.check_scale_list(row, len(tensors), f"scales[{q}]" if len(seeds) > 1 else "scales")
    return flat


@torch.no_grad()
def perturb_(
    tensors,
    seed: int,
    scale: float,
    *,
    out=None,
    offset: int = 0,
    offsets=None,
    family: str = "gaussian",
    scales=None,
    backend: str | None = None,
    rank: int | None = None,
    u_seed: int | None = None,
):
    """``w + scale * z(seed)`` for every tensor ``w``: in place, or into ``out`` (weights untouched).

    ``offsets`` (one per tensor) places tensors at arbitrary coordinates instead of consecutively.
    ``family`` picks the direction (``"gaussian"``, ``"rademacher"``, ``"sphere"``); for
    ``"sphere"``, ``scales`` may pass the per-tensor factors from :func:`sphere_scales` (computed
    here otherwise), and ``z = float32(scales[j] * z_gaussian)``. ``"lowrank"`` takes ``rank=R`` (and
    ``u_seed``, the seed of ``U``; default ``seed``): each 2-D tensor's ``z`` is ``U V^T * c_R``.

    Math in float32, stored with round-to-nearest-even into each tensor's dtype. Returns the tensors
    written (``out`` if given, else ``tensors``).
    """
    family = validation.check_family(family)
    tensors = validation.as_tensor_list(tensors, "tensors")
    seed = validation.check_seed(seed)
    scale = validation.to_float32(scale, "scale")
    offsets = _offsets(tensors, offset, offsets)
    if out is not None:
        out = validation.as_tensor_list(out, "out")
    key_lo, key_hi = split_seed(seed)
    written = tensors if out is None else out
    rank = lowrank.check_rank(family, rank)
    if rank is not None:
        lowrank.check_shapes([t.shape for t in tensors], rank, [f"tensors[{j}]" for j in range(len(tensors))])
        if scales is not None:
            raise ValueError("scales is only for family='sphere', not family='lowrank'")
        u_seed = None if u_seed is None else validation.check_seed(u_seed, "u_seed")
        if tensors:
            validation.check_weights(tensors, "tensors")
            validation.check_outputs(tensors, written)
            with use_backend(backend):
                lowrank.perturb(tensors, written, offsets, seed, scale, rank, u_seed)
        return written
    if u_seed is not None:
        raise ValueError("u_seed is only for family='lowrank'")
    with use_backend(backend):
        factors = _family_scales(tensors, offsets, family, [seed], None if scales is None else [scales])
        if tensors:
            library.perturb_op(tensors, written, offsets, key_lo, key_hi, scale, family, factors)
    return written


@torch.no_grad()
def zo_update_(
    tensors,
    seeds,
    coeffs,
    *,
    lr: float,
    weight_decay: float = 0.0,
    offset: int = 0,
    offsets=None,
    family: str = "gaussian",
    scales=None,
    backend: str | None = None,
    rank: int | None = None,
    u_seeds=None,
):
    """``w -= lr * (sum_q coeffs[q] * z(seeds[q]) + weight_decay * w)``, all directions in one pass.

    In float32, per element: ``acc = w - (lr*wd)*w``, then ``acc -= (lr*c_q) * z_q`` for each q in
    order, where ``lr*wd`` and ``lr*c_q`` are rounded to float32 once; stored round-to-nearest-even.
    ``family`` as in :func:`perturb_`; for ``"sphere"``, ``scales[q]`` (optional) is direction
    ``q``'s per-tensor factor list from :func:`sphere_scales`. ``"lowrank"``: ``rank=R``, and
    ``u_seeds[q]`` the seed of direction ``q``'s ``U`` (default: ``seeds``); each 2-D ``z_q`` is
    materialised (the reference; the optimizers' update is one GEMM, ``hosl/optim/lowrank_update.py``).
    """
    family = validation.check_family(family)
    rank = lowrank.check_rank(family, rank)
    tensors = validation.as_tensor_list(tensors, "tensors")
    seeds = list(seeds) if not isinstance(seeds, torch.Tensor) else seeds.tolist()
    coeffs = list(coeffs) if not isinstance(coeffs, torch.Tensor) else coeffs.tolist()
    if len(seeds) != len(coeffs):
        raise ValueError(f"seeds has {len(seeds)} entries but coeffs has {len(coeffs)}; one coefficient per seed")
    seeds = [validation.check_seed(s, f"seeds[{q}]") for q, s in enumerate(seeds)]
    lr = validation.finite_real(lr, "lr")
    weight_decay = validation.finite_real(weight_decay, "weight_decay")
    coeffs = [validation.finite_real(c, f"coeffs[{q}]") for q, c in enumerate(coeffs)]
    scaled = [validation.to_float32(lr * c, f"lr*coeffs[{q}]") for q, c in enumerate(coeffs)]
    decay = validation.to_float32(lr * weight_decay, "lr*weight_decay")
    offsets = _offsets(tensors, offset, offsets)
    if scales is not None:
        scales = list(scales) if not isinstance(scales, torch.Tensor) else scales.tolist()
        if len(scales) != len(seeds):
            raise ValueError(f"scales has {len(scales)} entries but seeds has {len(seeds)}; one list per seed")
    keys = [split_seed(s) for s in seeds]
    if rank is not None:
        lowrank.check_shapes([t.shape for t in tensors], rank, [f"tensors[{j}]" for j in range(len(tensors))])
        if scales is not None:
            raise ValueError("scales is only for family='sphere', not family='lowrank'")
        if u_seeds is not None:
            u_seeds = [validation.check_seed(s, f"u_seeds[{q}]") for q, s in enumerate(u_seeds)]
            if len(u_seeds) != len(seeds):
                raise ValueError(f"u_seeds has {len(u_seeds)} entries but seeds has {len(seeds)}; one per seed")
        if tensors and (seeds or decay):
            validation.check_weights(tensors, "tensors")
            validation.check_step_fits(tensors, scaled, family, rank)
            with use_backend(backend):
                lowrank.zo_update(tensors, offsets, seeds, scaled, decay, rank, u_seeds)
        return tensors
    if u_seeds is not None:
        raise ValueError("u_seeds is only for family='lowrank'")
    with use_backend(backend):
        factors = _family_scales(tensors, offsets, family, seeds, scales)
        if not seeds:  # weight decay alone: no direction, so no family
            family, factors = "gaussian", None
        if tensors and (seeds or decay):
            library.zo_update_op(
                tensors, offsets, [k[0] for k in keys], [k[1] for k in keys], scaled, decay, family, factors
            )
    return tensors


def _directions(seeds, scales) -> tuple[list[int], list[int], list[float]]:
    """Philox keys and exact float32 scales of the directions ``(seeds[d], scales[d])``."""
    seeds = list(seeds) if not isinstance(seeds, torch.Tensor) else seeds.tolist()
    scales = list(scales) if not isinstance(scales, torch.Tensor) else scales.tolist()
    if len(seeds) != len(scales):
        raise ValueError(f"seeds has {len(seeds)} entries but scales has {len(scales)}; one scale per seed")
    if not seeds:
        raise ValueError("seeds is empty: at least one direction is needed")
    keys = [split_seed(validation.check_seed(s, f"seeds[{d}]")) for d, s in enumerate(seeds)]
    scales = [validation.to_float32(s, f"scales[{d}]") for d, s in enumerate(scales)]
    return [k[0] for k in keys], [k[1] for k in keys], scales


def _fused_family(family, rank, u_seeds) -> tuple[str, int | None]:
    """A perturbed forward's checked ``family`` and ``rank``; ``u_seeds`` goes only with ``"lowrank"``."""
    family = validation.check_family(family)
    rank = lowrank.check_rank(family, rank)
    if rank is None and u_seeds is not None:
        raise ValueError("u_seeds is only for family='lowrank'")
    return family, rank


def _lowrank_seeds(keys_lo, keys_hi, u_seeds, factors) -> tuple[list[int], list[int] | None]:
    """The seeds of a low-rank perturbed forward's directions (from their keys) and their checked
    ``u_seeds`` (None: the seeds); ``factors`` (the sphere family's) must be None."""
    if factors is not None:
        raise ValueError("factors is only for family='sphere', not family='lowrank'")
    seeds = [lo | (hi << 32) for lo, hi in zip(keys_lo, keys_hi)]
    if u_seeds is None:
        return seeds, None
    u_seeds = list(u_seeds) if not isinstance(u_seeds, torch.Tensor) else u_seeds.tolist()
    if len(u_seeds) != len(seeds):
        raise ValueError(f"u_seeds has {len(u_seeds)} entries but seeds has {len(seeds)}; one per direction")
    return seeds, [validation.check_seed(s, f"u_seeds[{d}]") for d, s in enumerate(u_seeds)]


def _fused_factors(family, factors, seeds, tensors, offsets, per: int) -> list[float] | None:
    """Sphere factors of the fused ops, flattened ``[d * per + j]`` (1.0 pads a bias left unperturbed)."""
    if not FAMILIES[family].per_tensor_factor:
        if factors is not None:
            raise ValueError(f"factors is only for family='sphere', not family={family!r}")
        return None
    seeds = list(seeds) if not isinstance(seeds, torch.Tensor) else seeds.tolist()
    if factors is None:
        numels = [t.numel() for t in tensors]
        factors = [_sphere_factors(numels, offsets, s, tensors[0].device) for s in seeds]
    factors = list(factors)
    if len(factors) != len(seeds):
        raise ValueError(f"factors has {len(factors)} entries but seeds has {len(seeds)}; one per direction")
    flat = []
    for d, row in enumerate(factors):
        row = validation.check_scale_list(list(row)[: len(tensors)], len(tensors), f"factors[{d}]")
        flat += row + [1.0] * (per - len(row))
    return flat


def _split_directions(t: torch.Tensor, num_dirs: int, per_direction: bool, what: str) -> tuple[torch.Tensor, tuple]:
    """``t`` as ``[D, rows, last]`` (per direction) or ``[rows, last]`` (shared), and the middle shape."""
    if t.ndim < 1:
        raise ValueError(f"{what} must have at least one dimension, got a scalar")
    if per_direction:
        if t.ndim < 2 or t.shape[0] != num_dirs:
            raise ValueError(f"{what} must be [D={num_dirs}, ...] with per_direction_input=True, got {tuple(t.shape)}")
        return t.reshape(num_dirs, -1, t.shape[-1]).contiguous(), tuple(t.shape[1:-1])
    return t.reshape(-1, t.shape[-1]).contiguous(), tuple(t.shape[:-1])


@torch.no_grad()
def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seeds,
    scales,
    weight_offset: int,
    bias_offset: int | None = None,
    per_direction_input: bool = False,
    family: str = "gaussian",
    factors=None,
    backend: str | None = None,
    rank: int | None = None,
    u_seeds=None,
) -> torch.Tensor:
    """``F.linear`` at ``D`` perturbed points at once, forward only; ``weight`` and ``bias`` are never written.

    ``y[d] = x[d] @ (W + scales[d] * Z_d)^T + (b + scales[d] * z_b,d)`` where ``Z_d[o, i] =
    z(seeds[d], weight_offset + o*in_features + i)`` (W's coordinates in the caller's numbering)
    and ``z_b,d[o] = z(seeds[d], bias_offset + o)``; ``bias_offset=None`` leaves the bias as is.
    The perturbed element is ``perturb_``'s ``fp32(w) + scale*z`` rounded into W's dtype.

    ``x`` is ``[..., in]``, the same for every direction, or with ``per_direction_input`` ``[D, ..., in]``.
    Returns ``[D, ..., out]`` in ``x``'s dtype (which must be W's, as for ``F.linear``).

    ``family``: the direction family, as for :func:`perturb_` (the rows of ``Z_d`` are the family's
    z at W's coordinates: bit-identical to ``perturb_(W, seeds[d], scales[d], family=...)``).
    ``"sphere"``: ``factors[d]`` is the pair ``(weight factor, bias factor)`` of direction ``d``
    (:func:`sphere_scales` of ``[weight, bias]`` at their offsets; computed here when None; the bias
    entry is unused when ``bias_offset`` is None).
    ``"lowrank"`` (``rank=R``; ``u_seeds[d]``: direction ``d``'s ``U`` seed, default ``seeds``):
    ``x W^T + s_d c_R (x V_d) U_d^T`` without forming ``W + s z`` (:mod:`hosl.ops.lowrank`; equal to the
    materialised forward up to matmul rounding); the bias gets its Gaussian z.
    """
    family, rank = _fused_family(family, rank, u_seeds)
    keys_lo, keys_hi, scales = _directions(seeds, scales)
    weight_offset = validation.check_index(weight_offset, "weight_offset")
    validation.check_coordinates(weight_offset, weight.numel(), "weight_offset")
    if bias_offset is not None:
        if bias is None:
            raise ValueError("bias_offset given without a bias")
        bias_offset = validation.check_index(bias_offset, "bias_offset")
        validation.check_coordinates(bias_offset, bias.numel(), "bias_offset")
    if rank is not None:
        seed_list, u_list = _lowrank_seeds(keys_lo, keys_hi, u_seeds, factors)
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        lowrank.check_shapes([weight.shape], rank, ["weight"])
        x2, middle = _split_directions(x, len(scales), per_direction_input, "x")
        if x2.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
            raise ValueError(
                f"x [..., {x2.shape[-1]}] {x.dtype} does not match weight {tuple(weight.shape)} {weight.dtype}"
            )
        with use_backend(backend):
            y = lowrank.linear(
                x2, weight, bias, weight_offset, bias_offset, seed_list, scales, not per_direction_input, rank, u_list
            )
        return y.reshape(len(scales), *middle, weight.shape[0])
    with use_backend(backend):
        flat = _fused_factors(
            family,
            factors,
            seeds,
            [weight] + ([bias] if bias_offset is not None else []),
            [weight_offset] + ([bias_offset] if bias_offset is not None else []),
            2,
        )
        x2, middle = _split_directions(x, len(scales), per_direction_input, "x")
        y = library.perturbed_linear_op(
            x2,
            weight,
            bias,
            weight_offset,
            bias_offset,
            keys_lo,
            keys_hi,
            scales,
            not per_direction_input,
            family,
            flat,
        )
    return y.view(len(scales), *middle, weight.shape[0])


@torch.no_grad()
def perturbed_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    seeds,
    scales,
    offset: int,
    per_direction_input: bool = False,
    family: str = "gaussian",
    factors=None,
    backend: str | None = None,
    rank: int | None = None,
    u_seeds=None,
) -> torch.Tensor:
    """``F.embedding(ids, W + scales[d] * Z_d)`` for ``D`` directions, perturbing only the rows looked up.

    ``Z_d[r, h] = z(seeds[d], offset + r*H + h)``; the rows are bit-identical to those of
    ``perturb_(weight, seed, scale, out=...)``, at a cost of ``tokens x H`` per direction, never
    ``vocab x H``. ``weight`` is never written. ``ids`` (integers in ``[0, vocab)``) is ``[...]``, the same
    for every direction, or with ``per_direction_input`` ``[D, ...]``. Returns ``[D, ..., H]``.
    ``family`` as for :func:`perturbed_linear`; ``"sphere"``: ``factors[d]`` is direction ``d``'s
    factor of the whole ``weight`` (:func:`sphere_scales`; computed here when None).
    ``"lowrank"`` (``rank=R``, ``u_seeds`` as for :func:`perturbed_linear`): ``E[ids] + s_d c_R
    U_d[ids] V_d^T``, equal to the rows of ``W + s z`` up to the rounding of the rank-R product.
    """
    family, rank = _fused_family(family, rank, u_seeds)
    keys_lo, keys_hi, scales = _directions(seeds, scales)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise IndexError(f"ids must lie in [0, {weight.shape[0]}), got [{int(ids.min())}, {int(ids.max())}]")
    offset = validation.check_index(offset, "offset")
    validation.check_coordinates(offset, weight.numel())
    ids2, middle = _split_directions(ids.long().unsqueeze(-1), len(scales), per_direction_input, "ids")
    ids2 = ids2.squeeze(-1).contiguous()
    if rank is not None:
        seed_list, u_list = _lowrank_seeds(keys_lo, keys_hi, u_seeds, factors)
        lowrank.check_shapes([weight.shape], rank, ["weight"])
        with use_backend(backend):
            y = lowrank.embedding(ids2, weight, offset, seed_list, scales, not per_direction_input, rank, u_list)
        return y.reshape(len(scales), *middle, weight.shape[1])
    if FAMILIES[family].per_tensor_factor and factors is not None:
        factors = [[f] for f in (factors.tolist() if isinstance(factors, torch.Tensor) else factors)]
    with use_backend(backend):
        flat = _fused_factors(family, factors, seeds, [weight], [offset], 1)
        y = library.perturbed_embedding_op(
            ids2, weight, offset, keys_lo, keys_hi, scales, not per_direction_input, family, flat
        )
    return y.view(len(scales), *middle, weight.shape[1])
