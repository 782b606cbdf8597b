"""Device helpers for the direction ``z(seed, i)``: Triton transcription of ``hosl/directions/spec.py``.

Every float step below is one correctly rounded float32 operation, in the spec's order; the
kernels must be compiled with ``enable_fp_fusion=False`` (see :data:`hosl.kernels.COMPILE_OPTIONS`)
so that no ``a * b + c`` becomes an FMA, and division/sqrt use ``tl.div_rn``/``tl.sqrt_rn``
(plain ``/`` and ``tl.sqrt`` lower to approximate PTX instructions).

Layout used by every kernel: a program owns ``BN`` consecutive Philox counters and so ``4 * BN``
consecutive coordinates. A tensor whose first coordinate is ``offset`` starts at counter
``offset // 4``, lane ``offset % 4``; the program's elements are therefore shifted by
``offset % 4`` and the out-of-range ones masked (see :func:`block_elements`).

bf16 is loaded and stored as raw 16-bit words (exact widening, round-to-nearest-even narrowing
done with integer ops): the interpreter truncates on fp32->bf16 casts, and the integer form is the
same code on the GPU. fp16 uses the native cast, which rounds to nearest even on both.
"""

import triton
import triton.language as tl

from hosl.directions.families import FAMILY_CODES

# Constants: the same values as hosl/directions/spec.py (exact float32 values, as hex floats).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)

LN2 = tl.constexpr(float.fromhex("0x1.62e430p-1"))
SQRT2 = tl.constexpr(float.fromhex("0x1.6a09e6p+0"))
TWO_POW_M23 = tl.constexpr(float.fromhex("0x1p-23"))

# log: L3, L5, L7, L9
L3 = tl.constexpr(float.fromhex("0x1.555556p-2"))
L5 = tl.constexpr(float.fromhex("0x1.99999ap-3"))
L7 = tl.constexpr(float.fromhex("0x1.24924ap-3"))
L9 = tl.constexpr(float.fromhex("0x1.c71c72p-4"))
# sin(pi/2 f): S1 .. S13
S1 = tl.constexpr(float.fromhex("0x1.921fb6p+0"))
S3 = tl.constexpr(float.fromhex("-0x1.4abbcep-1"))
S5 = tl.constexpr(float.fromhex("0x1.466bc6p-4"))
S7 = tl.constexpr(float.fromhex("-0x1.32d2ccp-8"))
S9 = tl.constexpr(float.fromhex("0x1.507834p-13"))
S11 = tl.constexpr(float.fromhex("-0x1.e30750p-19"))
S13 = tl.constexpr(float.fromhex("0x1.e8f434p-25"))
# cos(pi/2 f): C0 .. C12
C0 = tl.constexpr(float.fromhex("0x1p+0"))
C2 = tl.constexpr(float.fromhex("-0x1.3bd3ccp+0"))
C4 = tl.constexpr(float.fromhex("0x1.03c1f0p-2"))
C6 = tl.constexpr(float.fromhex("-0x1.55d3c8p-6"))
C8 = tl.constexpr(float.fromhex("0x1.e1f506p-11"))
C10 = tl.constexpr(float.fromhex("-0x1.a6d1f2p-16"))
C12 = tl.constexpr(float.fromhex("0x1.f9d38ap-22"))

# Plain-Python views of the same constants, in the spec's tuple order (for constant checks).
LOG_COEFFS = tuple(c.value for c in (L3, L5, L7, L9))
SIN_COEFFS = tuple(c.value for c in (S1, S3, S5, S7, S9, S11, S13))
COS_COEFFS = tuple(c.value for c in (C0, C2, C4, C6, C8, C10, C12))

