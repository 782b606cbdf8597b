"""The direction spec, executable: ``z(seed, i)`` in plain PyTorch.

Every backend (C++ CPU loop, CUDA kernel, Triton kernel) must produce the *same bits* as
:func:`randn_reference`. The rules that make that possible (see ``docs/directions.md``):

* Philox4x32-10 (Random123) with key ``(seed & 0xffffffff, seed >> 32)`` and counter
  ``(n & 0xffffffff, n >> 32, 0, 0)`` where ``n = i // 4``; one call gives four 32-bit words
  ``x0..x3`` and so four normals (coordinates ``4n .. 4n+3``).
* Box-Muller on the pairs ``(x0, x1)`` and ``(x2, x3)``: the first word of a pair gives the
  radius, the second the angle; the outputs are ``r*cos``, ``r*sin`` of pair one, then of pair two.
* float32 math with ``+ - * /`` and ``sqrt`` only, each rounded on its own (no fused multiply-add),
  evaluated in exactly the order written here. ``log``, ``sin`` and ``cos`` are the short
  polynomials below, with the float32 constants below.

Uniforms use 23 bits so that every step of their construction is exact and they lie strictly
inside (0, 1): ``u = ((x >> 9) + 0.5) * 2**-23``.

Direction families (end of this file; registered in :mod:`hosl.directions.families`): ``"gaussian"``
(the above), ``"rademacher"`` (one Philox bit per coordinate, 128 coordinates per counter) and
``"sphere"`` (each tensor's Gaussian slice times one float32 factor, from an order-free fixed-point norm)
and ``"lowrank"`` (a 2-D tensor's ``z = U V^T / sqrt(R)`` from Gaussian ``U``, ``V`` at its own coordinates).
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------
# Constants. Each is an exact float32 value, written as a hex float; csrc/hosl_direction.h and
# kernels/direction.py hold the same values (tests/test_cpu_backend.py::test_header_constants_match_spec
# checks the header).
# ----------------------------------------------------------------------------------------------
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

LN2 = float.fromhex("0x1.62e430p-1")
SQRT2 = float.fromhex("0x1.6a09e6p+0")
TWO_POW_M23 = float.fromhex("0x1p-23")

# ln(m) = 2*s*(1 + s^2*(L3 + s^2*(L5 + s^2*(L7 + s^2*L9)))),  s = (m-1)/(m+1),  m in [sqrt(.5), sqrt(2)]
LOG_COEFFS = tuple(
    float.fromhex(h) for h in ("0x1.555556p-2", "0x1.99999ap-3", "0x1.24924ap-3", "0x1.c71c72p-4")
)  # L3, L5, L7, L9

# sin(pi/2*f) = f*(S1 + f^2*(S3 + ... + f^2*S13)),  f in (0, 1)
SIN_COEFFS = tuple(
    float.fromhex(h)
    for h in (
        "0x1.921fb6p+0",
        "-0x1.4abbcep-1",
        "0x1.466bc6p-4",
        "-0x1.32d2ccp-8",
        "0x1.507834p-13",
        "-0x1.e30750p-19",
        "0x1.e8f434p-25",
    )
)  # S1 .. S13

# cos(pi/2*f) = C0 + f^2*(C2 + ... + f^2*C12)
COS_COEFFS = tuple(
    float.fromhex(h)
    for h in (
        "0x1p+0",
        "-0x1.3bd3ccp+0",
        "0x1.03c1f0p-2",
        "-0x1.55d3c8p-6",
        "0x1.e1f506p-11",
        "-0x1.a6d1f2p-16",
        "0x1.f9d38ap-22",
    )
)  # C0 .. C12

SEED_LIMIT = 1 << 64
_MASK32 = 0xFFFFFFFF


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key of a seed in [0, 2**64): its low and high 32-bit halves."""
    return seed & _MASK32, seed >> 32


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors that hold uint32 values (torch has no general uint32 math).
# ----------------------------------------------------------------------------------------------
def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m, a a tensor of uint32 values, m a uint32 constant.

    m is split in 16-bit halves so that no intermediate leaves int64's range.
    """
    m_lo, m_hi = m & 0xFFFF, m >> 16
    t_lo = a * m_lo  # < 2**48
    t_hi = a * m_hi  # < 2**48
    low_sum = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2**49
    lo = low_sum & _MASK32
    hi = (t_hi >> 16) + (low_sum >> 32)
    return hi & _MASK32, lo


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]):
    """Ten Philox4x32 rounds; returns the four output words as int64 tensors of uint32 values."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


# ----------------------------------------------------------------------------------------------
# Float part: every line is one correctly rounded float32 operation.
# ----------------------------------------------------------------------------------------------
def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _uniform_open(word: torch.Tensor) -> torch.Tensor:
    """((word >> 9) + 0.5) * 2**-23: exact, strictly inside (0, 1)."""
    k = (word >> 9).to(torch.float32)  # < 2**23, exact
    return (k + 0.5) * TWO_POW_M23


