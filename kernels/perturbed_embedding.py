"""Perturbed embedding lookup, ``D`` directions in one launch::

    y[d, t, :] = round(fp32(W[ids[t], :]) + scale_d * z(seed_d, w_offset + ids[t]*H + h))

Only the gathered rows are perturbed: the cost is ``tokens x hidden`` per direction, never
``vocab x hidden``. ``W`` is read, never written. Each program loads a ``[BT, BH]`` block of gathered
rows once and writes it perturbed for a group of ``DB`` directions (``ids`` shared by every
direction, the usual case: the client's input), or gathers per direction (``ids`` ``[D, T]``).

The output element is exactly ``perturb_``'s ``fp32(w) + scale*z`` rounded to nearest even into
``W``'s dtype, so the fused lookup gives the scratch path's bits: the gathered rows of the
materialised ``W + scale*Z``. Positional embeddings are the same op (positions as ``ids``).
"""

import torch
import triton
import triton.language as tl

from hosl.kernels import multi_tensor as mt
from hosl.kernels._config import COMPILE_OPTIONS, INTERPRET, on_device
from hosl.kernels.direction import (FAMILY_RADEMACHER, FAMILY_SPHERE, element_normals, load_direction_group, load_f32,
                                    row_normals, store_rne)
from hosl.kernels.perturbed_linear import _factor_table, aligned, load_factors, row_signs, span_signs


@triton.jit(do_not_specialize=["T", "H", "D", "w_offset"])
def perturbed_embedding_kernel(ids, w, y, dirs, facs, T, H, D, w_offset, DTYPE: tl.constexpr, FAMILY: tl.constexpr,
                               SHARED_IDS: tl.constexpr, ALIGNED: tl.constexpr, DB: tl.constexpr, BT: tl.constexpr,
                               BH: tl.constexpr):
    num_t = tl.cdiv(T, BT)
    pid_d = tl.program_id(0) // num_t
    pid_t = tl.program_id(0) % num_t
    pid_h = tl.program_id(1)
    d, dmask, k0, k1, scale = load_direction_group(dirs, D, pid_d, DB)
    w_offset = w_offset.to(tl.int64)
    T64, H64 = T.to(tl.int64), H.to(tl.int64)
    rt = pid_t.to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)
    h0 = pid_h.to(tl.int64) * BH
    rh = h0 + tl.arange(0, BH).to(tl.int64)
    if SHARED_IDS:  # one gather for every direction: [1, BT]
        tmask = (rt < T64)[None, :]
        tok = tl.load(ids + rt, mask=rt < T64, other=0).to(tl.int64)[None, :]
    else:  # [DB, BT]
        tmask = dmask[:, None] & (rt < T64)[None, :]
        tok = tl.load(ids + d[:, None] * T64 + rt[None, :], mask=tmask, other=0).to(tl.int64)
    w_idx = tok[:, :, None] * H64 + rh[None, None, :]
    w_rows = load_f32(w, w_idx, tmask[:, :, None] & (rh < H64)[None, None, :], DTYPE)
    if FAMILY == FAMILY_RADEMACHER:
        if ALIGNED:  # w_offset % 32 == 0, H % 32 == 0, BH % 32 == 0: one Philox word per 32
            z = row_signs(w_offset + tok * H64 + h0, k0[:, None, None], k1[:, None, None], BH // 32)
        else:
            z = span_signs(w_offset + tok * H64 + h0, k0[:, None, None], k1[:, None, None], BH)
    elif ALIGNED:  # w_offset % 4 == 0 and H % 4 == 0: every gathered row starts on a Philox counter
        z = row_normals((w_offset + tok * H64 + h0) >> 2, k0[:, None, None], k1[:, None, None], BH // 4)
    else:
        z = element_normals(w_offset + w_idx, k0[:, None, None], k1[:, None, None])
    if FAMILY == FAMILY_SPHERE:  # z = float32(factor * z_gaussian), as perturb_ forms it
        z = load_factors(facs, d, dmask, 0, 1)[:, None, None] * z
    out = w_rows + scale[:, None, None] * z  # [DB, BT, BH]
    y_idx = d[:, None, None] * (T64 * H64) + rt[None, :, None] * H64 + rh[None, None, :]
    y_mask = dmask[:, None, None] & (rt < T64)[None, :, None] & (rh < H64)[None, None, :]
    store_rne(y, y_idx, out, y_mask, DTYPE)


_SIG = {"ids": "*i64", "w": "*fp32", "y": "*fp32", "dirs": "*i64", "facs": "*fp32", "T": "i32", "H": "i32", "D": "i32",
        "w_offset": "i64"}
_AOT = [(perturbed_embedding_kernel, {**_SIG, "w": ptr, "y": ptr},
        {"DTYPE": dtype, "FAMILY": family, "SHARED_IDS": shared, "ALIGNED": aligned, "DB": 4, "BT": 16, "BH": 128})
       for dtype, ptr, shared, aligned, family in ((0, "*fp32", True, True, 0), (1, "*fp16", False, False, 0),
                                                   (2, "*bf16", True, False, 0), (2, "*bf16", True, True, 1),
                                                   (2, "*bf16", True, False, 1),
                                                   (0, "*fp32", False, True, 2))]


def aot() -> list:
    """The variants the ahead-of-time compile check builds (the fused families' tiles: a fixed list,
    not one per registered family; see FUSED_FAMILIES)."""
    return list(_AOT)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def block_sizes(num_dirs: int, tokens: int, hidden: int) -> dict:
    """GPU: 16 tokens x 128 features x up to 4 directions per program. Interpreter: few, big programs."""
    if INTERPRET:
        return {"DB": _pow2(num_dirs, 1, 16), "BT": _pow2(tokens, 1, 64), "BH": _pow2(hidden, 4, 128)}
    return {"DB": _pow2(num_dirs, 1, 4), "BT": 16, "BH": _pow2(hidden, 4, 128)}


def perturbed_embedding(ids, weight, w_offset: int, keys_lo, keys_hi, scales, shared_ids: bool,
                        blocks=None, family: str = "gaussian", factors=None) -> torch.Tensor:
    """``[D, T, H]`` perturbed rows: ``ids`` is ``[T]`` (``shared_ids``) or ``[D, T]``, int64, in range;
    ``weight`` ``[V, H]`` contiguous float32/float16/bfloat16; scales exact float32. ``family`` as
    for the perturbed linear; sphere ``factors``: one float32 per direction."""
    assert ids.is_contiguous() and weight.is_contiguous() and ids.dtype == torch.int64
    num_dirs = len(scales)
    tokens, hidden = ids.shape[-1], weight.shape[1]
    y = torch.empty((num_dirs, tokens, hidden), dtype=weight.dtype, device=weight.device)
    if y.numel() == 0:
        return y
    blocks = blocks or block_sizes(num_dirs, tokens, hidden)
    table = mt.direction_table(keys_lo, keys_hi, scales, weight.device)
    facs = _factor_table(family, factors, num_dirs, weight.device)
    grid = (triton.cdiv(num_dirs, blocks["DB"]) * triton.cdiv(tokens, blocks["BT"]), triton.cdiv(hidden, blocks["BH"]))
    with on_device(weight.device):
        perturbed_embedding_kernel[grid](
            ids, weight, y, table, facs, tokens, hidden, num_dirs, w_offset, DTYPE=mt.dtype_code(weight.dtype),
            FAMILY=mt.FAMILY_CODES[family], SHARED_IDS=shared_ids,
            ALIGNED=aligned(family, w_offset, hidden, blocks["BH"]), **blocks, **COMPILE_OPTIONS)
    return y
