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

    A *shaped* family (``shaped_reference`` set: ``"lowrank"``) has ``code=None``: no kernel of its
    own. Its ``z`` depends on a tensor's shape and a rank ``R``: ``shaped_reference(seed, shape,
    offset, rank)`` is one tensor's ``z`` (float32, shaped), composed in :mod:`hosl.ops.lowrank`
    from the Gaussian kernels of every backend; ``reference`` is the ``z`` of a tensor it leaves
    Gaussian (vectors), ``rank_max_abs(R)`` bounds ``|z_i|`` at rank ``R`` and ``max_abs(numel)``
    at any rank a tensor of ``numel`` elements allows.
    """

    name: str
    code: int | None
    reference: Callable[[int, int, int], torch.Tensor]
    max_abs: Callable[[int], float]
    help: str
    per_tensor_factor: bool = False
    coords_per_counter: int = 4
    compile_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    shaped_reference: Callable[..., torch.Tensor] | None = None
    rank_max_abs: Callable[[int], float] | None = None

    @property
    def shaped(self) -> bool:
        return self.shaped_reference is not None


FAMILIES: Registry[DirectionFamily] = Registry("direction family", unique=("code",))


def kernel_families() -> tuple[DirectionFamily, ...]:
    """The registered families with kernels of their own (a code), in registration order."""
    return tuple(f for f in FAMILIES.entries() if f.code is not None)


class _Codes(Mapping):
    """``{name: code}`` of the registered families with a kernel code, read live (what the kernels'
    callers index); a shaped family (no code) is not in it."""

    def __getitem__(self, name: str) -> int:
        code = FAMILIES[name].code if name in FAMILIES else None
        if code is None:
            raise KeyError(name)
        return code

    def __iter__(self):
        return iter(tuple(f.name for f in kernel_families()))

    def __len__(self) -> int:
        return len(kernel_families())

    def __repr__(self) -> str:
        return repr(dict(self))


FAMILY_CODES: Mapping[str, int] = _Codes()


def direction_reference(family: str, seed: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Coordinates ``offset .. offset+numel-1`` of ``family``'s direction (per-tensor factor: as ONE
    tensor; a shaped family: as a vector, which it leaves Gaussian)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    return FAMILIES[family].reference(seed, numel, offset)


def family_max_abs(family: str, numel: int, rank: int | None = None) -> float:
    """The bound on ``|z_i|`` of ``family`` over a tensor of ``numel`` elements (a shaped family at
    ``rank`` when given, else at the largest rank such a tensor allows)."""
    entry = FAMILIES[family]
    if entry.rank_max_abs is not None and rank is not None:
        return max(entry.max_abs(1), entry.rank_max_abs(rank))
    return entry.max_abs(numel)


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


def _lowrank_rank_max_abs(rank: int) -> float:
    """``|sum_r U_ir V_jr| * c_R <= R * G**2 / sqrt(R) = sqrt(R) * G**2`` (1% slack for the roundings)."""
    return math.sqrt(rank) * GAUSSIAN_MAX**2 * 1.01


def _lowrank_max_abs(numel: int) -> float:
    """Any rank a tensor allows: ``(m + n) R <= m n`` and ``m + n >= 2 sqrt(m n)`` give ``R <= sqrt(numel) / 2``."""
    return max(GAUSSIAN_MAX, _lowrank_rank_max_abs(max(1, math.isqrt(numel) // 2)))


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
FAMILIES.register(
    DirectionFamily(
        "lowrank",
        None,
        spec.randn_reference,
        _lowrank_max_abs,
        help="each 2-D weight z = U V^T / sqrt(R), Gaussian U [m, R], V [n, R] (--direction-rank R); vectors Gaussian",
        shaped_reference=spec.lowrank_reference,
        rank_max_abs=_lowrank_rank_max_abs,
    )
)
