"""Client memory accounting during training.

In one process the client and server share an allocator, so the client's peak cannot be read off
the process. ``ClientMemory`` adds up what the client itself holds: weights, gradients, optimizer
state, the ZO scratch buffer, and activations: for FO client passes the tensors autograd saves for
the backward (measured with ``saved_tensors_hooks`` on the first step), for every pass the output
activation that is sent up.

Optimizer state is what the client's optimizer holds: nothing for ZO-SGD (the figure of record),
one float32 buffer per trainable element for ZO momentum, two for ZO-Adam, the momentum buffers
of an FO client's SGD. Gradients (FO clients) and state cover trainable parameters only, so a LoRA
client pays for its adapters, not for the frozen base weights it also holds. ``benchmarks/memory.py`` measures whole-process peaks separately.
"""

from __future__ import annotations

import contextlib

import torch


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr()


class ClientMemory:
    def __init__(self):
        self.saved_activation_bytes = 0
        self.output_bytes = 0
        self._measured = False

    @contextlib.contextmanager
    def measure_saved(self):
        """Count the unique storages autograd saves inside the block (first call only)."""
        if self._measured:
            yield
            return
        seen: dict = {}

        def pack(t):
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.saved_activation_bytes = sum(seen.values())
        self._measured = True

    def note_output(self, h: torch.Tensor) -> None:
        self.output_bytes = max(self.output_bytes, h.numel() * h.element_size())

    @staticmethod
    def weight_bytes(client) -> int:
        return sum(p.numel() * p.element_size() for p in client.parameters())

    @staticmethod
    def trainable_bytes(client) -> int:
        return sum(p.numel() * p.element_size() for p in client.parameters() if p.requires_grad)

    def peak_bytes(self, client, *, fo_client: bool, optimizer_state_bytes: int, scratch_bytes: int) -> int:
        weights = self.weight_bytes(client)
        grads = self.trainable_bytes(client) if fo_client else 0
        activations = self.saved_activation_bytes + self.output_bytes
        return weights + grads + optimizer_state_bytes + scratch_bytes + activations
