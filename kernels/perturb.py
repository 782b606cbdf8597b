"""``outs[j] = round(float32(tensors[j]) + scale * z(seed, offsets[j] + e))``, one launch per dtype."""

import triton
import triton.language as tl

from hosl.kernels import multi_tensor as mt
from hosl.kernels._config import COMPILE_OPTIONS, default_block_counters, on_device
from hosl.kernels.direction import FAMILY_SPHERE, element_address, family_direction, family_span, load_f32, scalar_f32, \
    seed_key, store_rne


@triton.jit(do_not_specialize=["num_rows", "key_lo", "key_hi", "scale_bits"])
def perturb_kernel(table, num_rows, key_lo, key_hi, scale_bits, DTYPE: tl.constexpr, BN: tl.constexpr,
                   FAMILY: tl.constexpr = 0):
    """FAMILY (direction.FAMILY_*): sphere reads row r's factor (float32 bits) at table[rows*ROW + r]."""
    row, src, dst, numel, offset, b = mt.locate_row(table, num_rows)
    k0, k1 = seed_key(key_lo, key_hi)
    scale = scalar_f32(scale_bits)
    factor = 1.0
    if FAMILY == FAMILY_SPHERE:
        factor = scalar_f32(tl.load(table + num_rows * mt.ROW_C + row))
    start, local, mask = family_span(b, offset, numel, FAMILY, BN)
    z = family_direction(b, offset, k0, k1, factor, FAMILY, BN)
    w = load_f32(element_address(src, start, DTYPE), local, mask, DTYPE)
    store_rne(element_address(dst, start, DTYPE), local, w + scale * z, mask, DTYPE)


_SIG = {"table": "*i64", "num_rows": "i32", "key_lo": "i32", "key_hi": "i32", "scale_bits": "i32"}


def aot() -> list:
    """Per registered direction family, a variant for each of its ``compile_dtypes``."""
    return [(perturb_kernel, _SIG, {"DTYPE": dtype, "BN": bn, "FAMILY": code})
            for code, bn, dtypes in mt.family_variants() for dtype in dtypes]


def perturb(tensors, outs, offsets, key_lo: int, key_hi: int, scale: float, family: str = "gaussian",
            dir_scales=None, block_counters=None) -> None:
    """``dir_scales``: the sphere factor of each tensor (family ``"sphere"`` only)."""
    bn, per_counter = mt.family_layout(family, block_counters or default_block_counters())
    factored = mt.FAMILIES[family].per_tensor_factor
    items = list(zip(tensors, outs, offsets, dir_scales if factored else [1.0] * len(tensors)))
    for dtype, group in mt.group_by_dtype(items).items():
        srcs, dsts, offs, factors = zip(*group)
        words, rows, programs = mt.build_rows(srcs, dsts, offs, bn, per_counter)
        if programs == 0:
            continue
        if factored:  # the factors of the non-empty tensors (the rows), after the rows
            words = words + [mt.f32_bits(f) for src, f in zip(srcs, factors) if src.numel()]
        # perturb runs 2Q times a step on the same tensors: cache the table on the device
        table = mt.device_table(words, srcs[0].device, cache=True)
        with on_device(table.device):
            perturb_kernel[(programs, )](table, rows, mt.i32(key_lo), mt.i32(key_hi), mt.f32_bits(scale),
                                         DTYPE=mt.dtype_code(dtype), BN=bn, FAMILY=mt.FAMILY_CODES[family],
                                         **COMPILE_OPTIONS)
