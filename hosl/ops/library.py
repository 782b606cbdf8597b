"""The direction ops, each declared once with ``torch.library``.

Each op's body is its default implementation, for device types without a kernel of their own: the
pure-PyTorch reference (:func:`hosl.ops.dispatch.backend_for` has nothing else to offer there).
``register_kernel`` adds one kernel per device type in :data:`DEVICE_TYPES`, which runs the backend
``backend_for`` picks for that device type: on cpu the C++ kernels, else the reference; on cuda the
CUDA kernels where they run on this GPU, else Triton, else the reference; or, inside
:func:`hosl.ops.use_backend`, the backend named there. So the choice of backend is never an op
argument, and callers never branch on device.

Arguments arrive already validated by :mod:`hosl.ops.api`; every backend takes the family
arguments (the contract of :mod:`hosl.ops.backends`).
"""

from __future__ import annotations

import functools

import torch

from hosl.ops.dispatch import backend_for

DEVICE_TYPES = ("cpu", "cuda")


def _backend_call(function: str):
    """``impl(device_type, *args)``: backend function ``function`` of the backend for ``device_type``.

    torch may leave out an op's trailing arguments that equal their defaults; the backend functions
    have the same defaults (the contract of :mod:`hosl.ops.backends`), so ``*args`` passes through.
    """
    def impl(device_type: str, *args):
        return getattr(backend_for(device_type), function)(*args)

    return impl


_randn = _backend_call("randn")
_perturb = _backend_call("perturb")
_zo_update = _backend_call("zo_update")
_perturbed_linear = _backend_call("perturbed_linear")
_perturbed_embedding = _backend_call("perturbed_embedding")


def _sq_norms(device_type: str, *args) -> torch.Tensor:
    return torch.tensor(backend_for(device_type).sq_norms(*args), dtype=torch.int64)


@torch.library.custom_op("hosl::randn", mutates_args=())
def randn_op(
    key_lo: int, key_hi: int, numel: int, offset: int, device: torch.device, family: str = "gaussian",
    scale: float = 1.0,
) -> torch.Tensor:
    """float32 ``z(seed, offset + e)`` for ``e < numel`` on ``device`` (sphere: ``scale * z_gaussian``)."""
    return _randn(device.type, key_lo, key_hi, numel, offset, device, family, scale)


@randn_op.register_fake
def _(key_lo, key_hi, numel, offset, device, family="gaussian", scale=1.0):
    return torch.empty(numel, dtype=torch.float32, device=device)


@torch.library.custom_op("hosl::direction_sq_norms", mutates_args=())
def sq_norms_op(numels: list[int], offsets: list[int], key_lo: int, key_hi: int, device: torch.device) -> torch.Tensor:
    """Per tensor, the fixed-point squared norm of its Gaussian slice (spec.sphere_sq_norm), int64 on CPU;
    computed on ``device``."""
    return _sq_norms(device.type, numels, offsets, key_lo, key_hi, device)


@sq_norms_op.register_fake
def _(numels, offsets, key_lo, key_hi, device):
    return torch.empty(len(numels), dtype=torch.int64)


@torch.library.custom_op("hosl::perturb", mutates_args=("out",))
def perturb_op(
    tensors: list[torch.Tensor],
    out: list[torch.Tensor],
    offsets: list[int],
    key_lo: int,
    key_hi: int,
    scale: float,
    family: str = "gaussian",
    dir_scales: list[float] | None = None,
) -> None:
    """``out[j] = round(tensors[j] + scale * z)``; ``out`` may be ``tensors`` itself (in place).
    ``tensors`` is not empty (the device comes from it)."""
    _perturb(tensors[0].device.type, tensors, out, offsets, key_lo, key_hi, scale, family, dir_scales)


@torch.library.custom_op("hosl::zo_update_", mutates_args=("tensors",))
def zo_update_op(
    tensors: list[torch.Tensor],
    offsets: list[int],
    keys_lo: list[int],
    keys_hi: list[int],
    coeffs: list[float],
    decay: float,
    family: str = "gaussian",
    dir_scales: list[float] | None = None,
) -> None:
    """``w = round(w - decay*w - sum_q coeffs[q] * z_q)`` in place; ``tensors`` is not empty."""
    _zo_update(tensors[0].device.type, tensors, offsets, keys_lo, keys_hi, coeffs, decay, family, dir_scales)


@torch.library.custom_op("hosl::perturbed_linear", mutates_args=())
def perturbed_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_offset: int,
    b_offset: int | None,
    keys_lo: list[int],
    keys_hi: list[int],
    scales: list[float],
    shared_x: bool,
    family: str = "gaussian",
    factors: list[float] | None = None,
) -> torch.Tensor:
    """``[D, M, N]``: ``x[d] @ round(W + scales[d]*Z_d)^T + round(b + scales[d]*z_b,d)``."""
    return _perturbed_linear(weight.device.type, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales,
                             shared_x, family, factors)


@perturbed_linear_op.register_fake
def _(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian", factors=None):
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
    family: str = "gaussian",
    factors: list[float] | None = None,
) -> torch.Tensor:
    """``[D, T, H]``: rows ``ids`` of ``round(W + scales[d]*Z_d)``."""
    return _perturbed_embedding(weight.device.type, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids,
                                family, factors)


@perturbed_embedding_op.register_fake
def _(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None):
    return weight.new_empty((len(scales), ids.shape[-1], weight.shape[1]))


# The kernel per device type: the same implementation, bound to the device type torch dispatched on.
for _op, _impl in ((randn_op, _randn), (sq_norms_op, _sq_norms), (perturb_op, _perturb), (zo_update_op, _zo_update),
                   (perturbed_linear_op, _perturbed_linear), (perturbed_embedding_op, _perturbed_embedding)):
    for _device_type in DEVICE_TYPES:
        _op.register_kernel(_device_type, functools.partial(_impl, _device_type))
