"""The CUDA backend: ``hosl._C_cuda`` (csrc/cuda/), one kernel launch per dtype, bit-identical to the spec."""

from __future__ import annotations

import torch

from hosl.ops.backends import materialised

DEVICE_TYPES = ("cuda",)

try:
    from hosl import _C_cuda
except ImportError as exc:  # a CPU torch, no nvcc at build time, or built for another torch
    _C_cuda = None
    _IMPORT_ERROR = (
        f"hosl._C_cuda is not importable ({exc}); it is built by `pip install --no-build-isolation -e .` "
        "when torch has CUDA and a CUDA toolkit is found (CUDA_HOME)"
    )
else:
    _IMPORT_ERROR = ""


def is_available() -> bool:
    return _C_cuda is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    if _C_cuda is None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return ""


_FAMILY_CODES = {"gaussian": 0, "rademacher": 1, "sphere": 2}  # hosl::Family


def _device(device):
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def randn(key_lo: int, key_hi: int, numel: int, offset: int, device, family="gaussian", scale=1.0) -> torch.Tensor:
    return _C_cuda.randn(key_lo, key_hi, numel, offset, _device(device), _FAMILY_CODES[family], scale)


def perturb(tensors, outs, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None) -> None:
    _C_cuda.perturb(list(tensors), list(outs), list(offsets), key_lo, key_hi, scale, _FAMILY_CODES[family],
                    list(dir_scales or []))


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None) -> None:
    _C_cuda.zo_update(list(tensors), list(offsets), list(keys_lo), list(keys_hi), list(coeffs), decay,
                      _FAMILY_CODES[family], list(dir_scales or []))


def sq_norms(numels, offsets, key_lo, key_hi, device) -> list[int]:
    return _C_cuda.sq_norms(list(numels), list(offsets), key_lo, key_hi, _device(device))


def perturbed_linear(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian",
                     factors=None) -> torch.Tensor:
    """No fused kernel here: materialise W + scale*Z with this backend's perturb, then F.linear."""
    return materialised.perturbed_linear(perturb, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales,
                                         shared_x, family, factors)


def perturbed_embedding(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian",
                        factors=None) -> torch.Tensor:
    """No fused kernel here: perturb only the rows looked up with this backend's perturb."""
    return materialised.perturbed_embedding(perturb, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids,
                                            family=family, factors=factors)
