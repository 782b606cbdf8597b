"""The direction ops declared once with ``torch.library``.

Each op is registered for the CPU and CUDA dispatch keys; its kernel hands the call to the backend
named by the ``backend`` argument, or to the fastest one available for the device
(:mod:`hosl.ops.dispatch`). Callers therefore never branch on device. Arguments arrive here already
validated by :mod:`hosl.ops.api`.
"""

from __future__ import annotations

from typing import Optional

import torch

from hosl.ops.dispatch import backend_for


@torch.library.custom_op("hosl::randn", mutates_args=())
def randn_op(
    key_lo: int,
    key_hi: int,
    numel: int,
    offset: int,
    device: torch.device,
    backend: Optional[str],
    family: str = "gaussian",
    scale: float = 1.0,
) -> torch.Tensor:
    if family == "gaussian":  # the backends' original signature
        return backend_for(device, backend).randn(key_lo, key_hi, numel, offset, device)
    return backend_for(device, backend).randn(key_lo, key_hi, numel, offset, device, family, scale)


@randn_op.register_fake
def _(key_lo, key_hi, numel, offset, device, backend, family="gaussian", scale=1.0):
    return torch.empty(numel, dtype=torch.float32, device=device)


@torch.library.custom_op("hosl::direction_sq_norms", mutates_args=())
def sq_norms_op(
    numels: list[int], offsets: list[int], key_lo: int, key_hi: int, device: torch.device, backend: Optional[str]
) -> torch.Tensor:
    """Per tensor, the fixed-point squared norm of its Gaussian slice (spec.sphere_sq_norm), int64 on CPU."""
    norms = backend_for(device, backend).sq_norms(numels, offsets, key_lo, key_hi, device)
    return torch.tensor(norms, dtype=torch.int64)


@sq_norms_op.register_fake
def _(numels, offsets, key_lo, key_hi, device, backend):
    return torch.empty(len(numels), dtype=torch.int64)


@torch.library.custom_op("hosl::perturb_", mutates_args=("tensors",))
def perturb_inplace_op(
    tensors: list[torch.Tensor],
    offsets: list[int],
    key_lo: int,
    key_hi: int,
    scale: float,
    backend: Optional[str],
    family: str = "gaussian",
    dir_scales: Optional[list[float]] = None,
) -> None:
    if tensors:
        _perturb(backend_for(tensors[0].device, backend), tensors, tensors, offsets, key_lo, key_hi, scale, family,
                 dir_scales)


@torch.library.custom_op("hosl::perturb_into", mutates_args=("out",))
def perturb_into_op(
    tensors: list[torch.Tensor],
    out: list[torch.Tensor],
    offsets: list[int],
    key_lo: int,
    key_hi: int,
    scale: float,
    backend: Optional[str],
    family: str = "gaussian",
    dir_scales: Optional[list[float]] = None,
) -> None:
    if tensors:
        _perturb(backend_for(tensors[0].device, backend), tensors, out, offsets, key_lo, key_hi, scale, family,
                 dir_scales)


def _perturb(module, tensors, outs, offsets, key_lo, key_hi, scale, family, dir_scales):
    if family == "gaussian":  # the backends' original signature
        module.perturb(tensors, outs, offsets, key_lo, key_hi, scale)
    else:
        module.perturb(tensors, outs, offsets, key_lo, key_hi, scale, family, dir_scales)


@torch.library.custom_op("hosl::zo_update_", mutates_args=("tensors",))
def zo_update_op(
    tensors: list[torch.Tensor],
    offsets: list[int],
    keys_lo: list[int],
    keys_hi: list[int],
    coeffs: list[float],
    decay: float,
    backend: Optional[str],
    family: str = "gaussian",
    dir_scales: Optional[list[float]] = None,
) -> None:
    if tensors and keys_lo:
        module = backend_for(tensors[0].device, backend)
        if family == "gaussian":  # the backends' original signature
            module.zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay)
        else:
            module.zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family, dir_scales)
    elif tensors and decay:
        backend_for(tensors[0].device, backend).zo_update(tensors, offsets, [], [], [], decay)


@torch.library.custom_op("hosl::perturbed_linear", mutates_args=())
def perturbed_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_offset: int,
    b_offset: Optional[int],
    keys_lo: list[int],
    keys_hi: list[int],
    scales: list[float],
    shared_x: bool,
    backend: Optional[str],
    family: str = "gaussian",
    factors: Optional[list[float]] = None,
) -> torch.Tensor:
    extra = () if family == "gaussian" else (family, factors)  # Gaussian: the backends' original signature
    return backend_for(weight.device, backend).perturbed_linear(
        x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, *extra
    )


@perturbed_linear_op.register_fake
def _(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, backend, family="gaussian",
      factors=None):
    return x.new_empty((len(scales), x.shape[-2], weight.shape[0]))


@torch.library.custom_op("hosl::perturbed_embedding", mutates_args=())
def perturbed_embedding_op(
    ids: torch.Tensor,
    weight: torch.Tensor,
    w_offset: int,
    keys_lo: list[int],
    keys_hi: list[int],
    scales: list[float],
    shared_ids: bool,
    backend: Optional[str],
    family: str = "gaussian",
    factors: Optional[list[float]] = None,
) -> torch.Tensor:
    extra = () if family == "gaussian" else (family, factors)
    return backend_for(weight.device, backend).perturbed_embedding(
        ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, *extra
    )


@perturbed_embedding_op.register_fake
def _(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, backend, family="gaussian", factors=None):
    return weight.new_empty((len(scales), ids.shape[-1], weight.shape[1]))
