"""A backend from a compiled extension: ``hosl._C`` (CPU) or ``hosl._C_cuda`` (CUDA).

Both extensions expose the four direction ops with one signature (csrc/bindings_common.h), so
:class:`CompiledBackend` turns either into the backend contract of :mod:`hosl.ops.backends`:
family names become the codes of :data:`hosl.directions.families.FAMILY_CODES`, and the perturbed
forwards are materialised with the extension's own ``perturb`` (:mod:`.materialised`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from hosl.directions.families import FAMILY_CODES
from hosl.ops.backends import materialised


def import_extension(name: str, hint: str) -> tuple[ModuleType | None, str]:
    """``(module, "")``, or ``(None, why)`` when the extension is not importable (not built, or
    built for another torch); ``hint`` says how to get it."""
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        return None, f"{name} is not importable ({exc}); {hint}"


def _device(device) -> torch.device:
    """The device to run on, with the current CUDA device made explicit (the kernels' guard needs an index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class CompiledBackend:
    """The contract's six functions over ``ext`` (arguments already checked by the ops of :mod:`hosl.ops.library`)."""

    def __init__(self, ext: ModuleType | None):
        self.ext: Any = ext  # the extension module; None only where the backend reports itself unavailable

    def functions(self) -> tuple[Callable[..., Any], ...]:
        """The contract's six functions, in its order: ``randn, perturb, zo_update, sq_norms,
        perturbed_linear, perturbed_embedding`` (what a backend module exports under those names)."""
        return self.randn, self.perturb, self.zo_update, self.sq_norms, self.perturbed_linear, self.perturbed_embedding

    def randn(self, key_lo, key_hi, numel, offset, device, family="gaussian", scale=1.0) -> torch.Tensor:
        return self.ext.randn(key_lo, key_hi, numel, offset, _device(device), FAMILY_CODES[family], scale)

    def perturb(self, tensors, outs, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None) -> None:
        self.ext.perturb(
            list(tensors),
            list(outs),
            list(offsets),
            key_lo,
            key_hi,
            scale,
            FAMILY_CODES[family],
            list(dir_scales or []),
        )

    def zo_update(self, tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None) -> None:
        self.ext.zo_update(
            list(tensors),
            list(offsets),
            list(keys_lo),
            list(keys_hi),
            list(coeffs),
            decay,
            FAMILY_CODES[family],
            list(dir_scales or []),
        )

    def sq_norms(self, numels, offsets, key_lo, key_hi, device) -> list[int]:
        return self.ext.sq_norms(list(numels), list(offsets), key_lo, key_hi, _device(device))

    def perturbed_linear(
        self, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian", factors=None
    ) -> torch.Tensor:
        """No fused kernel here: materialise W + scale*Z with this backend's perturb, then F.linear."""
        return materialised.perturbed_linear(
            self.perturb, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family, factors
        )

    def perturbed_embedding(
        self, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None
    ) -> torch.Tensor:
        """No fused kernel here: perturb only the rows looked up, with this backend's perturb."""
        return materialised.perturbed_embedding(
            self.perturb, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family=family, factors=factors
        )
