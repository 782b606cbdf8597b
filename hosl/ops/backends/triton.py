"""The Triton backend: the kernels of :mod:`hosl.kernels` behind the backend contract.

On a GPU it runs on CUDA tensors. With ``TRITON_INTERPRET=1`` (set before this module is imported)
Triton interprets the same kernels on CPU tensors; the test suite uses that on machines without a
GPU, so there ``DEVICE_TYPES`` is ``("cpu",)``. The interpreter is far too slow for real use.
"""

from __future__ import annotations

from hosl.ops.backends import materialised

try:
    import hosl.kernels.api as _k
except ImportError as exc:  # triton missing, or a triton too old for the kernels
    _k = None
    _IMPORT_ERROR = f"cannot import hosl.kernels.api ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = ""

# Triton decides interpreted-or-compiled when the kernels are decorated, i.e. at that import.
DEVICE_TYPES = ("cpu",) if _k is not None and _k.INTERPRET else ("cuda",)


def unavailable_reason() -> str:
    if _k is None:
        return _IMPORT_ERROR
    if _k.INTERPRET:
        return ""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing hosl to interpret on CPU)"
    return ""


def is_available() -> bool:
    return unavailable_reason() == ""


def randn(key_lo, key_hi, numel, offset, device, family="gaussian", scale=1.0):
    return _k.randn(key_lo, key_hi, numel, offset, device, family, scale)


def perturb(tensors, outs, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None) -> None:
    _k.perturb(tensors, outs, offsets, key_lo, key_hi, scale, family, dir_scales)


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None) -> None:
    _k.zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family, dir_scales)


def sq_norms(numels, offsets, key_lo, key_hi, device) -> list[int]:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _k.sq_norms(numels, offsets, key_lo, key_hi, device)


def perturbed_linear(
    x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian", factors=None
):
    if family not in _k.FUSED_FAMILIES:  # no fused tile for it yet: W + s*z with this backend's perturb
        return materialised.perturbed_linear(
            perturb, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family, factors
        )
    return _k.perturbed_linear(
        x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family=family, factors=factors
    )


def perturbed_embedding(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None):
    if family not in _k.FUSED_FAMILIES:
        return materialised.perturbed_embedding(
            perturb, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family=family, factors=factors
        )
    return _k.perturbed_embedding(
        ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family=family, factors=factors
    )
