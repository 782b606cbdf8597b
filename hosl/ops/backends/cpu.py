"""The C++ CPU backend: ``hosl._C`` (csrc/cpu/), OpenMP over SIMD loops, bit-identical to the spec.

Threads: the kernels use as many OpenMP threads as ``torch.get_num_threads()``. The SIMD variant
(AVX-512 / AVX2 / scalar) is picked when ``hosl._C`` loads; ``isa()`` names it, and the environment
variable ``HOSL_CPU_ISA`` can lower it.
"""

from __future__ import annotations

import torch

from hosl.ops.backends import materialised

DEVICE_TYPES = ("cpu",)

try:
    from hosl import _C
except ImportError as exc:  # not built (pip install --no-build-isolation -e .) or built for another torch
    _C = None
    _IMPORT_ERROR = f"hosl._C is not importable ({exc}); build it with `pip install --no-build-isolation -e .`"
else:
    _IMPORT_ERROR = ""


def is_available() -> bool:
    return _C is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR


def isa() -> str:
    """The SIMD variant in use: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return _C.isa()


_FAMILY_CODES = {"gaussian": 0, "rademacher": 1, "sphere": 2}  # hosl::Family


def randn(key_lo: int, key_hi: int, numel: int, offset: int, device, family="gaussian", scale=1.0) -> torch.Tensor:
    return _C.randn(key_lo, key_hi, numel, offset, _FAMILY_CODES[family], scale)


def perturb(tensors, outs, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None) -> None:
    _C.perturb(list(tensors), list(outs), list(offsets), key_lo, key_hi, scale, _FAMILY_CODES[family],
               list(dir_scales or []))


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None) -> None:
    _C.zo_update(list(tensors), list(offsets), list(keys_lo), list(keys_hi), list(coeffs), decay,
                 _FAMILY_CODES[family], list(dir_scales or []))


def sq_norms(numels, offsets, key_lo, key_hi, device) -> list[int]:
    return _C.sq_norms(list(numels), list(offsets), key_lo, key_hi)


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
