"""Run a module at ``w + scale * z(seed)`` without writing ``w`` and without a second copy of it.

Module at a time: just before a module that owns parameters runs, its parameters are materialised
perturbed into a scratch buffer (``hosl.ops.perturb_(..., out=scratch)``) and the parameters are
pointed at the scratch views; just after, they are pointed back. The weights' own memory is never
written, so they come back bit-exact in any dtype, and the extra memory is the scratch: the largest
module's parameters (a stack, should a module with parameters nest inside another).

``direction`` is the ``hosl.ops`` direction family; for ``"sphere"`` the per-tensor factors of the
seed come from a :class:`~hosl.forward.layout.SphereScales` (shared with the optimizer's update, so
they are computed once per seed and step) and are passed to ``perturb_`` as ``scales=``; for
``"lowrank"`` a :class:`~hosl.forward.layout.LowRankSeeds` gives the rank and each seed's ``U`` seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hosl import ops
from hosl.directions.families import FAMILIES
from hosl.forward.layout import LowRankSeeds, ParameterLayout, SphereScales


def scratch_sizes(module: nn.Module, scratched: set) -> dict:
    """Per ``(dtype, device)``, the most elements of the parameters in ``scratched`` (ids) that any
    chain of nested modules of ``module`` holds at once: what a scratch stack for them must hold."""
    need: dict = {}

    def visit(mod: nn.Module, held: dict) -> None:
        held = dict(held)
        for p in mod.parameters(recurse=False):
            if id(p) in scratched:
                key = (p.dtype, p.device)
                held[key] = held.get(key, 0) + p.numel()
        for key, n in held.items():
            need[key] = max(need.get(key, 0), n)
        for child in mod.children():
            visit(child, held)

    visit(module, {})
    return need


class _ScratchStack:
    """One flat buffer per dtype, handed out last-in first-out."""

    def __init__(self, sizes: dict[tuple[torch.dtype, torch.device], int]):
        self.buffers = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
        self.tops = {key: 0 for key in sizes}

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        top = self.tops[key]
        self.tops[key] = top + like.numel()
        return self.buffers[key][top : top + like.numel()].view_as(like)

    def give_back(self, like: torch.Tensor) -> None:
        self.tops[(like.dtype, like.device)] -= like.numel()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class ModuleScratchPerturber:
    """Perturbed forwards of one module tree, one owning submodule at a time."""

    def __init__(
        self,
        module: nn.Module,
        layout: ParameterLayout,
        backend: str | None = None,
        direction: str = "gaussian",
        sphere_scales: SphereScales | None = None,
        lowrank: LowRankSeeds | None = None,
    ):
        if direction not in FAMILIES:
            raise ValueError(f"direction must be one of {FAMILIES}, got {direction!r}")
        if (direction == "lowrank") != (lowrank is not None):
            raise ValueError("lowrank (the rank and U seeds) is given with direction='lowrank' and only then")
        self.lowrank = lowrank
        self.module = module
        self.layout = layout
        self.backend = backend
        self.direction = direction
        if direction == "sphere" and sphere_scales is None:
            sphere_scales = SphereScales(layout, backend)
        self.sphere_scales = sphere_scales if direction == "sphere" else None
        self._factors: list[float] | None = None  # the current seed's sphere factors, per layout slot
        # submodules that own trainable parameters directly, with those parameters' slots
        self.owners: list[tuple[nn.Module, list]] = []
        for mod in module.modules():
            slots = [layout.by_param[id(p)] for p in mod.parameters(recurse=False) if id(p) in layout.by_param]
            if slots:
                self.owners.append((mod, slots))
        self._scratch: _ScratchStack | None = None
        self._seed: int | None = None
        self._scale = 0.0
        self._originals: dict[int, torch.Tensor] = {}

    def _scratch_sizes(self) -> dict:
        """Per dtype, the most scratch any chain of nested owners needs at once."""
        return scratch_sizes(self.module, {id(s.param) for _, slots in self.owners for s in slots})

    def scratch_nbytes(self) -> int:
        return sum(n * key[0].itemsize for key, n in self._scratch_sizes().items())

    def lowrank_options(self, seed: int) -> dict:
        """The ``rank`` and ``u_seed`` keywords of ``perturb_`` at ``seed`` (none for other families)."""
        if self.lowrank is None:
            return {}
        return {"rank": self.lowrank.rank, "u_seed": self.lowrank.u_seed(seed)}

    def factors_of(self, slots) -> list[float] | None:
        """The current seed's sphere factors of ``slots`` (None for the other families)."""
        if self._factors is None:
            return None
        return [self._factors[self.layout.index[id(s.param)]] for s in slots]

    # -- hooks ------------------------------------------------------------------------------
    def _pre_hook(self, slots):
        def hook(mod, args):
            params = [s.param for s in slots]
            outs = [self._scratch.take(p) for p in params]
            ops.perturb_(
                params,
                self._seed,
                self._scale,
                out=outs,
                offsets=[s.offset for s in slots],
                family=self.direction,
                scales=self.factors_of(slots),
                backend=self.backend,
                **self.lowrank_options(self._seed),
            )
            for p, out in zip(params, outs):
                self._originals[id(p)] = p.data
                p.data = out

        return hook

    def _post_hook(self, slots):
        def hook(mod, args, output):
            for s in reversed(slots):
                original = self._originals.pop(id(s.param), None)
                if original is not None:
                    self._scratch.give_back(s.param.data)
                    s.param.data = original

        return hook

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[None]:
        """Inside the block, forwards of the module see ``w + scale * z(seed)``; ``w`` is untouched."""
        if self._seed is not None:
            raise RuntimeError("perturbed() blocks of one module cannot nest")
        if self._scratch is None:
            self._scratch = _ScratchStack(self._scratch_sizes())
        factors = self.sphere_scales(seed) if self.sphere_scales is not None else None
        self._seed, self._scale, self._factors = seed, scale, factors
        handles = []
        try:
            for mod, slots in self.owners:
                handles.append(mod.register_forward_pre_hook(self._pre_hook(slots)))
                handles.append(mod.register_forward_hook(self._post_hook(slots), always_call=True))
            with torch.no_grad():
                yield
        finally:
            for h in handles:
                h.remove()
            # a forward that raised may have skipped a post hook: put every weight back
            for s in self.layout.slots:
                original = self._originals.pop(id(s.param), None)
                if original is not None:
                    s.param.data = original
            for key in self._scratch.tops:
                self._scratch.tops[key] = 0
            self._seed, self._factors = None, None
