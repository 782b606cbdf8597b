"""One launch for a list of tensors: a small int64 table that the kernel reads.

Table layout (int64, row-major), one row of :data:`ROW` words per non-empty tensor::

    [src_address, dst_address, numel, offset, first_program]

``first_program`` is the running sum of the tensors' program counts, so program ``pid`` belongs
to the last row whose ``first_program <= pid`` (binary search, :func:`locate`). Kernels may append
op-specific words after the rows (zo_update puts its per-direction keys and coefficients there),
so one host-to-device copy carries everything.

Addresses become pointers inside the kernel (``int64 -> pointer`` casts), which is why a kernel
can serve tensors of different sizes in one launch; it still needs one launch per dtype.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from hosl.directions.families import FAMILIES, FAMILY_CODES  # noqa: F401  (FAMILY_CODES: the FAMILY constexpr the launchers pass)

ROW = 5
ROW_C = tl.constexpr(ROW)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


def f32_bits(x: float) -> int:
    """The int32 bit pattern of float32 ``x`` (signed, so Triton types it as i32)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def i32(k: int) -> int:
    """A uint32 value as the signed int32 with the same bits (keeps kernel argument types fixed)."""
    return k - (1 << 32) if k >= 1 << 31 else k


def group_by_dtype(items):
    """Tuples grouped by the dtype of their first member (a tensor), order kept."""
    groups: dict[torch.dtype, list] = {}
    for item in items:
        groups.setdefault(item[0].dtype, []).append(item)
    return groups


def build_rows(srcs, dsts, offsets, block_counters: int, coords_per_counter: int = 4) -> tuple[list[int], int, int]:
    """Rows for the non-empty tensors: (flat words, number of rows, total programs).

    A program owns ``block_counters`` Philox counters of ``coords_per_counter`` coordinates each
    (4 for Gaussian directions, 128 for Rademacher), aligned in coordinate space.
    """
    per_program = coords_per_counter * block_counters
    words: list[int] = []
    first = 0
    for src, dst, offset in zip(srcs, dsts, offsets):
        numel = src.numel()
        if numel == 0:
            continue
        assert src.is_contiguous() and dst.is_contiguous(), "hosl.kernels needs contiguous tensors"
        words += [src.data_ptr(), dst.data_ptr(), numel, offset, first]
        first += -(-(numel + offset % coords_per_counter) // per_program)
    return words, len(words) // ROW, first


@functools.lru_cache(maxsize=64)
def _cached_table(words: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(words, dtype=torch.int64, device=device)


def device_table(words: list[int], device: torch.device, cache: bool) -> torch.Tensor:
    """The table on ``device``. With ``cache`` a repeated call (same addresses, sizes, offsets:
    the key is the whole content, so a hit is always right) costs no host-to-device copy."""
    if cache:
        return _cached_table(tuple(words), torch.device(device))
    return torch.tensor(words, dtype=torch.int64, device=device)


def direction_table(keys_lo, keys_hi, scales, device) -> torch.Tensor:
    """``(key_lo, key_hi, scale_bits)`` per direction, int64, on ``device``. Cached: every layer of
    one perturbed pass asks for the same table, so only the first pays the host-to-device copy."""
    words = []
    for lo, hi, s in zip(keys_lo, keys_hi, scales):
        words += [lo, hi, f32_bits(s)]
    return device_table(words, device, cache=True)




def family_layout(family: str, block_counters: int) -> tuple[int, int]:
    """(counters per program, coordinates per counter) of a family's launch.

    A family of 4 coordinates per counter takes ``block_counters`` counters (at the GPU's 256 and
    4 warps: 1024 coordinates, 8 per thread). A family of 128 (Rademacher) covers 4 times as many
    coordinates, ``block_counters // 8`` counters: at the GPU's 256, 32 counters whose 128 Philox
    words are one per thread, each serving 32 coordinates (``kernels/direction.py`` ``block_signs``)."""
    per_counter = FAMILIES[family].coords_per_counter
    if per_counter == 4:
        return block_counters, per_counter
    return max(1, block_counters * 16 // per_counter), per_counter


def family_variants(block_counters: int = 256) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(FAMILY code, BN, dtype codes)`` of each registered family at ``block_counters`` (a GPU's):
    the variants the ahead-of-time compile check builds of the multi-tensor kernels."""
    return [(f.code, family_layout(f.name, block_counters)[0], tuple(dtype_code(d) for d in f.compile_dtypes))
            for f in FAMILIES.entries() if f.code is not None]  # a shaped family has no kernel of its own


@triton.jit
def locate(table, num_rows):
    """(src, dst, numel, offset, b) for this program: its tensor's row and its index b in it."""
    _, src, dst, numel, offset, b = locate_row(table, num_rows)
    return src, dst, numel, offset, b


@triton.jit
def locate_row(table, num_rows):
    """(row, src, dst, numel, offset, b): :func:`locate` plus the row's index (for per-row data
    that a kernel appends after the rows, such as the sphere factors)."""
    pid = tl.program_id(0)
    lo = pid * 0
    hi = lo + num_rows - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        up = tl.load(table + mid * ROW_C + 4) <= pid
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    row = table + lo * ROW_C
    src = tl.load(row)
    dst = tl.load(row + 1)
    numel = tl.load(row + 2)
    offset = tl.load(row + 3)
    b = pid - tl.load(row + 4)
    return lo, src, dst, numel, offset, b
