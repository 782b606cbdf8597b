"""An endless, seeded, resumable stream of shuffled training batches.

The stream is the concatenation of per-epoch permutations, epoch ``e`` shuffled by
``numpy.random.default_rng([seed, e])``; a batch takes the next ``batch_size`` indices of the stream
and may run across an epoch boundary, so every batch has exactly ``batch_size`` examples and every
example is seen once per epoch. The position is (epoch, offset): ``state_dict()`` is a few ints, and
an iterator given that state continues with exactly the batches the original would have produced.

Kept rather than torchdata's ``StatefulDataLoader``, which also resumes mid-epoch: switching would
change the batches every recorded run and result in ``docs/`` was trained on, for a new dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class ShuffledBatches:
    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        seed: int = 0,
        collate_fn: Callable[[list], Any] | None = None,
    ):
        if len(examples) == 0:
            raise ValueError("no training examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.collate_fn = collate_fn
        self.epoch = 0
        self.offset = 0  # next position within the current epoch's permutation
        self.batches_served = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def next_indices(self) -> list[int]:
        """Indices of the next batch (advances the stream)."""
        indices: list[int] = []
        while len(indices) < self.batch_size:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(indices), len(self._order) - self.offset)
            indices.extend(self._order[self.offset : self.offset + take].tolist())
            self.offset += take
        self.batches_served += 1
        return indices

    def __iter__(self):
        return self

    def __next__(self):
        batch = [self.examples[i] for i in self.next_indices()]
        return self.collate_fn(batch) if self.collate_fn is not None else batch

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
            "batches_served": self.batches_served,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the examples and batch size must be those it was saved with."""
        if state["num_examples"] != len(self.examples):
            raise ValueError(
                f"state was saved over {state['num_examples']} examples, this iterator has {len(self.examples)}"
            )
        if state["batch_size"] != self.batch_size:
            raise ValueError(
                f"state was saved with batch_size {state['batch_size']}, this iterator has {self.batch_size}"
            )
        if not 0 <= state["offset"] <= len(self.examples):
            raise ValueError(f"offset {state['offset']} out of range")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.batches_served = int(state.get("batches_served", 0))
        self._order = self._permutation(self.epoch)
