"""Perturbed forwards through the fused ops: ``nn.Linear`` and ``nn.Embedding`` never materialise ``W + s*eps*z``.

:class:`FusedPerturber` is a :class:`~hosl.forward.scratch.ModuleScratchPerturber` whose
``perturbed(seed, scale)`` block swaps the forward of every eligible ``nn.Linear`` / ``nn.Embedding``
(an instance attribute ``forward``, removed on exit) for ``hosl.ops.perturbed_linear`` /
``hosl.ops.perturbed_embedding``, which generate ``scale * z(seed)`` at the layer's coordinates inside
the matmul / lookup (docs/optimizer.md, "Fused perturbed forwards"). Every other module that owns
parameters (LayerNorm, RMSNorm, ...: small) keeps the scratch path, and its scratch buffer now only
needs the largest of *those* modules.

Eligible: ``nn.Linear`` with ``nn.Linear.forward`` (a subclass that overrides ``forward`` may use its
weight in other ways: scratch), whose own parameters are ``weight`` (trainable) and optionally
``bias``; ``nn.Embedding`` without ``max_norm`` (which renormalises the weight in place). An
``nn.Embedding`` subclass with its own ``forward`` (OPT's learned positions shift the ids, then call
``nn.Embedding.forward``) runs that forward with ``F.embedding`` on its weight intercepted by a
``TorchFunctionMode``; a forward that never calls it raises instead of silently running unperturbed.

Difference from the scratch path: none in the perturbed weights (both round ``fp32(w) + scale*z`` to
the weight dtype), embedding outputs are bit-identical, and linear outputs differ only by the
matmul's summation order (and, on GPU, by Triton's tensor-core precision for fp32, which follows
``torch.backends.cuda.matmul.allow_tf32``; see ``kernels/perturbed_linear.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from hosl import ops
from hosl.forward.layout import LowRankSeeds, ParameterLayout
from hosl.forward.scratch import ModuleScratchPerturber

LINEAR, EMBEDDING, EMBEDDING_INTERCEPT = "linear", "embedding", "embedding-intercept"


def describe_fused(path: str, backend: str | None, fused: list) -> str:
    """``"PATH (BACKEND): N linear, M embedding layers"`` of a perturber's ``(module, kind, slots)`` list."""
    kinds = [kind for _, kind, _ in fused]
    linear = kinds.count(LINEAR)
    return f"{path} ({backend or 'default backend'}): {linear} linear, {len(kinds) - linear} embedding layers"


def fused_kind(mod: nn.Module, slots: dict) -> str | None:
    """How ``mod`` runs fused (``slots``: its trainable parameters by local name), or None for scratch."""
    own = dict(mod.named_parameters(recurse=False))
    if "weight" not in slots:
        return None
    if isinstance(mod, nn.Linear) and set(own) <= {"weight", "bias"}:
        if type(mod).forward is not nn.Linear.forward:
            return None
        if "bias" in own and own["bias"] is not None and "bias" not in slots and own["bias"].requires_grad:
            return None  # cannot happen with a layout of all trainable parameters; be safe
        return LINEAR
    if isinstance(mod, nn.Embedding) and set(own) == {"weight"} and mod.max_norm is None:
        return EMBEDDING if type(mod).forward is nn.Embedding.forward else EMBEDDING_INTERCEPT
    return None


class _InterceptEmbedding(TorchFunctionMode):
    """Within a module's forward: ``F.embedding(ids, weight, ...)`` on ``weight`` -> ``lookup(ids)``."""

    def __init__(self, weight: torch.Tensor, lookup):
        super().__init__()
        self.weight, self.lookup, self.hits = weight, lookup, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and len(args) >= 2 and args[1] is self.weight:
            self.hits += 1
            return self.lookup(args[0])
        return func(*args, **kwargs)


def intercepting_forward(mod: nn.Module, lookup, path: str, remedy: str):
    """``mod``'s own class forward, with its ``F.embedding`` call on ``mod.weight`` replaced by
    ``lookup(ids)``; a RuntimeError naming ``path`` and ``remedy`` when the forward never made that call."""
    class_forward = type(mod).forward

    def forward(*args, **kwargs):
        mode = _InterceptEmbedding(mod.weight, lookup)
        with mode:
            out = class_forward(mod, *args, **kwargs)
        if mode.hits == 0:
            raise RuntimeError(
                f"{type(mod).__name__}.forward did not call F.embedding on its weight, so the {path} "
                f"cannot perturb it; {remedy}"
            )
        return out

    return forward


