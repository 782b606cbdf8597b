"""Client memory accounting during training.

In one process the client and server share an allocator, so the client's peak cannot be read off
the process. ``ClientMemory`` adds up what the client itself holds: weights, gradients, optimizer
state, the ZO scratch buffer, and activations: for FO client passes the tensors autograd saves for
the backward (measured with ``saved_tensors_hooks`` on the first step), for every pass the output
activation that is sent up.

Optimizer state is what the client's optimizer holds: nothing for ZO-SGD (the figure of record),
one float32 buffer per trainable element for ZO momentum, two for ZO-Adam, the momentum buffers
of an FO client's SGD. Gradients (FO clients) and state cover trainable parameters only, so a LoRA
client pays for its adapters, not for the frozen base weights it also holds. ``benchmarks/memory.py``
measures whole-process peaks separately.

A micro-batched ZO client (``--client-micro-batch`` / ``--client-memory-budget``) is planned here
too: :func:`probe_row_cost` measures the transient bytes of a client forward at 1 and 2 rows (the
peak of the tensors the forward allocates, :class:`LiveTensorPeak`), and :func:`plan_micro_batch`
picks the largest slice that keeps weights + scratch + output activation + transients within a budget.
The probe counts tensor bytes; the process's resident memory follows them only when the allocator
hands freed blocks back to the system, which glibc stops doing for blocks below its (dynamic) mmap
threshold: :func:`return_freed_memory` fixes that threshold so a sliced pass's transients are
unmapped when freed (``docs/results.md`` section 1d measures both).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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

    def note_output_rows(self, h: torch.Tensor, batch_rows: int) -> None:
        """A slice ``h`` of a micro-batched pass: the activation sent is ``batch_rows`` such rows."""
        self.output_bytes = max(self.output_bytes, h.numel() * h.element_size() // max(h.shape[0], 1) * batch_rows)

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


# ---------------------------------------------------------------------------------------------
# micro-batched ZO clients: a memory budget -> rows per slice
# ---------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text, name: str = "--client-memory-budget") -> int:
    """``"1.0GiB"``, ``"512MiB"``, ``"2GB"`` or a plain number of bytes -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a size such as 1.0GiB, 512MiB, 2GB or a number of bytes, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {text!r}")
    size = value * _UNITS[unit]
    if not size < 2**63:  # 1e400 reads as inf
        raise ValueError(f"{name} must be a size below 8 EiB (2**63 bytes), got {text!r}")
    return int(size)


def gib(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (3 decimals)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} bytes"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
FREED_MEMORY_THRESHOLD = 128 * 1024  # glibc's own starting mmap threshold


def return_freed_memory(threshold: int = FREED_MEMORY_THRESHOLD) -> str:
    """Make freed transients leave the process's resident memory (glibc only); a line for the log.

    glibc serves blocks at or above its mmap threshold with ``mmap`` and unmaps them on ``free``,
    but it raises that threshold each time such a block is freed (up to 32 MiB on 64-bit), after
    which a forward's 10-50 MiB activations come from the heap, whose top stays resident while any
    block above it lives. So the resident memory of a micro-batched client grew well past the
    tensors it held (0.685 GiB measured against 0.49 GiB with this setting, OPT-125M fp32, 16-row
    slices; ``docs/results.md`` section 1d). Fixing both thresholds at ``threshold`` bytes stops
    that; the cost is a page fault per page of each large allocation (step time in section 1d).
    Process-wide and permanent, so the training loop calls it only for micro-batched clients; a
    library user calls it once at start-up. Elsewhere (not Linux/glibc) it changes nothing and
    says so.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 4096:
        raise ValueError(f"threshold must be a number of bytes >= 4096, got {threshold!r}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (an attribute probe) glibc only: other C libraries' mallopt parameters differ
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator left as it is (no glibc mallopt here)"
    if not (mallopt(_M_MMAP_THRESHOLD, threshold) and mallopt(_M_TRIM_THRESHOLD, threshold)):
        return "allocator left as it is (glibc refused mallopt)"
    return f"allocator: blocks >= {threshold // 1024} KiB mapped and unmapped on free (glibc mallopt), so RSS follows the tensors"


class LiveTensorPeak(TorchDispatchMode):
    """The peak bytes of tensor storages allocated inside the block and alive at once.

    Every op's output is looked at; a storage not seen before and not one of the op's inputs (a
    view or an in-place result of a tensor from outside, e.g. a weight) is a new allocation and
    counts until the last tensor on it is garbage collected. Allocator slack and kernels' private
    workspaces are not seen: this is the transient activation memory a forward asks for.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [bytes, tensors alive on it]
        self._seen: set[int] = set()  # id() of the tensors counted and alive (a WeakSet would compare tensors with ==)

    def _release(self, key: int, tensor_id: int) -> None:
        self._seen.discard(tensor_id)
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self._seen:
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0:
                continue
            if key not in self._refs:
                if key in inputs:
                    continue  # aliases a tensor from outside the block
                self._refs[key] = [t.untyped_storage().nbytes(), 0]
                self.live += self._refs[key][0]
                self.peak = max(self.peak, self.live)
            self._refs[key][1] += 1
            self._seen.add(id(t))
            weakref.finalize(t, self._release, key, id(t))
        return out


