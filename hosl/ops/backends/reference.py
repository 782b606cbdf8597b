"""The pure-PyTorch backend: slow, obvious, the definition the fast backends are tested against."""

from __future__ import annotations

import torch

from hosl.directions.spec import randn_reference
from hosl.ops.backends import materialised

DEVICE_TYPES = ("cpu", "cuda")


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def _join(key_lo: int, key_hi: int) -> int:
    return key_lo | (key_hi << 32)


def randn(key_lo: int, key_hi: int, numel: int, offset: int, device) -> torch.Tensor:
    return randn_reference(_join(key_lo, key_hi), numel, offset).to(device)


def perturb(tensors, outs, offsets, key_lo, key_hi, scale) -> None:
    seed = _join(key_lo, key_hi)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    for w, out, offset in zip(tensors, outs, offsets):
        z = randn_reference(seed, w.numel(), offset).to(w.device)
        out.copy_((w.reshape(-1).float() + scale_t.to(w.device) * z).view_as(w))


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay) -> None:
    seeds = [_join(lo, hi) for lo, hi in zip(keys_lo, keys_hi)]
    for w, offset in zip(tensors, offsets):
        w32 = w.reshape(-1).float()
        acc = w32 - torch.tensor(decay, dtype=torch.float32, device=w.device) * w32
        for seed, c in zip(seeds, coeffs):
            z = randn_reference(seed, w.numel(), offset).to(w.device)
            acc = acc - torch.tensor(c, dtype=torch.float32, device=w.device) * z
        w.copy_(acc.view_as(w))


def perturbed_linear(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x) -> torch.Tensor:
    return materialised.perturbed_linear(perturb, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales,
                                         shared_x)


def perturbed_embedding(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids) -> torch.Tensor:
    return materialised.perturbed_embedding(perturb, ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids,
                                            rows_only=False)
