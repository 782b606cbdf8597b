"""Which perturber runs a module's perturbed forwards: ``perturbed_forward`` and ``query_batch``.

:func:`make_perturber` builds the one-point perturber of ``perturbed_forward`` (``"auto"``,
``"scratch"`` or ``"fused"``) with a line for the log saying which and why;
:func:`make_batched_perturber` builds the ``D``-points-per-forward perturber of ``query_batch > 1``.
Whether the fused kernels exist here is asked of :mod:`hosl.ops` (``ops.fused_kernels_reason``).
"""

from __future__ import annotations

from torch import nn

from hosl import ops
from hosl.forward.batched import BatchedPerturber
from hosl.forward.fused import FusedPerturber
from hosl.forward.layout import LowRankSeeds, ParameterLayout
from hosl.forward.scratch import ModuleScratchPerturber

PERTURBED_FORWARDS = ("auto", "scratch", "fused")


def fused_unavailable_reason(modules, backend: str | None) -> str:
    """Why ``"auto"`` does not pick the fused path for ``modules`` ("" when it does)."""
    devices = {p.device.type for m in modules for p in m.parameters()}
    if devices != {"cuda"}:
        return f"parameters on {sorted(devices)}, fused kernels are for CUDA (the interpreter is for tests)"
    return ops.fused_kernels_reason("cuda", backend)


def make_perturber(
    module: nn.Module,
    layout: ParameterLayout,
    backend: str | None,
    perturbed_forward: str,
    direction: str = "gaussian",
    sphere_scales=None,
    lowrank: LowRankSeeds | None = None,
):
    """The perturber for ``perturbed_forward`` (``"auto"``: fused where available, else scratch) and a
    line saying which and why, for the log.

    The fused linear/embedding ops (``hosl.ops.perturbed_linear`` / ``perturbed_embedding``) take
    every direction family, but the one-point :class:`~hosl.forward.fused.FusedPerturber` makes
    Gaussian and lowrank directions only: any other ``direction`` runs the scratch path (whatever
    ``perturbed_forward`` says), and the line says so; but ``"lowrank"``'s ``x W^T + s (x V) U^T``
    runs fused on any device (``lowrank``: its rank and U seeds) unless ``"scratch"`` is asked for.
    ``query_batch > 1`` (:func:`make_batched_perturber`) runs every family fused.
    """
    if perturbed_forward not in PERTURBED_FORWARDS:
        raise ValueError(f"perturbed_forward must be one of {PERTURBED_FORWARDS}, got {perturbed_forward!r}")
    if direction == "lowrank" and perturbed_forward != "scratch":
        low = FusedPerturber(module, layout, backend, fused_backend=backend, direction=direction, lowrank=lowrank)
        return low, f"perturbed forward: {low.describe()} (lowrank: x W^T + s (x V) U^T, any device)"
    if perturbed_forward == "scratch" or direction != "gaussian":
        p = ModuleScratchPerturber(
            module, layout, backend, direction=direction, sphere_scales=sphere_scales, lowrank=lowrank
        )
        why = (
            "asked for"
            if perturbed_forward == "scratch"
            else (
                f"perturbed_forward={perturbed_forward!r}, but the one-point fused perturber makes Gaussian "
                f"and lowrank directions only and direction={direction!r}"
            )
        )
        return p, f"perturbed forward: scratch, module at a time ({why}; {p.scratch_nbytes()} bytes of scratch)"
    if perturbed_forward == "auto":
        reason = fused_unavailable_reason([module], backend)
        if reason:
            # No fused kernels here, but the same swap with the device's materialising ops still wins:
            # each Linear gets W + s*eps*Z for the length of its own call, and embeddings perturb only
            # the rows looked up, so no vocabulary-sized scratch (bit-identical to the scratch path).
            p = FusedPerturber(module, layout, backend, fused_backend=backend)
            return p, f"perturbed forward: {p.describe()} ({reason}: materialising each layer in turn)"
    # "fused" (asked for, on any backend: off CUDA it runs the interpreter or the materialising ops)
    p = FusedPerturber(module, layout, backend, fused_backend=backend if backend is not None else "triton")
    return p, f"perturbed forward: {p.describe()}"


def make_batched_perturber(
    module: nn.Module,
    layout: ParameterLayout,
    backend: str | None,
    direction: str = "gaussian",
    sphere_scales=None,
    lowrank: LowRankSeeds | None = None,
):
    """The :class:`~hosl.forward.batched.BatchedPerturber` of ``query_batch > 1``: the fused
    Triton ops where ``"auto"`` would pick them (CUDA + Triton), else ``backend``'s materialising ops
    (one perturbed copy of one layer at a time). Every direction family runs fused."""
    fused_backend = "triton" if not fused_unavailable_reason([module], backend) else backend
    return BatchedPerturber(
        module,
        layout,
        backend,
        fused_backend=fused_backend,
        direction=direction,
        sphere_scales=sphere_scales,
        lowrank=lowrank,
    )
