"""The direction families, one :class:`DirectionFamily` each in the registry :data:`FAMILIES`.

A family's entry is everything outside the kernels' element math that depends on which family it
is: its name, its integer code (the compiled and Triton kernels' ``FAMILY``; C++'s
``HOSL_FAMILIES`` in ``csrc/hosl_direction.h`` spells the same numbers, ``tests/test_family_codes.py``
checks), its reference generator (:mod:`hosl.directions.spec`, the definition every backend matches
bit for bit), the ``|z|`` bound of the optimizers' finite guard, its kernel launch layout and the
variants the ahead-of-time compile check builds, and its help text. The ops, the optimizers'
``direction=`` and ``--direction``, the finite guard and the Triton compile check all read this
registry; ``docs/extending.md`` lists what a new family needs besides its entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hosl._registry import Registry
from hosl.directions import spec

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DirectionFamily:
    """One direction family.

    ``reference(seed, numel, offset)``: coordinates ``offset .. offset+numel-1`` of the direction
    (a family with a per-tensor factor: of ONE tensor holding them), float32, in plain PyTorch.
    ``max_abs(numel)``: an upper bound on ``|z_i|`` over a tensor of ``numel`` elements (the finite
    guard, :func:`hosl.optim.rules.update_is_safe`). ``per_tensor_factor``: ``z`` is the Gaussian
    slice times one float32 factor per tensor that the host computes (the sphere's normalisation,
    ``hosl/ops/api.py``) and callers may pass as ``scales=``. ``coords_per_counter``: coordinates one
    Philox counter gives (the kernels' launch layout: 4 for Box-Muller families, 128 for one bit per
    coordinate). ``compile_dtypes``: the weight dtypes the Triton compile check builds the family's
    ``perturb``/``zo_update`` variants for.
    """

    name: str
    code: int
    reference: Callable[[int, int, int], torch.Tensor]
    max_abs: Callable[[int], float]
    help: str
    per_tensor_factor: bool = False
    coords_per_counter: int = 4
    compile_dtypes: tuple[torch.dtype, ...] = (torch.float32,)


FAMILIES: Registry[DirectionFamily] = Registry("direction family", unique=("code",))


class _Codes(Mapping):
    """``{name: code}`` of the registered families, read live (what the kernels' callers index)."""

    def __getitem__(self, name: str) -> int:
        if name not in FAMILIES:
            raise KeyError(name)
        return FAMILIES[name].code

    def __iter__(self):
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)

    def __repr__(self) -> str:
        return repr(dict(self))


FAMILY_CODES: Mapping[str, int] = _Codes()


def direction_reference(family: str, seed: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Coordinates ``offset .. offset+numel-1`` of ``family``'s direction (per-tensor factor: as ONE tensor)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    return FAMILIES[family].reference(seed, numel, offset)


# The |z| bounds: Box-Muller's radius from the smallest uniform the spec allows (u = 2**-24:
# sqrt(-2 ln u) = 5.77), +-1, and a sphere slice of norm sqrt(numel) (a factor of slack for the
# float32 rounding of the factor).
GAUSSIAN_MAX = 5.8

FAMILIES.register(
    DirectionFamily("gaussian", 0, spec.randn_reference, lambda numel: GAUSSIAN_MAX, help="", compile_dtypes=ALL_DTYPES)
)
FAMILIES.register(
    DirectionFamily(
        "rademacher",
        1,
        spec.rademacher_reference,
        lambda numel: 1.0,
        help="+-1",
        coords_per_counter=spec.RADEMACHER_COORDS_PER_COUNTER,
        compile_dtypes=(torch.float32, torch.bfloat16),
    )
)
FAMILIES.register(
    DirectionFamily(
        "sphere",
        2,
        spec.sphere_reference,
        lambda numel: math.sqrt(numel) * 1.01,
        help="Gaussian, each tensor scaled to norm sqrt(numel)",
        per_tensor_factor=True,
    )
)
