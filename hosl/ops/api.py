"""Public direction ops: ``randn``, ``perturb_``, ``zo_update_``.

Coordinates of a list of tensors are numbered consecutively in list order, starting at ``offset``:
tensor ``j`` holds coordinates ``offset + sum(numel of tensors[:j]) + e``. ``z(seed, i)`` is the
direction spec of :mod:`hosl.directions.spec`; every backend gives the same bits.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from hosl.directions.spec import split_seed
from hosl.ops import library, validation


def _offsets(tensors, offset: int, offsets) -> list[int]:
    """Each tensor's first coordinate: consecutive from ``offset``, or the explicit ``offsets``."""
    numels = [t.numel() for t in tensors]
    if offsets is None:
        offset = validation.check_index(offset, "offset")
        validation.check_coordinates(offset, sum(numels))
        return [offset + start for start in accumulate([0] + numels[:-1])] if numels else []
    if offset:
        raise ValueError("pass either offset or offsets, not both")
    offsets = list(offsets)
    if len(offsets) != len(tensors):
        raise ValueError(f"offsets has {len(offsets)} entries but tensors has {len(tensors)}; one per tensor")
    checked = [validation.check_index(o, f"offsets[{j}]") for j, o in enumerate(offsets)]
    for o, n in zip(checked, numels):
        validation.check_coordinates(o, n)
    return checked


def randn(seed: int, numel: int, offset: int = 0, *, device="cpu", backend: str | None = None) -> torch.Tensor:
    """Coordinates ``offset .. offset+numel-1`` of ``z(seed)`` as a float32 tensor on ``device``."""
    seed = validation.check_seed(seed)
    numel = validation.check_index(numel, "numel")
    offset = validation.check_index(offset, "offset")
    validation.check_coordinates(offset, numel)
    key_lo, key_hi = split_seed(seed)
    return library.randn_op(key_lo, key_hi, numel, offset, torch.device(device), backend)


@torch.no_grad()
def perturb_(
    tensors, seed: int, scale: float, *, out=None, offset: int = 0, offsets=None, backend: str | None = None
):
    """``w + scale * z(seed)`` for every tensor ``w``: in place, or into ``out`` (weights untouched).

    ``offsets`` (one per tensor) places tensors at arbitrary coordinates instead of consecutively.

    Math in float32, stored with round-to-nearest-even into each tensor's dtype. Returns the tensors
    written (``out`` if given, else ``tensors``).
    """
    tensors = validation.as_tensor_list(tensors, "tensors")
    validation.check_weights(tensors, "tensors")
    seed = validation.check_seed(seed)
    scale = validation.to_float32(scale, "scale")
    offsets = _offsets(tensors, offset, offsets)
    key_lo, key_hi = split_seed(seed)
    if out is None:
        library.perturb_inplace_op(tensors, offsets, key_lo, key_hi, scale, backend)
        return tensors
    out = validation.as_tensor_list(out, "out")
    validation.check_outputs(tensors, out)
    library.perturb_into_op(tensors, out, offsets, key_lo, key_hi, scale, backend)
    return out


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
    backend: str | None = None,
):
    """``w -= lr * (sum_q coeffs[q] * z(seeds[q]) + weight_decay * w)``, all directions in one pass.

    In float32, per element: ``acc = w - (lr*wd)*w``, then ``acc -= (lr*c_q) * z_q`` for each q in
    order, where ``lr*wd`` and ``lr*c_q`` are rounded to float32 once; stored round-to-nearest-even.
    """
    tensors = validation.as_tensor_list(tensors, "tensors")
    validation.check_weights(tensors, "tensors")
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
    keys = [split_seed(s) for s in seeds]
    library.zo_update_op(
        tensors, offsets, [k[0] for k in keys], [k[1] for k in keys], scaled, decay, backend
    )
    return tensors
