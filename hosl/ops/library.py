"""The direction ops, each declared once with ``torch.library``.

Each op's body is its default implementation, for device types without a kernel of their own: the
pure-PyTorch reference (:func:`hosl.ops.dispatch.backend_for` has nothing else to offer there).
``register_kernel`` adds one kernel per device type in :data:`DEVICE_TYPES`, which runs the backend
``backend_for`` picks for that device type: on cpu the C++ kernels, else the reference; on cuda the
CUDA kernels where they run on this GPU, else Triton, else the reference; or, inside
:func:`hosl.ops.use_backend`, the backend named there. So the choice of backend is never an op
argument, and callers never branch on device.

Every op checks its own arguments before a backend runs (``_check_*`` below, with the functions of
:mod:`hosl.ops.validation`), so ``torch.ops.hosl.*`` called directly refuses what could write out of
bounds, write a tensor twice or write inf, with the error the Python API gives, and writes nothing.
The registered fakes run the same checks except the memory-overlap ones (fake tensors have no
memory), so ``torch.compile`` sees them too. The checks cost O(number of tensors), never
O(elements): ``perturbed_embedding``'s ``ids`` are not read to check their range (the API does).
Once checked, every backend takes the arguments as they are (the contract of
:mod:`hosl.ops.backends`).
"""

from __future__ import annotations

import functools

import torch

from hosl.directions.families import FAMILIES
from hosl.ops import validation
from hosl.ops.dispatch import backend_for

DEVICE_TYPES = ("cpu", "cuda")


def _backend_call(function: str, check):
    """``impl(device_type, *args)``: ``check(*args)``, then backend function ``function`` of the backend
    for ``device_type``.

    torch may leave out an op's trailing arguments that equal their defaults; the backend functions
    and the checks have the same defaults (the contract of :mod:`hosl.ops.backends`), so ``*args``
    passes through.
    """

    def impl(device_type: str, *args):
        check(*args)
        return getattr(backend_for(device_type), function)(*args)

    return impl


def _first_device_type(tensors: list[torch.Tensor]) -> str:
    """The device type of a tensor list an op runs on, which must not be empty."""
    if not tensors:
        raise ValueError("tensors is empty; the op needs at least one tensor (its device picks the kernel)")
    return tensors[0].device.type


def _check_randn(key_lo, key_hi, numel, offset, device, family="gaussian", scale=1.0):
    validation.check_key_word(key_lo, "key_lo")
    validation.check_key_word(key_hi, "key_hi")
    validation.check_family(family)
    validation.check_index(numel, "numel")
    validation.check_offset(offset, numel, "offset")
    validation.to_float32(scale, "scale")
    if FAMILIES[family].per_tensor_factor:
        validation.check_sphere_numels([numel], "numel")


def _check_sq_norms(numels, offsets, key_lo, key_hi, device):
    for j, numel in enumerate(numels):
        validation.check_index(numel, f"numels[{j}]")
    validation.check_sphere_numels(numels, "numels")
    validation.check_offsets(offsets, numels)
    validation.check_key_word(key_lo, "key_lo")
    validation.check_key_word(key_hi, "key_hi")


def _check_perturb(tensors, out, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None, *, memory=True):
    validation.check_weights(tensors, "tensors", memory=memory)
    validation.check_outputs(tensors, out, memory=memory)
    validation.check_offsets(offsets, [t.numel() for t in tensors])
    validation.check_key_word(key_lo, "key_lo")
    validation.check_key_word(key_hi, "key_hi")
    validation.to_float32(scale, "scale")
    validation.check_family(family)
    _check_factors(family, dir_scales, 1, tensors, "dir_scales")


def _check_zo_update(
    tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None, *, memory=True
):
    validation.check_weights(tensors, "tensors", memory=memory)
    validation.check_offsets(offsets, [t.numel() for t in tensors])
    validation.check_keys(keys_lo, keys_hi, "coeffs", len(coeffs))
    validation.check_float32s(coeffs, "coeffs")
    validation.to_float32(decay, "decay")
    validation.check_family(family)
    _check_factors(family, dir_scales, len(coeffs), tensors, "dir_scales")
    validation.check_step_fits(tensors, coeffs, family)


def _check_factors(family, factors, directions, tensors, name):
    """``factors`` of a per-tensor factor family: one per tensor per direction, of tensors small enough."""
    if FAMILIES[family].per_tensor_factor:
        validation.check_sphere_numels([t.numel() for t in tensors], "tensors")
    validation.check_factors(family, factors, directions * len(tensors), name)


def _check_directions(keys_lo, keys_hi, scales, family, factors, factors_per_direction):
    """The D directions of a perturbed forward: keys, float32 scales, family and its factors."""
    validation.check_keys(keys_lo, keys_hi, "scales", len(scales))
    validation.check_float32s(scales, "scales")
    validation.check_family(family)
    validation.check_factors(family, factors, factors_per_direction * len(scales), "factors")


def _check_input(t, name, shared, num_dirs, dims):
    """``t`` has ``dims`` dimensions, the same for every direction (``shared``), or one more in front, D."""
    want = dims if shared else dims + 1
    if t.ndim != want or (not shared and t.shape[0] != num_dirs):
        per = "the same for every direction" if shared else f"the first D={num_dirs}, one per direction"
        raise ValueError(f"{name} must have {want} dimensions, {per}; got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()})")


