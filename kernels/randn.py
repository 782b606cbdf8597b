"""``z(seed, offset + e)`` for ``e`` in ``[0, numel)`` into a new float32 tensor, and the sphere
family's fixed-point norms (``sq_norms``)."""

import torch
import triton
import triton.language as tl

from hosl.kernels import multi_tensor as mt
from hosl.kernels._config import COMPILE_OPTIONS, default_block_counters, on_device
from hosl.kernels.direction import block_elements, block_normals, family_direction, family_span, scalar_f32, seed_key
from hosl.kernels.multi_tensor import i32

SPHERE_FIXED_ONE = tl.constexpr(float.fromhex("0x1p+24"))  # spec.SPHERE_FRACTION_BITS


@triton.jit(do_not_specialize=["numel", "offset", "key_lo", "key_hi", "factor_bits"])
def randn_kernel(out, numel, offset, key_lo, key_hi, factor_bits, BN: tl.constexpr, FAMILY: tl.constexpr = 0):
    """FAMILY (direction.FAMILY_*); for sphere, z is ``factor * z_gaussian``."""
    b = tl.program_id(0).to(tl.int64)
    offset = offset.to(tl.int64)
    k0, k1 = seed_key(key_lo, key_hi)
    start, local, mask = family_span(b, offset, numel, FAMILY, BN)
    z = family_direction(b, offset, k0, k1, scalar_f32(factor_bits), FAMILY, BN)
    tl.store(out + start + local, z, mask=mask)


@triton.jit(do_not_specialize=["num_rows", "key_lo", "key_hi"])
def sq_norm_kernel(table, num_rows, partial, key_lo, key_hi, BN: tl.constexpr):
    """partial[pid] = sum over this program's elements of floor(float32(z*z) * 2**24) (int64).

    Integer sums are exact and order-free, so the host's per-tensor totals equal the spec's."""
    src, dst, numel, offset, b = mt.locate(table, num_rows)
    k0, k1 = seed_key(key_lo, key_hi)
    e = block_elements(b, offset, BN)
    z = block_normals(b, offset, k0, k1, BN)
    term = ((z * z) * SPHERE_FIXED_ONE).to(tl.int32)  # < 2**30; float->int truncates
    term = tl.where((e >= 0) & (e < numel), term, 0).to(tl.int64)
    tl.store(partial + tl.program_id(0), tl.sum(term, axis=0))


# For the ahead-of-time compile check: argument types of one representative launch.
_SIG = {"out": "*fp32", "numel": "i64", "offset": "i64", "key_lo": "i32", "key_hi": "i32", "factor_bits": "i32"}


def aot() -> list:
    """One randn variant per registered direction family, and the sphere norm."""
    return ([(randn_kernel, _SIG, {"BN": bn, "FAMILY": code}) for code, bn, _ in mt.family_variants()]
            + [(sq_norm_kernel, {"table": "*i64", "num_rows": "i32", "partial": "*i64", "key_lo": "i32",
                                 "key_hi": "i32"}, {"BN": 256})])


def randn(key_lo: int, key_hi: int, numel: int, offset: int, device, family: str = "gaussian", scale: float = 1.0,
          block_counters=None) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    bn, per_counter = mt.family_layout(family, block_counters or default_block_counters())
    grid = (-(-(numel + offset % per_counter) // (per_counter * bn)), )
    with on_device(out.device):
        randn_kernel[grid](out, numel, offset, i32(key_lo), i32(key_hi), mt.f32_bits(scale), BN=bn,
                           FAMILY=mt.FAMILY_CODES[family], **COMPILE_OPTIONS)
    return out


class _Extent:
    """Stands in for a tensor in :func:`multi_tensor.build_rows` (which reads numel and addresses)."""

    def __init__(self, numel):
        self._numel = numel

    def numel(self):
        return self._numel

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return 0


def sq_norms(numels, offsets, key_lo: int, key_hi: int, device, block_counters=None) -> list[int]:
    """Per tensor, ``sum floor(float32(z*z) * 2**24)`` over its Gaussian slice, as exact Python ints."""
    bn = block_counters or default_block_counters()
    extents = [_Extent(n) for n in numels]
    words, rows, programs = mt.build_rows(extents, extents, offsets, bn)
    if programs == 0:
        return [0] * len(numels)
    table = mt.device_table(words, device, cache=False)
    partial = torch.empty(programs, dtype=torch.int64, device=table.device)
    with on_device(table.device):
        sq_norm_kernel[(programs, )](table, rows, partial, i32(key_lo), i32(key_hi), BN=bn, **COMPILE_OPTIONS)
    # Per-tensor totals on the device: a tensor's programs are contiguous (first_program is word 4
    # of its row), so each total is a difference of the running sum. Integer sums are exact, and
    # only len(numels) integers come back to the host (copying every program's partial and summing
    # in Python cost ~10x the kernel on an H200).
    firsts = [words[r * mt.ROW + 4] for r in range(rows)] + [programs]
    bounds = torch.tensor(firsts, dtype=torch.int64, device=table.device)
    running = torch.cat([partial.new_zeros(1), partial.cumsum(0)])
    totals = iter(running[bounds].diff().tolist())
    return [next(totals) if n else 0 for n in numels]  # rows are the non-empty tensors, in order
