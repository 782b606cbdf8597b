"""Perturbed linear layer, ``D`` directions in one launch, forward only::

    y[d] = x[d] @ (W + scale_d * Z_d)^T + (b + scale_d * z_b,d)

``Z_d[o, i] = z(seed_d, w_offset + o*in_features + i)`` and ``z_b,d[o] = z(seed_d, b_offset + o)``:
the direction spec at the coordinates ``W`` and ``b`` have in the client's numbering. ``W`` and
``b`` are read, never written, so the weights are exact after the pass by construction.

Per program: one ``[BM, BN]`` output tile for a group of ``DB`` directions. Each ``k`` step loads
the ``[BN, BK]`` tile of ``W`` once, generates ``Z`` for the ``DB`` directions from registers
(``row_normals`` when every row of the tile starts on a multiple of 4 coordinates, else
``element_normals``; Rademacher: :func:`row_signs`, else :func:`span_signs`; sphere: the Gaussian ``Z`` times the
direction's per-tensor factor) and feeds a batched ``tl.dot`` of ``[DB, BM, BK] x [DB, BK, BN]``. When the
input is shared by every direction (the client's first perturbed layer), its tile is loaded once and
broadcast. The launcher makes ``DB`` cover all ``D`` directions when the accumulators fit.

The perturbed element is ``fp32(W) + scale*z`` (one multiply, one add, no FMA: ``COMPILE_OPTIONS``),
exactly as in ``perturb_``, then rounded to nearest even into the weight dtype -- the value the
scratch path materialises. fp16/bf16 tiles then go to the tensor cores in their own dtype with
float32 accumulation. fp32 follows torch's matmul setting (:func:`fp32_precision`): ``"tf32x3"``
(~fp32 accuracy) by default, ``"tf32"`` when TF32 is allowed, ``"ieee"`` when
``torch.backends.cuda.matmul.fp32_precision == "ieee"`` (exact products: what bit-exact probes need).
Under the interpreter every dot runs in float32 on exactly widened operands (its bf16 ``tl.dot``
gives garbage; an fp16/bf16 product is exact in float32 either way).

The bias is perturbed the same way, rounded to the bias dtype and added to the float32 accumulator;
the output is rounded to nearest even into ``x``'s dtype. Results equal the scratch path's
``F.linear`` on the materialised weights up to summation order.
"""

import torch
import triton
import triton.language as tl

from hosl.kernels import multi_tensor as mt
from hosl.kernels._config import COMPILE_OPTIONS, INTERPRET, on_device
from hosl.kernels.direction import (DTYPE_BF16, DTYPE_F16, FAMILY_RADEMACHER, FAMILY_SPHERE, bf16_bits_rne,
                                    counter_word, element_normals, load_direction_group, load_f32, philox4x32_10,
                                    row_normals, store_rne)

# The families whose z the fused tiles below (and perturbed_embedding's, which shares them) generate.
# Any other family goes through the Triton backend's materialising path (hosl/ops/backends/triton.py),
# so a family added to the spec and kernels/direction.py works before it has a fused tile.
FUSED_FAMILIES = ("gaussian", "rademacher", "sphere")


