"""The ZO update, all ``Q`` directions in one pass over memory, one launch per dtype::

    acc = w - decay * w
    for q in range(Q): acc = acc - coeffs[q] * z(seed_q, offsets[j] + e)
    w = round(acc)

The per-direction (key_lo, key_hi, coeff bits) triples ride in the multi-tensor table, after the
tensor rows, and the kernel loops over them at run time. Seeds change every step, so making them
constexpr (an unrolled list) would recompile the kernel every step; a run-time ``Q`` also keeps one
compiled variant for every ``Q``. The loop re-generates ``z`` per direction from registers only:
``w`` is read once and written once whatever ``Q`` is.
"""

import triton
import triton.language as tl

from hosl.kernels import multi_tensor as mt
from hosl.kernels._config import COMPILE_OPTIONS, default_block_counters, on_device
from hosl.kernels.direction import FAMILY_SPHERE, element_address, family_direction, family_span, load_f32, scalar_f32, \
    store_rne


@triton.jit(do_not_specialize=["num_rows", "num_dirs", "decay_bits"])
def zo_update_kernel(table, num_rows, num_dirs, decay_bits, DTYPE: tl.constexpr, BN: tl.constexpr,
                     FAMILY: tl.constexpr = 0):
    """FAMILY (direction.FAMILY_*): sphere reads the factor of row r, direction q (float32 bits)
    at ``dirs[3*num_dirs + r*num_dirs + q]``, after the per-direction triples."""
    row, src, dst, numel, offset, b = mt.locate_row(table, num_rows)
    start, local, mask = family_span(b, offset, numel, FAMILY, BN)
    w = load_f32(element_address(src, start, DTYPE), local, mask, DTYPE)
    decay = scalar_f32(decay_bits)
    acc = w - decay * w
    dirs = table + num_rows * mt.ROW_C
    for q in range(num_dirs):
        k0 = tl.load(dirs + 3 * q).to(tl.uint32)
        k1 = tl.load(dirs + 3 * q + 1).to(tl.uint32)
        coeff = scalar_f32(tl.load(dirs + 3 * q + 2))
        factor = 1.0
        if FAMILY == FAMILY_SPHERE:
            factor = scalar_f32(tl.load(dirs + 3 * num_dirs + row * num_dirs + q))
        z = family_direction(b, offset, k0, k1, factor, FAMILY, BN)
        acc = acc - coeff * z
    store_rne(element_address(dst, start, DTYPE), local, acc, mask, DTYPE)


_SIG = {"table": "*i64", "num_rows": "i32", "num_dirs": "i32", "decay_bits": "i32"}


def aot() -> list:
    """Per registered direction family, a variant for each of its ``compile_dtypes``."""
    return [(zo_update_kernel, _SIG, {"DTYPE": dtype, "BN": bn, "FAMILY": code})
            for code, bn, dtypes in mt.family_variants() for dtype in dtypes]


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay: float, family: str = "gaussian", dir_scales=None,
              block_counters=None) -> None:
    """``dir_scales[q * len(tensors) + j]``: sphere factor of tensor j, direction q (sphere only)."""
    bn, per_counter = mt.family_layout(family, block_counters or default_block_counters())
    num_dirs = len(coeffs)
    dirs = []
    for lo, hi, c in zip(keys_lo, keys_hi, coeffs):
        dirs += [lo, hi, mt.f32_bits(c)]
    groups = mt.group_by_dtype([(t, o, j) for j, (t, o) in enumerate(zip(tensors, offsets))])
    for dtype, items in groups.items():
        ws, offs, idx = zip(*items)
        words, rows, programs = mt.build_rows(ws, ws, offs, bn, per_counter)
        if programs == 0:
            continue
        extra = []
        if mt.FAMILIES[family].per_tensor_factor:  # per row (non-empty tensor), its Q factors
            for w, j in zip(ws, idx):
                if w.numel():
                    extra += [mt.f32_bits(dir_scales[q * len(tensors) + j]) for q in range(num_dirs)]
        # seeds differ every step: no caching, one small host-to-device copy per dtype
        table = mt.device_table(words + dirs + extra, ws[0].device, cache=False)
        with on_device(table.device):
            zo_update_kernel[(programs, )](table, rows, num_dirs, mt.f32_bits(decay), DTYPE=mt.dtype_code(dtype),
                                           BN=bn, FAMILY=mt.FAMILY_CODES[family], **COMPILE_OPTIONS)
