"""``outs[j] = round(float32(tensors[j]) + scale * z(seed, offsets[j] + e))``, one launch per dtype."""

import triton
import triton.language as tl

from hosl.kernels import multi_tensor as mt
from hosl.kernels._config import COMPILE_OPTIONS, default_block_counters, on_device
from hosl.kernels.direction import block_elements, block_normals, load_f32, scalar_f32, seed_key, store_rne


@triton.jit(do_not_specialize=["num_rows", "key_lo", "key_hi", "scale_bits"])
def perturb_kernel(table, num_rows, key_lo, key_hi, scale_bits, DTYPE: tl.constexpr, BN: tl.constexpr):
    src, dst, numel, offset, b = mt.locate(table, num_rows)
    k0, k1 = seed_key(key_lo, key_hi)
    scale = scalar_f32(scale_bits)
    e = block_elements(b, offset, BN)
    mask = (e >= 0) & (e < numel)
    z = block_normals(b, offset, k0, k1, BN)
    w = load_f32(src, e, mask, DTYPE)
    store_rne(dst, e, w + scale * z, mask, DTYPE)


AOT = [(perturb_kernel, {"table": "*i64", "num_rows": "i32", "key_lo": "i32", "key_hi": "i32", "scale_bits": "i32"},
        {"DTYPE": dtype, "BN": 256}) for dtype in (0, 1, 2)]


def perturb(tensors, outs, offsets, key_lo: int, key_hi: int, scale: float, block_counters=None) -> None:
    bn = block_counters or default_block_counters()
    groups = mt.group_by_dtype(zip(tensors, outs, offsets))
    for dtype, items in groups.items():
        srcs, dsts, offs = zip(*items)
        words, rows, programs = mt.build_rows(srcs, dsts, offs, bn)
        if programs == 0:
            continue
        # perturb runs 2Q times a step on the same tensors: cache the table on the device
        table = mt.device_table(words, srcs[0].device, cache=True)
        with on_device(table.device):
            perturb_kernel[(programs, )](table, rows, mt.i32(key_lo), mt.i32(key_hi), mt.f32_bits(scale),
                                         DTYPE=mt.dtype_code(dtype), BN=bn, **COMPILE_OPTIONS)
