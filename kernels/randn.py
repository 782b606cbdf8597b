"""``z(seed, offset + e)`` for ``e`` in ``[0, numel)`` into a new float32 tensor."""

import torch
import triton
import triton.language as tl

from hosl.kernels._config import COMPILE_OPTIONS, default_block_counters, on_device
from hosl.kernels.direction import block_elements, block_normals, seed_key
from hosl.kernels.multi_tensor import i32


@triton.jit(do_not_specialize=["numel", "offset", "key_lo", "key_hi"])
def randn_kernel(out, numel, offset, key_lo, key_hi, BN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offset = offset.to(tl.int64)
    k0, k1 = seed_key(key_lo, key_hi)
    e = block_elements(b, offset, BN)
    z = block_normals(b, offset, k0, k1, BN)
    tl.store(out + e, z, mask=(e >= 0) & (e < numel))


# For the ahead-of-time compile check: argument types of one representative launch.
AOT = [(randn_kernel, {"out": "*fp32", "numel": "i64", "offset": "i64", "key_lo": "i32", "key_hi": "i32"},
        {"BN": 256})]


def randn(key_lo: int, key_hi: int, numel: int, offset: int, device, block_counters=None) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    bn = block_counters or default_block_counters()
    grid = (-(-(numel + offset % 4) // (4 * bn)), )
    with on_device(out.device):
        randn_kernel[grid](out, numel, offset, i32(key_lo), i32(key_hi), BN=bn, **COMPILE_OPTIONS)
    return out
