"""The pure-PyTorch backend: slow, obvious, the definition the fast backends are tested against."""

from __future__ import annotations

import torch

from hosl.directions.families import FAMILIES, direction_reference
from hosl.directions.spec import randn_reference, sphere_sq_norm
from hosl.ops.backends import materialised

DEVICE_TYPES = ("cpu", "cuda")


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def _join(key_lo: int, key_hi: int) -> int:
    return key_lo | (key_hi << 32)


def _direction(family: str, seed: int, numel: int, offset: int, factor: float | None, device) -> torch.Tensor:
    """z of the family for one tensor; a per-tensor factor family: ``float32(factor * z_gaussian)``."""
    if FAMILIES[family].per_tensor_factor:
        z = randn_reference(seed, numel, offset)
        return (torch.tensor(factor, dtype=torch.float32) * z).to(device)
    return direction_reference(family, seed, numel, offset).to(device)


def randn(key_lo: int, key_hi: int, numel: int, offset: int, device, family="gaussian", scale=1.0) -> torch.Tensor:
    return _direction(family, _join(key_lo, key_hi), numel, offset, scale, device)


def perturb(tensors, outs, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None) -> None:
    seed = _join(key_lo, key_hi)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    for j, (w, out, offset) in enumerate(zip(tensors, outs, offsets)):
        factor = dir_scales[j] if FAMILIES[family].per_tensor_factor else None
        z = _direction(family, seed, w.numel(), offset, factor, w.device)
        out.copy_((w.reshape(-1).float() + scale_t.to(w.device) * z).view_as(w))


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None) -> None:
    seeds = [_join(lo, hi) for lo, hi in zip(keys_lo, keys_hi)]
    for j, (w, offset) in enumerate(zip(tensors, offsets)):
        w32 = w.reshape(-1).float()
        acc = w32 - torch.tensor(decay, dtype=torch.float32, device=w.device) * w32
        for q, (seed, c) in enumerate(zip(seeds, coeffs)):
            factor = dir_scales[q * len(tensors) + j] if FAMILIES[family].per_tensor_factor else None
            z = _direction(family, seed, w.numel(), offset, factor, w.device)
            acc = acc - torch.tensor(c, dtype=torch.float32, device=w.device) * z
        w.copy_(acc.view_as(w))


def sq_norms(numels, offsets, key_lo, key_hi, device) -> list[int]:
    seed = _join(key_lo, key_hi)
    return [sphere_sq_norm(randn_reference(seed, n, o)) for n, o in zip(numels, offsets)]


def perturbed_linear(
    x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian", factors=None
) -> torch.Tensor:
    return materialised.perturbed_linear(
        perturb, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family, factors
    )


def perturbed_embedding(
    ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None
) -> torch.Tensor:
    return materialised.perturbed_embedding(
        perturb, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family, factors, rows_only=False
    )
