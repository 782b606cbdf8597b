"""Helpers for losses of batched (concatenated) perturbed copies."""

import torch


def per_copy_mean(per_example: torch.Tensor, copies: int) -> torch.Tensor:
    """Mean loss of each copy, from per-example losses of ``copies`` concatenated batches."""
    if per_example.shape[0] % copies:
        raise ValueError(f"{per_example.shape[0]} per-example losses do not split into {copies} equal copies")
    return per_example.reshape(copies, -1).float().mean(dim=1)