# Dtype codes (constexpr): one compiled variant per parameter dtype.
DTYPE_F32 = tl.constexpr(0)
DTYPE_F16 = tl.constexpr(1)
DTYPE_BF16 = tl.constexpr(2)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors; ``k0``/``k1`` are uint32 scalars (the seed's halves)."""
    for r in tl.static_range(PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def uniform_open(word):
    """((word >> 9) + 0.5) * 2**-23: exact, strictly inside (0, 1)."""
    k = (word >> 9).to(tl.float32)
    return (k + 0.5) * TWO_POW_M23


@triton.jit
def log_open(u):
    """Natural log of u in (0, 1): exponent split, then the atanh series (spec ``_log``)."""
    bits = u.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)
    ef = tl.where(big, e + 1, e).to(tl.float32)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = L9 * s2 + L7
    p = p * s2 + L5
    p = p * s2 + L3
    p = p * s2 + 1.0
    log_m = (s + s) * p
    return ef * LN2 + log_m


@triton.jit
def sincos_quarter(f):
    """(sin, cos) of pi/2 * f for f in (0, 1) (spec ``_sincos_quarter``)."""
    f2 = f * f
    s = S13 * f2 + S11
    s = s * f2 + S9
    s = s * f2 + S7
    s = s * f2 + S5
    s = s * f2 + S3
    s = s * f2 + S1
    s = s * f
    c = C12 * f2 + C10
    c = c * f2 + C8
    c = c * f2 + C6
    c = c * f2 + C4
    c = c * f2 + C2
    c = c * f2 + C0
    return s, c


@triton.jit
def box_muller(radius_word, angle_word):
    """Two normals from two uint32 words: r*cos(theta), r*sin(theta)."""
    u = uniform_open(radius_word)
    r = tl.sqrt_rn(log_open(u) * -2.0)
    quadrant = angle_word >> 30
    f = (((angle_word >> 7) & 0x7FFFFF).to(tl.float32) + 0.5) * TWO_POW_M23
    s, c = sincos_quarter(f)
    cos_t = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    sin_t = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    return r * cos_t, r * sin_t


@triton.jit
def normal4(n, k0, k1):
    """The four normals of counter ``n`` (int64 tensor, 0 <= n < 2**62): coordinates 4n .. 4n+3."""
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return z0, z1, z2, z3


@triton.jit
def seed_key(key_lo, key_hi):
    """The Philox key as uint32 scalars; launchers pass the halves as int32 bit patterns."""
    return key_lo.to(tl.uint32, bitcast=True), key_hi.to(tl.uint32, bitcast=True)


@triton.jit
def block_elements(b, offset, BN: tl.constexpr):
    """Element indices (int64, may be out of range: mask them) of program ``b`` of a tensor.

    Program ``b`` owns counters ``offset // 4 + b*BN + [0, BN)``; coordinate ``offset + e`` is
    element ``e``, so its elements are ``b*4*BN - offset % 4 + [0, 4*BN)``.
    """
    return b * (4 * BN) - offset % 4 + tl.arange(0, 4 * BN).to(tl.int64)


@triton.jit
def block_normals(b, offset, k0, k1, BN: tl.constexpr):
    """z for the ``4*BN`` elements of :func:`block_elements`, float32, in element order."""
    n = offset // 4 + b * BN + tl.arange(0, BN).to(tl.int64)
    z0, z1, z2, z3 = normal4(n, k0, k1)
    # join(join(z0, z2), join(z1, z3))[n, i, j] = z_{2i+j}: row-major flattening gives z0 z1 z2 z3
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (4 * BN, ))


# Direction families: the FAMILY constexpr of the kernels takes hosl.directions.families.FAMILY_CODES.
# A family's Triton definition is its constant here plus its branch of family_direction (and of
# family_span if its layout is not 4 coordinates per counter); tests/test_family_codes.py
# checks that the constants below are exactly spec's families.
FAMILY_GAUSSIAN = tl.constexpr(FAMILY_CODES["gaussian"])
FAMILY_RADEMACHER = tl.constexpr(FAMILY_CODES["rademacher"])
FAMILY_SPHERE = tl.constexpr(FAMILY_CODES["sphere"])


@triton.jit
def counter_word(m, k0, k1):
    """Philox word ``m % 4`` of Rademacher counter ``m // 4`` (``m``: int64 word indices, any shape).

    Word ``m`` holds the signs of coordinates ``32m .. 32m+31``. Each element computes the whole
    Philox call and keeps one of its four words: one call per 32 coordinates."""
    n = m >> 2
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    which = m & 3
    return tl.where(which == 0, x0, tl.where(which == 1, x1, tl.where(which == 2, x2, x3)))


