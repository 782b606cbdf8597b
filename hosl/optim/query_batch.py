"""How many perturbed points run in one client forward (``query_batch``), and the memory it costs.

``query_batch = D`` (an int >= 1) runs ``D`` points per forward over a ``D x B`` batch
(:mod:`hosl.forward.batched`); ``1`` is the sequential path (the default: it keeps the
client's peak at the one-pass floor). ``"auto"`` picks the largest ``D`` whose extra memory fits
``query_memory_budget`` bytes (default: a quarter of the ZO-trained weights' bytes).

Extra memory of ``D``: ``(D - 1)`` times one copy's working set, estimated from the clean (or
first) forward of the step by :class:`ForwardProbe`: the activation returned plus twice the largest
output of any leaf module (the MLP's ``B x T x 4H`` input and output of its activation function
are alive together; that pair is the floor of a transformer forward). The estimate is re-taken
every step (sequence lengths change).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

AUTO = "auto"
DEFAULT_BUDGET_FRACTION = 0.25  # of the ZO-trained weights' bytes, for "auto" without a budget


class ForwardProbe:
    """Records one forward's per-copy working set: ``2 * largest leaf output + the module's output``."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.largest = 0
        self.output = 0
        self._handles: list = []

    @staticmethod
    def _nbytes(out) -> int:
        if isinstance(out, torch.Tensor):
            return out.numel() * out.element_size()
        if isinstance(out, (tuple, list)):
            return sum(ForwardProbe._nbytes(o) for o in out)
        return 0

    def __enter__(self):
        def leaf_hook(mod, args, out):
            self.largest = max(self.largest, self._nbytes(out))

        def root_hook(mod, args, out):
            self.output = max(self.output, self._nbytes(out))

        for m in self.modules:
            self._handles.append(m.register_forward_hook(root_hook))
            for sub in m.modules():
                if next(sub.children(), None) is None:
                    self._handles.append(sub.register_forward_hook(leaf_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def per_copy_bytes(self) -> int:
        return 2 * self.largest + self.output


def resolve(
    query_batch: int | str,
    budget: int | None,
    per_copy: int,
    weight_bytes: int,
    points: int,
    device: torch.device | None = None,
) -> int:
    """The ``D`` to run: ``query_batch`` itself (checked against the budget and, on CUDA, the free
    memory) or, for ``"auto"``, the largest that fits; never more than ``points``.

    Raises ``ValueError`` naming the setting when an explicit ``D`` does not fit.
    """
    if query_batch == AUTO:
        limit = budget if budget is not None else int(DEFAULT_BUDGET_FRACTION * weight_bytes)
        if device is not None and device.type == "cuda":
            limit = min(limit, torch.cuda.mem_get_info(device)[0] // 2)
        extra = limit // per_copy if per_copy > 0 else points
        return max(1, min(points, 1 + extra))
    d: int = min(query_batch, points)  # type: ignore[assignment]  # an int once "auto" is handled
    need = (d - 1) * per_copy
    if budget is not None and need > budget:
        raise ValueError(
            f"query_batch={query_batch} needs about {need} bytes beyond the sequential pass ({d - 1} more copies of "
            f"a {per_copy}-byte forward) but query_memory_budget={budget}; lower query_batch or use 'auto'"
        )
    if device is not None and device.type == "cuda" and need > 0:
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise ValueError(
                f"query_batch={query_batch} needs about {need} bytes beyond the sequential pass but "
                f"{device} has {free} bytes free; lower query_batch or use 'auto'"
            )
    return d