@triton.jit
def span_signs(start, k0, k1, BK: tl.constexpr):
    """Rademacher z for ``BK`` consecutive coordinates from each ``start`` (int64 ``[A, R]``, any
    alignment): float32 ``[A, R, BK]`` (keys broadcast as ``[A, 1, 1]``).

    Coordinate ``c`` is bit ``c % 32`` of Philox word ``c // 32`` (word ``m`` is word ``m % 4`` of
    counter ``m // 4``, as :func:`hosl.kernels.direction.block_signs` lays it out; a 1 bit is -1).
    A row's coordinates lie in the ``(BK + 31) // 32 + 1`` words from ``start // 32`` on: one Philox
    call each (:func:`hosl.kernels.direction.counter_word`, rounded up to a power of two of words),
    and each element takes its word with ``tl.gather``, instead of one call per element. (Picking
    the word with a ``tl.where`` per candidate instead made the compiler rerun the calls per element
    in the embedding: 320 calls per thread in its sm_90 PTX, against 4 with the gather.) Rows whose
    tiles start on a multiple of 32 use :func:`row_signs` (no word to pick).
    """
    NW: tl.constexpr = triton.next_power_of_2((BK + 31) // 32 + 1)
    words = counter_word((start >> 5)[:, :, None] + tl.arange(0, NW).to(tl.int64)[None, None, :], k0, k1)
    rel = (start & 31).to(tl.int32)[:, :, None] + tl.arange(0, BK)[None, None, :]  # coordinate - 32*(start//32)
    A: tl.constexpr = words.shape[0] if words.shape[0] > rel.shape[0] else rel.shape[0]
    R: tl.constexpr = words.shape[1] if words.shape[1] > rel.shape[1] else rel.shape[1]
    rel = tl.broadcast_to(rel, (A, R, BK))
    word = tl.gather(tl.broadcast_to(words, (A, R, NW)), rel >> 5, 2)
    bit = (word >> (rel & 31).to(tl.uint32)) & 1
    return tl.where(bit != 0, -1.0, 1.0)


@triton.jit
def row_signs(first, k0, k1, W: tl.constexpr):
    """Rademacher z for ``32*W`` consecutive coordinates from each ``first`` on (int64 ``[A, R]``, every
    entry a multiple of 32): float32 ``[A, R, 32*W]`` (keys broadcast as ``[A, 1, 1]``). One Philox
    call per 32 coordinates (its word ``(first >> 5) & 3``) instead of one per element."""
    word = (first >> 5)[:, :, None] + tl.arange(0, W).to(tl.int64)[None, None, :]
    n = word >> 2
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    sel = word & 3
    bits32 = tl.where(sel == 0, x0, tl.where(sel == 1, x1, tl.where(sel == 2, x2, x3)))
    bits = (bits32[:, :, :, None] >> tl.arange(0, 32).to(tl.uint32)[None, None, None, :]) & 1
    z = tl.where(bits != 0, -1.0, 1.0)
    return tl.reshape(z, (bits32.shape[0], bits32.shape[1], 32 * W))


def aligned(family: str, offset: int, row: int, block: int) -> bool:
    """Whether every row tile starts where the row form of the family's z applies: a multiple of 4
    coordinates (Gaussian, sphere: :func:`row_normals`) or of 32 with 32-wide blocks (Rademacher)."""
    if family == "rademacher":
        return offset % 32 == 0 and row % 32 == 0 and block % 32 == 0
    return offset % 4 == 0 and row % 4 == 0


@triton.jit
def load_factors(facs, d, dmask, j, PER: tl.constexpr):
    """Sphere: the float32 factor ``facs[d * PER + j]`` of each direction in ``d`` (1.0 where masked)."""
    return tl.load(facs + d * PER + j, mask=dmask, other=1.0)


@triton.jit
def round_to_dtype(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """float32 ``x`` rounded to nearest even into ``DTYPE``; returned in ``DTYPE`` (``NATIVE``, for
    tensor-core dots) or widened back to float32 (exact)."""
    # one return at the end: the compiler rejects branches that return different dtypes
    if DTYPE == DTYPE_BF16:
        bits = bf16_bits_rne(x)
        if NATIVE:
            out = bits.to(tl.bfloat16, bitcast=True)
        else:
            out = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == DTYPE_F16:
        if NATIVE:
            out = x.to(tl.float16)
        else:
            out = x.to(tl.float16).to(tl.float32)
    else:
        out = x
    return out


@triton.jit(do_not_specialize=["M", "N", "K", "D", "w_offset", "b_offset"])
def perturbed_linear_kernel(x, w, b, y, dirs, facs, M, N, K, D, w_offset, b_offset,
                            DTYPE: tl.constexpr, FAMILY: tl.constexpr, SHARED_X: tl.constexpr, HAS_BIAS: tl.constexpr,
                            PERTURB_BIAS: tl.constexpr, ALIGNED: tl.constexpr, NATIVE: tl.constexpr,
                            PRECISION: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    pid_d = tl.program_id(0) // num_m
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(1)
    d, dmask, k0, k1, scale = load_direction_group(dirs, D, pid_d, DB)
    k0_3, k1_3, scale_3 = k0[:, None, None], k1[:, None, None], scale[:, None, None]
    w_offset = w_offset.to(tl.int64)
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    M64, K64 = M.to(tl.int64), K.to(tl.int64)

    acc = tl.zeros((DB, BM, BN), dtype=tl.float32)
    for k_start in range(0, K, BK):
        rk = k_start + tl.arange(0, BK).to(tl.int64)
        kmask = rk < K64
        # the W tile: read once for all DB directions
        w_idx = rn[:, None] * K64 + rk[None, :]
        w_tile = load_f32(w, w_idx, (rn[:, None] < N) & kmask[None, :], DTYPE)
        if FAMILY == FAMILY_RADEMACHER:
            if ALIGNED:  # w_offset % 32 == 0, K % 32 == 0, BK % 32 == 0: one Philox word per 32
                z = row_signs((w_offset + rn * K64 + k_start)[None, :], k0_3, k1_3, BK // 32)
            else:
                z = span_signs((w_offset + rn * K64 + k_start)[None, :], k0_3, k1_3, BK)
        elif ALIGNED:  # w_offset % 4 == 0 and K % 4 == 0: each row's tile starts on a counter
            z = row_normals(((w_offset + rn * K64 + k_start) >> 2)[None, :], k0_3, k1_3, BK // 4)
        else:
            z = element_normals((w_offset + w_idx)[None, :, :], k0_3, k1_3)
        if FAMILY == FAMILY_SPHERE:  # z = float32(factor * z_gaussian), as perturb_ forms it
            z = load_factors(facs, d, dmask, 0, 2)[:, None, None] * z
        w_pert = round_to_dtype(w_tile[None, :, :] + scale_3 * z, DTYPE, NATIVE)  # [DB, BN, BK]

        if SHARED_X:  # the input is the same for every direction: one load, broadcast
            x_idx = rm[:, None] * K64 + rk[None, :]
            x_mask = (rm[:, None] < M64) & kmask[None, :]
            if NATIVE:
                x_tile = tl.load(x + x_idx, mask=x_mask, other=0.0)
            else:
                x_tile = load_f32(x, x_idx, x_mask, DTYPE)
            x_tile = tl.broadcast_to(x_tile[None, :, :], (DB, BM, BK))
        else:
            x_idx = d[:, None, None] * (M64 * K64) + rm[None, :, None] * K64 + rk[None, None, :]
            x_mask = dmask[:, None, None] & (rm[None, :, None] < M64) & kmask[None, None, :]
            if NATIVE:
                x_tile = tl.load(x + x_idx, mask=x_mask, other=0.0)
            else:
                x_tile = load_f32(x, x_idx, x_mask, DTYPE)
        acc = tl.dot(x_tile, tl.trans(w_pert, (0, 2, 1)), acc, input_precision=PRECISION)

    if HAS_BIAS:
        b_tile = load_f32(b, rn, rn < N, DTYPE)[None, :]
        if PERTURB_BIAS:
            if FAMILY == FAMILY_RADEMACHER:
                row0 = b_offset.to(tl.int64) + pid_n.to(tl.int64) * BN  # the bias tile is one row of BN
                z_b = tl.reshape(span_signs(tl.full((1, 1), 0, tl.int64) + row0, k0[:, None, None], k1[:, None, None],
                                            BN), (DB, BN))
            else:
                z_b = element_normals((b_offset.to(tl.int64) + rn)[None, :], k0[:, None], k1[:, None])
            if FAMILY == FAMILY_SPHERE:
                z_b = load_factors(facs, d, dmask, 1, 2)[:, None] * z_b
            b_tile = b_tile + scale[:, None] * z_b
        acc = acc + round_to_dtype(b_tile, DTYPE, False)[:, None, :]

    y_idx = d[:, None, None] * (M64 * N) + rm[None, :, None] * N + rn[None, None, :]
    y_mask = dmask[:, None, None] & (rm[None, :, None] < M64) & (rn[None, None, :] < N)
    store_rne(y, y_idx, acc, y_mask, DTYPE)


_SIG = {"x": "*fp32", "w": "*fp32", "b": "*fp32", "y": "*fp32", "dirs": "*i64", "facs": "*fp32", "M": "i32",
        "N": "i32", "K": "i32", "D": "i32", "w_offset": "i64", "b_offset": "i64"}
_SIG16 = {**_SIG, "x": "*fp16", "w": "*fp16", "b": "*fp16", "y": "*fp16"}
_SIGBF = {**_SIG, "x": "*bf16", "w": "*bf16", "b": "*bf16", "y": "*bf16"}
_GPU_BLOCKS = {"DB": 4, "BM": 64, "BN": 64, "BK": 32}
# What a GPU run compiles, each path at least once (few variants keep the AOT check short): fp32 in
# its three precisions ("ieee": the bit-exact probes), fp16 and bf16 on tensor cores; row-aligned and
# per-element z; shared and per-direction inputs; the Rademacher (both tile paths) and sphere families.
_AOT = [(perturbed_linear_kernel, sig,
        {"DTYPE": dtype, "FAMILY": family, "SHARED_X": shared, "HAS_BIAS": True, "PERTURB_BIAS": True,
         "ALIGNED": aligned, "NATIVE": dtype != 0, "PRECISION": precision, **_GPU_BLOCKS})
       for dtype, sig, precision, shared, aligned, family in (
           (0, _SIG, "tf32x3", True, True, 0), (0, _SIG, "tf32", False, False, 0), (0, _SIG, "ieee", True, False, 0),
           (1, _SIG16, "ieee", False, True, 0),
           (2, _SIGBF, "ieee", True, False, 0), (2, _SIGBF, "ieee", False, True, 1), (2, _SIGBF, "ieee", True, False, 1),
           (0, _SIG, "tf32x3", True, True, 2))]


def aot() -> list:
    """The variants the ahead-of-time compile check builds (the fused families' tiles: a fixed list,
    not one per registered family; see FUSED_FAMILIES)."""
    return list(_AOT)


def _factor_table(family: str, factors, count: int, device) -> torch.Tensor:
    """The sphere factors as a float32 tensor on ``device`` (a 1-element dummy for the other families)."""
    if family != "sphere":
        return torch.ones(1, dtype=torch.float32, device=device)
    assert factors is not None and len(factors) == count
    return torch.tensor(list(factors), dtype=torch.float32).to(device)


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def block_sizes(num_dirs: int, m: int, n: int, k: int) -> dict:
    """Tile sizes. GPU: 64x64x32 tiles, up to 4 directions per program (64 KiB of accumulators
    per program at 4 warps). Interpreter: one program per ~shape (it pays ~18 ms per program)."""
    if INTERPRET:
        return {"DB": _pow2_at_least(num_dirs, 1, 16), "BM": _pow2_at_least(m, 16, 64),
                "BN": _pow2_at_least(n, 16, 64), "BK": _pow2_at_least(k, 16, 64)}
    return {"DB": _pow2_at_least(num_dirs, 1, 4), "BM": 64 if m > 32 else _pow2_at_least(m, 16, 64),
            "BN": 64, "BK": 32}


def fp32_precision() -> str:
    """The ``input_precision`` of fp32 dots, from torch's own matmul setting:

    * ``"ieee"`` (fp32 products on CUDA cores, accumulated with ``fma.rn.f32``; slow) when asked for
      with ``torch.backends.cuda.matmul.fp32_precision = "ieee"`` (torch >= 2.9; also what
      ``torch.set_float32_matmul_precision("highest")`` sets there). The bit-exact probes use it.
    * ``"tf32"`` when TF32 is allowed (``fp32_precision == "tf32"``, or the older ``allow_tf32``).
    * else ``"tf32x3"`` (three tf32 products, ~fp32 accuracy, tensor cores, no FMA in the PTX):
      torch's default (``"none"``). Not bit-exact: an identity probe through it can miss by an ulp.
    """
    matmul = torch.backends.cuda.matmul
    asked = getattr(matmul, "fp32_precision", None)  # torch >= 2.9: "none" | "ieee" | "tf32"
    if asked in ("ieee", "tf32"):
        return asked
    if asked is not None:
        return "tf32x3"  # "none" (reading allow_tf32 too can raise: torch refuses mixed-API reads)
    return "tf32" if matmul.allow_tf32 else "tf32x3"


def perturbed_linear(x, weight, bias, w_offset: int, b_offset, keys_lo, keys_hi, scales, shared_x: bool,
                     blocks=None, family: str = "gaussian", factors=None) -> torch.Tensor:
    """``y[d] = x[d] (W + s_d Z_d)^T + (b + s_d z_b,d)``: ``[D, M, N]`` in ``x``'s dtype.

    ``x`` is ``[M, K]`` with ``shared_x`` (one input for every direction) or ``[D, M, K]``;
    ``weight`` ``[N, K]``; ``bias`` ``[N]`` or None; ``b_offset`` None leaves the bias unperturbed.
    Contiguous tensors of one dtype (float32/float16/bfloat16) on one device; scales exact float32.
    ``family``: ``"gaussian"``, ``"rademacher"`` or ``"sphere"``; for sphere, ``factors`` holds two
    float32 factors per direction, ``[d*2]`` for the weight and ``[d*2 + 1]`` for the bias.
    """
    assert x.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    num_dirs = len(scales)
    n, k = weight.shape
    m = x.shape[-2]
    y = torch.empty((num_dirs, m, n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    blocks = blocks or block_sizes(num_dirs, m, n, k)
    code = mt.dtype_code(weight.dtype)
    table = mt.direction_table(keys_lo, keys_hi, scales, x.device)
    facs = _factor_table(family, factors, 2 * num_dirs, x.device)
    precision = fp32_precision() if code == 0 and not INTERPRET else "ieee"
    grid = (triton.cdiv(num_dirs, blocks["DB"]) * triton.cdiv(m, blocks["BM"]), triton.cdiv(n, blocks["BN"]))
    with on_device(x.device):
        perturbed_linear_kernel[grid](
            x, weight, bias if bias is not None else weight, y, table, facs, m, n, k, num_dirs, w_offset,
            b_offset if b_offset is not None else 0,
            DTYPE=code, FAMILY=mt.FAMILY_CODES[family], SHARED_X=shared_x, HAS_BIAS=bias is not None,
            PERTURB_BIAS=b_offset is not None,
            ALIGNED=aligned(family, w_offset, k, blocks["BK"]), NATIVE=(code != 0 and not INTERPRET),
            PRECISION=precision, **blocks, **COMPILE_OPTIONS)
    return y
