"""Where each trainable parameter of a ZO-trained module lives in the direction's coordinates.

The direction ``z(seed)`` is indexed by the coordinate's position in the module's flattened
parameter list, ordered by parameter name, so the numbering does not depend on construction order,
device or backend. Only seeds need be kept to rebuild any direction.

``offset`` places the module's first coordinate: a half of a split model numbered as part of the
whole (ZO-SL's server half starts where the client's coordinates end, as in the unsplit model's
numbering, where ``client.*`` sorts before ``server.*``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from hosl import ops

_NORM_HINTS = ("norm", "ln_", "layernorm")


@dataclass(frozen=True)
class ParameterSlot:
    name: str
    param: nn.Parameter
    offset: int  # first coordinate
    decay: bool  # weight decay applies (not to biases and norms, as in MeZO)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


class ParameterLayout:
    """The trainable parameters of ``module``, by name, with coordinate offsets and decay flags."""

    def __init__(self, module: nn.Module, offset: int = 0):
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an integer >= 0, got {offset!r}")
        owner = {}
        for mod_name, mod in module.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                owner[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
        named = sorted((n, p) for n, p in module.named_parameters() if p.requires_grad)
        slots, start = [], offset
        for name, p in named:
            no_decay = (
                name.endswith("bias")
                or p.ndim <= 1
                or _is_norm(owner[name])
                or any(h in name.lower() for h in _NORM_HINTS)
            )
            slots.append(ParameterSlot(name, p, start, not no_decay))
            start += p.numel()
        if not slots:
            raise ValueError("the module has no trainable parameters to optimise with ZO")
        self.slots: list[ParameterSlot] = slots
        self.offset: int = offset  # first coordinate
        self.numel: int = start - offset  # number of coordinates
        self.end: int = start  # one past the last coordinate
        self.by_param = {id(s.param): s for s in slots}
        self.index = {id(s.param): j for j, s in enumerate(slots)}  # slot number by parameter

    def __len__(self) -> int:
        return len(self.slots)

    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.slots]

    def groups(self) -> tuple[list[ParameterSlot], list[ParameterSlot]]:
        """(decayed, not decayed) slots."""
        return [s for s in self.slots if s.decay], [s for s in self.slots if not s.decay]

    def nbytes(self) -> int:
        return sum(s.param.numel() * s.param.element_size() for s in self.slots)


class SphereScales:
    """The ``"sphere"`` family's per-tensor factors of one layout, computed once per seed.

    ``scales(seed)`` is a list with one float per slot (layout order), from
    ``hosl.ops.sphere_scales`` (a pass of direction generation that stores nothing). A step uses
    each seed for its perturbed passes and for the update, so the factors of the last ``keep``
    seeds are kept (a few floats per tensor each); ``computed`` counts the passes actually made.
    """

    def __init__(self, layout: ParameterLayout, backend: str | None = None, keep: int = 1):
        self.layout, self.backend, self.keep = layout, backend, max(1, keep)
        self._cache: OrderedDict[int, list[float]] = OrderedDict()
        self.computed = 0

    def __call__(self, seed: int) -> list[float]:
        if seed in self._cache:
            self._cache.move_to_end(seed)
            return self._cache[seed]
        slots = self.layout.slots
        factors = ops.sphere_scales(
            [s.param.data for s in slots], seed, offsets=[s.offset for s in slots], backend=self.backend
        )
        self.computed += 1
        self._cache[seed] = factors
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return factors


class LowRankSeeds:
    """The ``"lowrank"`` family's options shared by a layout's perturbers and its update: the rank
    ``R`` and the seed of each direction's ``U`` (``resample_every``: the optimizer sets
    ``u_seeds``, ``{direction seed: U seed}``, each step; a seed not in it is its own U seed)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.u_seeds: dict[int, int] = {}

    def u_seed(self, seed: int) -> int:
        return self.u_seeds.get(seed, seed)

    def op_options(self, seeds) -> dict:
        """The ``rank`` and ``u_seeds`` keywords of the ``hosl.ops`` calls for directions ``seeds``."""
        return {"rank": self.rank, "u_seeds": [self.u_seed(s) for s in seeds]}