@triton.jit
def word_signs(words):
    """+-1.0 float32 ``[W, 32]`` from uint32 words ``[W]``: ``[w, j]`` is bit ``j`` of word ``w``
    (least significant first), a 1 bit giving -1.0: the sign bit of 1.0 set by an integer shift."""
    bit31 = (words[:, None] << (31 - tl.arange(0, 32)).to(tl.uint32)[None, :]) & 0x80000000
    return (bit31 | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def block_signs(b, offset, k0, k1, BN: tl.constexpr):
    """Rademacher z (+-1.0 float32) for program ``b`` of a tensor at ``offset``, element order.

    The program owns Rademacher counters ``offset // 128 + b*BN + [0, BN)`` (128 coordinates
    each); its elements are ``b*128*BN - offset % 128 + [0, 128*BN)`` (:func:`family_span`).
    Coordinate ``128n + 32w + j`` takes bit ``j`` of word ``x_w`` of counter ``n``; a 1 bit is -1.
    The ``4*BN`` words are computed one per tensor element (:func:`counter_word`) and their bits
    expanded with shifts; at the GPU launch (``BN`` = threads per program / 4,
    ``kernels/multi_tensor.py`` ``family_layout``) each thread computes one Philox call, keeps
    one word and the 32 coordinates' signs reach their threads through one layout conversion,
    instead of every thread recomputing the counters of its own elements.
    """
    m = (offset // 128 + b * BN) * 4 + tl.arange(0, 4 * BN).to(tl.int64)
    return tl.reshape(word_signs(counter_word(m, k0, k1)), (128 * BN, ))


# The family branch of the multi-tensor kernels (randn, perturb, zo_update): the two functions
# below, one per question (which elements a program owns, which z they get). A new family with
# the 4-coordinates-per-counter layout needs only its branch in family_direction (and, if it
# covers 128 coordinates per counter like Rademacher, kernels/multi_tensor.py family_layout).


@triton.jit
def program_span(start, numel, WIDTH: tl.constexpr):
    """``(start, local, mask)`` for elements ``start + local``, ``local`` int32 ``0 .. WIDTH-1``,
    ``mask`` those in ``[0, numel)`` (``start``: int64 scalar, negative for a program that begins
    before its tensor)."""
    local = tl.arange(0, WIDTH)
    lo = tl.minimum(tl.maximum(-start, 0), WIDTH).to(tl.int32)
    hi = tl.maximum(tl.minimum(numel - start, WIDTH), 0).to(tl.int32)
    return start, local, (local >= lo) & (local < hi)


@triton.jit
def family_span(b, offset, numel, FAMILY: tl.constexpr, BN: tl.constexpr):
    """Program ``b``'s elements of a tensor of ``numel`` elements at ``offset``, as ``(start, local,
    mask)`` (:func:`program_span`): BN counters of 128 (Rademacher) or of 4 coordinates (every other
    family), so elements ``b*128*BN - offset % 128 + [0, 128*BN)`` or ``b*4*BN - offset % 4 + [0, 4*BN)``.

    Kernels address ``base + start`` once (:func:`element_address`) and index it with the int32
    ``local``: int64 indices per element cost registers (the Rademacher perturb for sm_90 took 168
    per thread with them, 80 without)."""
    if FAMILY == FAMILY_RADEMACHER:
        return program_span(b * (128 * BN) - offset % 128, numel, 128 * BN)
    else:
        return program_span(b * (4 * BN) - offset % 4, numel, 4 * BN)


@triton.jit
def element_address(addr, start, DTYPE: tl.constexpr):
    """The integer address of element ``start`` of the tensor at integer address ``addr``."""
    if DTYPE == DTYPE_F32:
        return addr + start * 4
    else:
        return addr + start * 2


@triton.jit
def family_direction(b, offset, k0, k1, factor, FAMILY: tl.constexpr, BN: tl.constexpr):
    """z of the family for the elements of :func:`family_span`, in order; ``factor``: the per-tensor
    factor (sphere: ``factor * z_gaussian``; 1.0 for the families without one).

    A FAMILY code without a branch here fails to compile (it must not fall back to Gaussian)."""
    if FAMILY == FAMILY_GAUSSIAN:
        return block_normals(b, offset, k0, k1, BN)
    elif FAMILY == FAMILY_RADEMACHER:
        return block_signs(b, offset, k0, k1, BN)
    elif FAMILY == FAMILY_SPHERE:
        return factor * block_normals(b, offset, k0, k1, BN)
    else:
        tl.static_assert(False, "hosl: this FAMILY has no branch in kernels/direction.py family_direction")


@triton.jit
def row_normals(first, k0, k1, C: tl.constexpr):
    """z for ``4*C`` consecutive coordinates from ``4*first`` on, for every counter in ``first``.

    ``first`` is an int64 tensor ``[A, R]`` of Philox counters (each row's first coordinate must be a
    multiple of 4, i.e. row-aligned); ``k0``/``k1`` broadcast against ``[A, R, C]`` (per-direction
    keys as ``[A, 1, 1]``). Returns float32 ``[A, R, 4*C]`` in coordinate order -- the 2-D-tile
    form of :func:`block_normals` used by the perturbed matmul and embedding.
    """
    n = first[:, :, None] + tl.arange(0, C).to(tl.int64)[None, None, :]
    z0, z1, z2, z3 = normal4(n, k0, k1)
    # [.., i, j] = z_{2i+j} as in block_normals: row-major flattening gives z0 z1 z2 z3 per counter
    zz = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(zz, (z0.shape[0], z0.shape[1], 4 * C))


@triton.jit
def element_normals(coord, k0, k1):
    """z at arbitrary int64 coordinates ``coord`` (any shape; keys broadcast against it).

    One Philox call per element (4x the work of :func:`row_normals`): for tiles whose rows do not
    start on a multiple of 4 and for small vectors such as biases.
    """
    lane = coord & 3
    z0, z1, z2, z3 = normal4(coord >> 2, k0, k1)
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit
def load_direction_group(dirs, D, pid_d, DB: tl.constexpr):
    """Keys (uint32 ``[DB]``), scales (float32 ``[DB]``), indices and mask of this program's directions.

    ``dirs`` holds ``(key_lo, key_hi, scale_bits)`` per direction (int64 words)."""
    d = pid_d * DB + tl.arange(0, DB)
    dmask = d < D
    k0 = tl.load(dirs + 3 * d, mask=dmask, other=0).to(tl.uint32)
    k1 = tl.load(dirs + 3 * d + 1, mask=dmask, other=0).to(tl.uint32)
    scale = scalar_f32(tl.load(dirs + 3 * d + 2, mask=dmask, other=0))
    return d.to(tl.int64), dmask, k0, k1, scale


@triton.jit
def scalar_f32(bits):
    """A float32 scalar passed as its int32 bit pattern (exact for every value, subnormals too)."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def load_f32(addr, idx, mask, DTYPE: tl.constexpr):
    """Elements ``idx`` of the tensor at integer address ``addr``, widened exactly to float32."""
    if DTYPE == DTYPE_BF16:
        bits = tl.load(addr.to(tl.pointer_type(tl.uint16)) + idx, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == DTYPE_F16:
        return tl.load(addr.to(tl.pointer_type(tl.float16)) + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(addr.to(tl.pointer_type(tl.float32)) + idx, mask=mask, other=0.0)


@triton.jit
def bf16_bits_rne(x):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as torch's scalar cast)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def store_rne(addr, idx, x, mask, DTYPE: tl.constexpr):
    """Store float32 ``x`` into the tensor at integer address ``addr``, rounded to nearest even."""
    if DTYPE == DTYPE_BF16:
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + idx, bf16_bits_rne(x), mask=mask)
    elif DTYPE == DTYPE_F16:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + idx, x.to(tl.float16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + idx, x, mask=mask)