def _log(u: torch.Tensor) -> torch.Tensor:
    """Natural log of u in (0, 1) with only + - * /: exponent split, then the atanh series."""
    bits = u.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # in [1, 2)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e).to(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = _f32(LOG_COEFFS[-1])
    for c in reversed(LOG_COEFFS[:-1]):
        p = p * s2 + c
    p = p * s2 + 1.0
    log_m = (s + s) * p
    return e * LN2 + log_m


def _sincos_quarter(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of pi/2 * f for f in (0, 1)."""
    f2 = f * f
    s = _f32(SIN_COEFFS[-1])
    for c in reversed(SIN_COEFFS[:-1]):
        s = s * f2 + c
    s = s * f
    c_ = _f32(COS_COEFFS[-1])
    for c in reversed(COS_COEFFS[:-1]):
        c_ = c_ * f2 + c
    return s, c_


def _box_muller(radius_word: torch.Tensor, angle_word: torch.Tensor):
    """Two normals from two words: r*cos(theta), r*sin(theta)."""
    u = _uniform_open(radius_word)
    # torch.sqrt on CPU float32 is NOT correctly rounded (torch 2.13 CPU wheel: ~17% of the 2**23
    # possible radii off by 1 ulp). The float64 sqrt rounded to float32 is (53 >= 2*24 + 2 bits),
    # checked exhaustively over all radius words against numpy's float32 sqrt.
    r = torch.sqrt((_log(u) * -2.0).double()).float()
    quadrant = angle_word >> 30
    f = (((angle_word >> 7) & 0x7FFFFF).to(torch.float32) + 0.5) * TWO_POW_M23
    s, c = _sincos_quarter(f)
    # rotate (cos, sin) of the angle inside its quadrant by quadrant * 90 degrees
    cos_t = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s, torch.where(quadrant == 2, -c, s)))
    sin_t = torch.where(quadrant == 0, s, torch.where(quadrant == 1, c, torch.where(quadrant == 2, -s, -c)))
    return r * cos_t, r * sin_t


def _check_coordinates(seed: int, numel: int, offset: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if numel < 0 or offset < 0 or offset + numel > SEED_LIMIT:
        raise ValueError(f"coordinates offset={offset}, numel={numel} must lie in [0, 2**64)")


def _philox_words(seed: int, first: int, last: int) -> tuple[torch.Tensor, ...]:
    """The four Philox output words ``x0..x3`` of counters ``n = first .. last`` under key ``seed``,
    one tensor each."""
    n = torch.arange(last - first + 1, dtype=torch.int64)
    # counters above 2**63 do not fit int64: add the base in 32-bit halves
    lo = n + (first & _MASK32)
    c0 = lo & _MASK32
    c1 = ((lo >> 32) + (first >> 32)) & _MASK32
    zero = torch.zeros_like(c0)
    return philox4x32_10((c0, c1, zero, zero), split_seed(seed))


def randn_reference(seed: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Coordinates ``offset .. offset+numel-1`` of the direction ``z(seed)``, float32, on CPU."""
    _check_coordinates(seed, numel, offset)
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    first, last = offset // 4, (offset + numel - 1) // 4
    x0, x1, x2, x3 = _philox_words(seed, first, last)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    z = torch.stack((z0, z1, z2, z3), dim=1).reshape(-1)
    start = offset - 4 * first
    return z[start : start + numel].clone()


# ----------------------------------------------------------------------------------------------
# Direction families. "gaussian" is z above. The others are defined from the same Philox stream
# (same key, counter words (n_lo, n_hi, 0, 0)); a run uses one family, so sharing the stream
# between families does not matter.
# ----------------------------------------------------------------------------------------------
# Each family's name, integer code and bounds are its entry in hosl/directions/families.py.
RADEMACHER_COORDS_PER_COUNTER = 128  # one bit per coordinate: 4 words x 32 bits


def rademacher_reference(seed: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Coordinates ``offset .. offset+numel-1`` of the Rademacher direction, float32 +1.0 / -1.0.

    Coordinate ``i`` uses Philox counter ``n = i // 128`` and bit ``b = i % 128`` of its output:
    bit ``b % 32`` (least significant first) of word ``x_{b // 32}``. A 0 bit gives +1.0, a 1 bit
    -1.0. ``scale * z`` is then exactly ``+-scale``, so the float formulas of the ops are unchanged.
    """
    _check_coordinates(seed, numel, offset)
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    per = RADEMACHER_COORDS_PER_COUNTER
    first, last = offset // per, (offset + numel - 1) // per
    words = torch.stack(_philox_words(seed, first, last), dim=1)  # [counters, 4]
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int64)) & 1  # [counters, 4, 32]
    z = (1 - 2 * bits).to(torch.float32).reshape(-1)
    start = offset - per * first
    return z[start : start + numel].clone()


# Sphere: the Gaussian direction with each tensor's slice rescaled to norm sqrt(numel). The norm
# must not depend on summation order (backends reduce in different orders), so it is summed in
# integer fixed point: each z^2 (one float32 multiply) is truncated to a multiple of 2**-24. As
# |z| < 5.77, z^2 < 34 and each term z^2 * 2**24 < 2**30 is an exact int32; their int64 sum is
# exact and order-free for tensors of up to 2**33 elements.
SPHERE_FRACTION_BITS = 24
SPHERE_MAX_NUMEL = 1 << 33


def sphere_sq_norm(z: torch.Tensor) -> int:
    """``sum_i floor(float32(z_i * z_i) * 2**24)`` as a Python int (the fixed-point ``|z|^2 * 2**24``)."""
    z2 = z.float() * z.float()  # float32, correctly rounded
    fixed = (z2 * float(1 << SPHERE_FRACTION_BITS)).to(torch.int64)  # power of two: exact; truncates
    return int(fixed.sum())


def sphere_scale(numel: int, sq_norm: int) -> float:
    """The float32 factor that takes a tensor's Gaussian slice to norm ``sqrt(numel)``.

    ``float32(sqrt(numel / (float64(sq_norm) * 2**-24)))`` with float64 division and square root,
    rounded to float32 once. A slice whose fixed-point norm is 0 (only possible for tiny slices:
    every ``|z| < 2**-12``) keeps factor 1.0 rather than being blown up from noise.
    """
    import math

    import numpy as np

    if sq_norm == 0:
        return 1.0
    return float(np.float32(math.sqrt(numel / math.ldexp(float(sq_norm), -SPHERE_FRACTION_BITS))))


def sphere_reference(seed: int, numel: int, offset: int = 0) -> torch.Tensor:
    """The sphere direction of ONE tensor holding coordinates ``offset .. offset+numel-1``:
    ``float32(s * z)`` with ``s = sphere_scale(numel, sphere_sq_norm(z))``."""
    z = randn_reference(seed, numel, offset)
    return _f32(sphere_scale(numel, sphere_sq_norm(z))) * z


# Low rank: a 2-D tensor (m x n) at offset o gets z = U V^T * c_R with U = gaussian(seed, m*R, o) as
# [m, R] and V = gaussian(v_seed, n*R, o + m*R) as [n, R] (v_seed = seed unless the U is kept over
# several steps: docs/directions.md, "lowrank"), summed over r = 0 .. R-1 in order in float32, each
# product and sum rounded on its own (no FMA), and c_R = float32(1/sqrt(R)) applied last. The U and
# V coordinates are the tensor's own, so (m + n) * R <= m * n. Other shapes keep the Gaussian z.
def lowrank_factor(rank: int) -> float:
    """``c_R = float32(1 / sqrt(R))``: the float64 value rounded once to float32."""
    import math

    import numpy as np

    return float(np.float32(1.0 / math.sqrt(rank)))


def lowrank_max_rank(shape) -> int:
    """The largest ``R`` with ``(m + n) * R <= m * n`` for a 2-D ``shape`` (0 when there is none)."""
    m, n = shape
    return (m * n) // (m + n)


def lowrank_outer_sum(u: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """``(sum_r u[:, r] v[:, r]^T) * c_R`` from ``u`` [m, R] and ``v`` [n, R] (float32), in the spec's
    order: ``acc = u_0 v_0``, then ``acc = acc + u_r v_r`` for r = 1 .. R-1 (each product and sum a
    separate correctly rounded float32 operation: torch's elementwise kernels on any device), then
    ``acc * c_R``. Every backend materialises ``z`` with this function."""
    acc = u[:, 0:1] * v[None, :, 0]
    for r in range(1, rank):
        acc = acc + u[:, r : r + 1] * v[None, :, r]
    return acc * lowrank_factor(rank)


def lowrank_reference(seed: int, shape, offset: int, rank: int, u_seed: int | None = None) -> torch.Tensor:
    """The low-rank direction of ONE tensor of ``shape`` placed at ``offset``, float32, shaped.

    A 2-D shape ``(m, n)`` with ``(m + n) * rank <= m * n``: ``U V^T * c_R`` as above, ``U`` from
    ``u_seed`` (default: ``seed``) and ``V`` from ``seed``; any other shape: the Gaussian ``z``.
    """
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    if len(shape) != 2:
        return randn_reference(seed, numel, offset).view(shape)
    m, n = shape
    if rank < 1 or rank > lowrank_max_rank(shape):
        raise ValueError(f"rank must be in [1, {lowrank_max_rank(shape)}] for a {m} x {n} tensor, got {rank}")
    u = randn_reference(seed if u_seed is None else u_seed, m * rank, offset).view(m, rank)
    v = randn_reference(seed, n * rank, offset + m * rank).view(n, rank)
    return lowrank_outer_sum(u, v, rank)