def _check_perturbed_linear(
    x,
    weight,
    bias,
    w_offset,
    b_offset,
    keys_lo,
    keys_hi,
    scales,
    shared_x,
    family="gaussian",
    factors=None,
    *,
    memory=True,
):
    validation.check_weights([weight] + ([bias] if bias is not None else []), "weight/bias", memory=memory)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
            f"{'' if bias is None else ', ' + str(bias.dtype)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    _check_input(x, "x", shared_x, len(scales), 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    validation.check_offset(w_offset, weight.numel(), "w_offset")
    if b_offset is not None:
        if bias is None:
            raise ValueError("b_offset is given but bias is None; there is no bias to perturb")
        validation.check_offset(b_offset, bias.numel(), "b_offset")
    _check_directions(keys_lo, keys_hi, scales, family, factors, 2)
    if FAMILIES[family].per_tensor_factor:
        validation.check_sphere_numels(
            [weight.numel()] + ([bias.numel()] if b_offset is not None else []), "weight/bias"
        )


def _check_perturbed_embedding(
    ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None, *, memory=True
):
    validation.check_weights([weight], "weight", memory=memory)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [num_embeddings, embedding_dim], got shape {tuple(weight.shape)}")
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if ids.device != weight.device:
        raise ValueError(f"ids is on {ids.device} but weight is on {weight.device}")
    _check_input(ids, "ids", shared_ids, len(scales), 1)
    validation.check_offset(w_offset, weight.numel(), "w_offset")
    _check_directions(keys_lo, keys_hi, scales, family, factors, 1)
    if FAMILIES[family].per_tensor_factor:
        validation.check_sphere_numels([weight.numel()], "weight")


_randn = _backend_call("randn", _check_randn)
_perturb = _backend_call("perturb", _check_perturb)
_zo_update = _backend_call("zo_update", _check_zo_update)
_perturbed_linear = _backend_call("perturbed_linear", _check_perturbed_linear)
_perturbed_embedding = _backend_call("perturbed_embedding", _check_perturbed_embedding)
_sq_norms_list = _backend_call("sq_norms", _check_sq_norms)


def _sq_norms(device_type: str, *args) -> torch.Tensor:
    return torch.tensor(_sq_norms_list(device_type, *args), dtype=torch.int64)


@torch.library.custom_op("hosl::randn", mutates_args=())
def randn_op(
    key_lo: int,
    key_hi: int,
    numel: int,
    offset: int,
    device: torch.device,
    family: str = "gaussian",
    scale: float = 1.0,
) -> torch.Tensor:
    """float32 ``z(seed, offset + e)`` for ``e < numel`` on ``device`` (sphere: ``scale * z_gaussian``)."""
    return _randn(device.type, key_lo, key_hi, numel, offset, device, family, scale)


@randn_op.register_fake
def _(key_lo, key_hi, numel, offset, device, family="gaussian", scale=1.0):
    _check_randn(key_lo, key_hi, numel, offset, device, family, scale)
    return torch.empty(numel, dtype=torch.float32, device=device)


@torch.library.custom_op("hosl::direction_sq_norms", mutates_args=())
def sq_norms_op(numels: list[int], offsets: list[int], key_lo: int, key_hi: int, device: torch.device) -> torch.Tensor:
    """Per tensor, the fixed-point squared norm of its Gaussian slice (spec.sphere_sq_norm), int64 on CPU;
    computed on ``device``."""
    return _sq_norms(device.type, numels, offsets, key_lo, key_hi, device)


@sq_norms_op.register_fake
def _(numels, offsets, key_lo, key_hi, device):
    _check_sq_norms(numels, offsets, key_lo, key_hi, device)
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
    _perturb(_first_device_type(tensors), tensors, out, offsets, key_lo, key_hi, scale, family, dir_scales)


@perturb_op.register_fake
def _(tensors, out, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None):
    _check_perturb(tensors, out, offsets, key_lo, key_hi, scale, family, dir_scales, memory=False)


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
    """``w = round(w - decay*w - sum_q coeffs[q] * z_q)`` in place; ``tensors`` is not empty.

    Refuses coefficients whose step alone would write inf (:func:`hosl.ops.validation.check_step_fits`);
    ``w - decay*w`` is not bounded (that would read the weights), so a huge ``decay`` can still
    write inf: the optimizers' finite guard bounds both."""
    _zo_update(_first_device_type(tensors), tensors, offsets, keys_lo, keys_hi, coeffs, decay, family, dir_scales)


@zo_update_op.register_fake
def _(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None):
    _check_zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family, dir_scales, memory=False)


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
    return _perturbed_linear(
        weight.device.type, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family, factors
    )


@perturbed_linear_op.register_fake
def _(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian", factors=None):
    _check_perturbed_linear(
        x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family, factors, memory=False
    )
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
    return _perturbed_embedding(
        weight.device.type, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family, factors
    )


@perturbed_embedding_op.register_fake
def _(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None):
    _check_perturbed_embedding(
        ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family, factors, memory=False
    )
    return weight.new_empty((len(scales), ids.shape[-1], weight.shape[1]))


# The kernel per device type: the same implementation, bound to the device type torch dispatched on.
for _op, _impl in (
    (randn_op, _randn),
    (sq_norms_op, _sq_norms),
    (perturb_op, _perturb),
    (zo_update_op, _zo_update),
    (perturbed_linear_op, _perturbed_linear),
    (perturbed_embedding_op, _perturbed_embedding),
):
    for _device_type in DEVICE_TYPES:
        _op.register_kernel(_device_type, functools.partial(_impl, _device_type))
