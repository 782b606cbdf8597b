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
from hosl.kernels.direction import block_elements, block_normals, load_f32, scalar_f32, store_rne


@triton.jit(do_not_specialize=["num_rows", "num_dirs", "decay_bits"])
def zo_update_kernel(table, num_rows, num_dirs, decay_bits, DTYPE: tl.constexpr, BN: tl.constexpr):
    src, dst, numel, offset, b = mt.locate(table, num_rows)
    e = block_elements(b, offset, BN)
    mask = (e >= 0) & (e < numel)
    w = load_f32(src, e, mask, DTYPE)
    decay = scalar_f32(decay_bits)
    acc = w - decay * w
    dirs = table + num_rows * mt.ROW_C
    for q in range(num_dirs):
        k0 = tl.load(dirs + 3 * q).to(tl.uint32)
        k1 = tl.load(dirs + 3 * q + 1).to(tl.uint32)
        coeff = scalar_f32(tl.load(dirs + 3 * q + 2))
        z = block_normals(b, offset, k0, k1, BN)
        acc = acc - coeff * z
    store_rne(dst, e, acc, mask, DTYPE)


AOT = [(zo_update_kernel, {"table": "*i64", "num_rows": "i32", "num_dirs": "i32", "decay_bits": "i32"},
        {"DTYPE": dtype, "BN": 256}) for dtype in (0, 1, 2)]


def zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay: float, block_counters=None) -> None:
    bn = block_counters or default_block_counters()
    dirs = []
    for lo, hi, c in zip(keys_lo, keys_hi, coeffs):
        dirs += [lo, hi, mt.f32_bits(c)]
    groups = mt.group_by_dtype(zip(tensors, offsets))
    for dtype, items in groups.items():
        ws, offs = zip(*items)
        words, rows, programs = mt.build_rows(ws, ws, offs, bn)
        if programs == 0:
            continue
        # seeds differ every step: no caching, one small host-to-device copy per dtype
        table = mt.device_table(words + dirs, ws[0].device, cache=False)
        with on_device(table.device):
            zo_update_kernel[(programs, )](table, rows, len(coeffs), mt.f32_bits(decay),
                                           DTYPE=mt.dtype_code(dtype), BN=bn, **COMPILE_OPTIONS)