def probe_row_cost(run_rows: Callable[[int], torch.Tensor]) -> tuple[int, int, int]:
    """``(fixed, per_row, output_per_row)`` bytes of a client forward: ``run_rows(n)`` runs it on
    ``n`` rows (at the longest sequence, inside a perturbed pass) and returns the activation. The
    transient peak is measured at 1 and 2 rows, ``peak(n) = fixed + per_row * n`` (fixed: what does
    not grow with rows, e.g. a perturbed weight materialised per layer), with :class:`LiveTensorPeak`
    on any device."""
    peaks, out_bytes = [], 0
    for n in (1, 2):
        probe = LiveTensorPeak()
        with torch.no_grad(), probe:
            h = run_rows(n)
        out_bytes = h.numel() * h.element_size() // n
        del h
        peaks.append(probe.peak)
    per_row = max(peaks[1] - peaks[0], 0)
    return max(peaks[0] - per_row, 0), per_row, out_bytes


@dataclass
class MicroBatchPlan:
    """What a memory budget leaves a micro-batched ZO client (bytes), and the rows per slice."""

    budget: int
    weights: int
    scratch: int
    output: int
    fixed_transient: int
    per_row_transient: int
    batch_size: int
    micro_batch: int
    reserve: int = 0

    def planned_peak(self) -> int:
        return (
            self.weights
            + self.scratch
            + self.output
            + self.fixed_transient
            + self.per_row_transient * self.micro_batch
            + self.reserve
        )

    def describe(self) -> str:
        return (
            f"client memory budget {gib(self.budget)}: weights {gib(self.weights)} + scratch {gib(self.scratch)} "
            f"+ output activation {gib(self.output)} + runtime reserve {gib(self.reserve)} + transients "
            f"{gib(self.fixed_transient)} + {self.per_row_transient / 2**20:.1f} MiB/row -> {self.micro_batch} of "
            f"{self.batch_size} rows per "
            f"slice (planned peak {gib(self.planned_peak())})"
        )


# What a CPU client's resident memory held beyond the tensors the probe counts, with
# return_freed_memory in effect: 11-18 MiB over the plan in benchmarks/memory.py's OPT-125M fp32
# budget and M = 1 rows (docs/results.md section 1d): OpenMP/oneDNN workspaces, small-block malloc
# arenas. On CUDA the budget is checked against torch's own allocations, so nothing is reserved.
CPU_RUNTIME_RESERVE = 24 * 2**20


def runtime_reserve(device) -> int:
    """The bytes :func:`plan_micro_batch` keeps free of a budget on ``device`` (see above)."""
    return CPU_RUNTIME_RESERVE if torch.device(device).type == "cpu" else 0


def plan_micro_batch(
    budget: int,
    *,
    weights: int,
    scratch: int,
    output: int,
    fixed_transient: int,
    per_row_transient: int,
    batch_size: int,
    reserve: int = 0,
) -> MicroBatchPlan:
    """The largest ``M <= batch_size`` whose planned peak (``reserve`` included: what the runtime holds
    beyond the probed tensors, :func:`runtime_reserve`) fits ``budget``; a ValueError naming the
    numbers when not even the weights and the output activation fit, or not one row on top of them."""
    if budget < weights + output:
        raise ValueError(
            f"--client-memory-budget {gib(budget)} cannot hold the client's weights ({gib(weights)}) "
            f"and its output activation ({gib(output)}): {gib(weights + output)} at the least"
        )
    free = budget - weights - scratch - output - fixed_transient - reserve
    rows = batch_size if per_row_transient == 0 else min(batch_size, free // per_row_transient)
    if rows < 1:
        raise ValueError(
            f"--client-memory-budget {gib(budget)} holds the weights ({gib(weights)}) and the output activation "
            f"({gib(output)}) but not the perturbed pass on one row: + scratch {gib(scratch)} + runtime reserve "
            f"{gib(reserve)} + transients {gib(fixed_transient + per_row_transient)} = "
            f"{gib(weights + output + scratch + reserve + fixed_transient + per_row_transient)}"
        )
    return MicroBatchPlan(
        budget, weights, scratch, output, fixed_transient, per_row_transient, batch_size, int(rows), reserve
    )