class FusedPerturber(ModuleScratchPerturber):
    """Perturbed forwards of one module tree: Linear/Embedding fused, other owners via scratch.

    ``fused_backend`` is the ``hosl.ops`` backend of the fused ops (``"triton"`` fuses; the others
    materialise, which is only useful to test this class without Triton).
    """

    def __init__(
        self,
        module: nn.Module,
        layout: ParameterLayout,
        backend: str | None = None,
        fused_backend: str | None = "triton",
        direction: str = "gaussian",
        lowrank: LowRankSeeds | None = None,
    ):
        if direction not in ("gaussian", "lowrank"):
            raise ValueError(f"the one-point fused perturber makes Gaussian or lowrank directions, not {direction!r}")
        super().__init__(module, layout, backend, direction=direction, lowrank=lowrank)
        self.fused_backend = fused_backend
        self.fused: list[tuple[nn.Module, str, dict]] = []
        scratch_owners = []
        for mod, slots in self.owners:
            by_name = {s.name.rsplit(".", 1)[-1]: s for s in slots}
            kind = fused_kind(mod, by_name)
            if kind is None:
                scratch_owners.append((mod, slots))
            else:
                self.fused.append((mod, kind, by_name))
        self.owners = scratch_owners  # the scratch hooks and scratch size see only these

    def describe(self) -> str:
        return (
            f"{describe_fused('fused', self.fused_backend, self.fused)}; scratch: {len(self.owners)} other modules "
            f"({self.scratch_nbytes()} bytes of scratch)"
        )

    # -- the swapped forwards -----------------------------------------------------------------
    def _lowrank_options(self) -> dict:
        """The ``hosl.ops`` keywords of a low-rank direction (``x W^T + s (x V) U^T``: no kernel to pick)."""
        assert self.lowrank is not None
        return {"family": "lowrank", "backend": self.backend, **self.lowrank.op_options([self._seed])}

    def _linear(self, mod: nn.Linear, slots: dict):
        bias_slot = slots.get("bias")

        def forward(x):
            if self.lowrank is not None:
                options = self._lowrank_options()
            else:  # on CUDA the fused Triton linear only for few rows, else materialise + cuBLAS
                rows = x.numel() // max(x.shape[-1], 1)
                options = {"backend": ops.perturbed_linear_backend(rows, x.device, self.fused_backend)}
            return ops.perturbed_linear(
                x,
                mod.weight,
                mod.bias,
                seeds=[self._seed],
                scales=[self._scale],
                weight_offset=slots["weight"].offset,
                bias_offset=bias_slot.offset if bias_slot else None,
                **options,
            )[0]

        return forward

    def _lookup(self, mod: nn.Embedding, slots: dict):
        def lookup(ids):
            options = self._lowrank_options() if self.lowrank is not None else {"backend": self.fused_backend}
            return ops.perturbed_embedding(
                ids, mod.weight, seeds=[self._seed], scales=[self._scale], offset=slots["weight"].offset, **options
            )[0]

        return lookup

    def _embedding_intercept(self, mod: nn.Embedding, slots: dict):
        return intercepting_forward(mod, self._lookup(mod, slots), "fused path", "use perturbed_forward='scratch'")

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[None]:
        with super().perturbed(seed, scale):
            swapped = []
            try:
                for mod, kind, slots in self.fused:
                    if "forward" in mod.__dict__:
                        raise RuntimeError(
                            f"{type(mod).__name__} already has an instance forward; use perturbed_forward='scratch'"
                        )
                    make = {
                        LINEAR: self._linear,
                        EMBEDDING: lambda m, s: self._lookup(m, s),
                        EMBEDDING_INTERCEPT: self._embedding_intercept,
                    }[kind]
                    mod.forward = make(mod, slots)
                    swapped.append(mod)
                yield
            finally:
                for mod in swapped:
                    del mod.forward
