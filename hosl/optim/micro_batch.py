"""Micro-batched client passes: run a client over its batch ``M`` rows at a time.

A ZO client keeps no autograd state, so nothing forces it to run the whole batch at once: its
memory floor is its weights, the activation it sends (``B x T x H``) and the transients of whatever
slice it runs. :class:`MicroBatchedClient` turns a *rows-aware* client function into the
zero-argument one the optimizers call:

* ``client_fn(rows: slice) -> torch.Tensor`` runs the client on rows ``rows`` of the batch (e.g.
  ``lambda rows: client(ids[rows], mask[rows])``) and returns their activation, rows along dim 0.
* calling the wrapper runs ``client_fn`` on ``slice(0, M)``, ``slice(M, 2M)``, ... and copies each
  slice's activation into one preallocated ``B``-row output (a single slice is returned as is).

The optimizer calls the wrapper inside its ``perturbed(seed, sign)`` block, so every slice of a pass
runs at the same perturbed point (same seed, same scale; the perturbers regenerate the direction
from the seed for each layer call and never write the weights), and the ``+`` and ``-`` passes of a
direction use the same slicing (it depends on ``B`` and ``M`` only; :attr:`slicings` records it).
Rows are independent in every model here (per-row attention masks, no batch statistics), so the
assembled activation equals the whole-batch one up to the matmul's summation order.

With ``query_batch=D`` (:mod:`hosl.forward.batched`) the client module repeats each slice's
inputs ``D`` times, so a slice of ``M`` rows comes back as ``D x M`` rows, copy-major; the wrapper
sees ``D`` from the row count and writes copy ``d``'s rows to rows ``d*B + start ..`` of a ``D*B``-row
output, the layout the optimizer expects of a whole-batch ``D``-copy forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_micro_batch(value, name: str = "client_micro_batch") -> int | None:
    """``value`` if it is None or an integer >= 1, else a ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None (the whole batch) or an integer >= 1, got {value!r}")
    return value


def row_slices(batch_size: int, micro_batch: int) -> list[slice]:
    """The slices of ``M`` rows (the last may be shorter) that cover ``batch_size`` rows."""
    return [slice(start, min(start + micro_batch, batch_size)) for start in range(0, batch_size, micro_batch)]


class MicroBatchedClient:
    """``wrapper()`` runs ``client_fn(rows)`` over the batch in slices of ``micro_batch`` rows.

    ``slicings``: the ``(start, stop)`` pairs of every call so far, one tuple per call (tests and
    the log read it; a few integers per pass).
    """

    def __init__(self, client_fn: Callable[[slice], torch.Tensor], batch_size: int, micro_batch: int):
        if not callable(client_fn):
            raise TypeError(f"client_fn must be callable, got {type(client_fn).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 (the rows client_fn can run), got {batch_size!r}")
        self.client_fn = client_fn
        self.batch_size = batch_size
        self.micro_batch = check_micro_batch(micro_batch)
        self.slices = row_slices(batch_size, micro_batch)
        self.slicings: list[tuple[tuple[int, int], ...]] = []

    def _run(self, rows: slice, copies: int | None) -> torch.Tensor:
        """The slice's activation, ``copies`` x its rows (``None``: any whole number of copies)."""
        part = self.client_fn(rows)
        expected = rows.stop - rows.start
        ok = isinstance(part, torch.Tensor) and part.dim() > 0 and part.shape[0] > 0 and part.shape[0] % expected == 0
        if not ok or (copies is not None and part.shape[0] != copies * expected):
            got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            want = f"{expected} rows" if copies in (None, 1) else f"{copies} copies of {expected} rows"
            raise ValueError(
                f"client_fn(rows) must return the activation of rows {rows.start}:{rows.stop} "
                f"({want} along dim 0), got {got}"
            )
        return part

    def __call__(self) -> torch.Tensor:
        self.slicings.append(tuple((s.start, s.stop) for s in self.slices))
        if len(self.slices) == 1:
            return self._run(self.slices[0], None)
        out, copies = None, None
        with torch.no_grad():
            for rows in self.slices:
                part = self._run(rows, copies)
                n = rows.stop - rows.start
                if out is None:  # shape, dtype, device and copies are the client's: known once a slice ran
                    copies = part.shape[0] // n
                    out = torch.empty((copies * self.batch_size, *part.shape[1:]), dtype=part.dtype, device=part.device)
                elif part.shape[1:] != out.shape[1:]:
                    raise ValueError(
                        f"client_fn(rows) returned rows of shape {tuple(part.shape[1:])} for rows "
                        f"{rows.start}:{rows.stop}, but {tuple(out.shape[1:])} for rows 0:{self.micro_batch}"
                    )
                out.view(copies, self.batch_size, *out.shape[1:])[:, rows].copy_(part.view(copies, n, *part.shape[1:]))  # type: ignore[arg-type]  # set with out
                del part  # the slice's activation goes before the next slice runs
        return out  # type: ignore[return-value]  # batch_size > 0 rows ran


def wrap_client_fn(client_fn, micro_batch: int | None, batch_size: int | None):
    """What an optimizer's ``step`` calls: ``client_fn`` itself without ``micro_batch`` (the
    zero-argument contract), else a :class:`MicroBatchedClient` over ``batch_size`` rows."""
    if micro_batch is None:
        if batch_size is not None:
            raise ValueError(
                "batch_size is only used with client_micro_batch (client_fn(rows)); "
                "without it client_fn takes no argument"
            )
        return client_fn
    if batch_size is None:
        raise ValueError(
            f"with client_micro_batch={micro_batch}, step() needs batch_size= (the rows client_fn(rows) can run)"
        )
    return MicroBatchedClient(client_fn, batch_size, micro_batch)
