"""The C++ CPU backend (hosl._C) gives the reference backend's bits, for every op, dtype and SIMD variant.

Comparisons are on bit patterns (``view`` as an integer type), never ``allclose``. The reference
costs ~40 ns per element, so sizes stay in the 1e5 range.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hosl.directions import spec
from hosl.ops.backends import reference

cpu = pytest.importorskip("hosl.ops.backends.cpu")
if not cpu.is_available():  # pragma: no cover - only without a build
    pytest.skip(f"CPU backend not built: {cpu.unavailable_reason()}", allow_module_level=True)
from hosl import _C  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 5, 1023, 4099, 100003]  # none divisible by 4 or by any block size
SEEDS = [0, 2**64 - 1, 0x0123456789ABCDEF]
U64 = 2**64 - 1


def _isas():
    found = []
    current = _C.isa()
    for name in ("avx512", "avx2", "scalar"):
        if _C.set_isa(name):
            found.append(name)
    _C.set_isa(current)
    return found


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test under each SIMD variant this CPU supports, then restore the default."""
    before = _C.isa()
    assert _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = _bits(actual), _bits(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero().flatten()
        i = bad[0].item()
        raise AssertionError(
            f"{bad.numel()} of {a.numel()} elements differ; first at {i}: "
            f"{actual.flatten()[i].item()!r} vs expected {expected.flatten()[i].item()!r}"
        )


def _keys(seed: int):
    return spec.split_seed(seed)


def _offsets(tensors, base: int):
    out, pos = [], base
    for t in tensors:
        out.append(pos)
        pos += t.numel()
    return out


def _weights(sizes, dtype, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return [(torch.randn(n, generator=g) * 0.05).to(dtype) for n in sizes]


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# randn
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "numel,offset",
    [
        (1, 0),
        (3, 1),
        (5, 2**32 + 3),            # above 2**32, odd
        (1023, 2**34 - 5),         # counters cross the 2**32 wrap of the low counter word
        (4099, 7),
        (100003, 2**40 + 1),
        (17, U64 - 17 + 1),        # the very last coordinates of the 2**64 space
        (2050, 2**63 - 1025),
    ],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_matches_reference(isa, seed, numel, offset):
    lo, hi = _keys(seed)
    assert_same_bits(cpu.randn(lo, hi, numel, offset, "cpu"), reference.randn(lo, hi, numel, offset, "cpu"))


def test_randn_empty():
    assert cpu.randn(1, 2, 0, 5, "cpu").shape == (0,)


# ------------------------------------------------------------------------------------------------
# perturb
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [0, 2**32 + 1, 2**34 - 3])
def test_perturb_in_place_and_into_out(isa, dtype, base):
    seed, scale = SEEDS[(base + DTYPES.index(dtype)) % 3], _f32(-1e-3)
    lo, hi = _keys(seed)
    tensors = _weights(SIZES, dtype)
    offsets = _offsets(tensors, base)
    original = [t.clone() for t in tensors]

    expected = [torch.empty_like(t) for t in tensors]
    reference.perturb(tensors, expected, offsets, lo, hi, scale)

    outs = [torch.full_like(t, float("nan")) for t in tensors]
    cpu.perturb(tensors, outs, offsets, lo, hi, scale)
    for t, o, e in zip(tensors, outs, expected):
        assert_same_bits(o, e)
    for t, t0 in zip(tensors, original):  # into `out`: weights untouched
        assert_same_bits(t, t0)

    cpu.perturb(tensors, tensors, offsets, lo, hi, scale)
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


def test_perturb_many_tensors_mixed_dtypes(isa):
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 3000, (50,), generator=g).tolist()
    tensors = [
        (torch.randn(n, generator=g) * 0.1).to(DTYPES[j % 3]).reshape(-1, 1) if n % 2 else
        (torch.randn(n, generator=g) * 0.1).to(DTYPES[j % 3])
        for j, n in enumerate(sizes)
    ]
    offsets = _offsets(tensors, 2**33 + 5)
    lo, hi = _keys(2**64 - 1)
    scale = _f32(0.37)
    expected = [t.clone() for t in tensors]
    reference.perturb(expected, expected, offsets, lo, hi, scale)
    cpu.perturb(tensors, tensors, offsets, lo, hi, scale)
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturb_rounding_edges(isa, dtype):
    """Overflow to inf, subnormals, signed zeros and infinities round exactly as torch's casts do."""
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.tiny / 8, info.smallest_normal / 3,
         float("inf"), float("-inf"), 1.0, -2.5, 1e-6, -3e-7],
        dtype=torch.float32,
    ).to(dtype)
    tensors = [specials.repeat(300)]
    lo, hi = _keys(11)
    for scale in (_f32(1e-3), _f32(5e3), _f32(1e-6), _f32(-65504.0)):
        expected = [torch.empty_like(tensors[0])]
        reference.perturb(tensors, expected, [9], lo, hi, scale)
        out = [torch.empty_like(tensors[0])]
        cpu.perturb(tensors, out, [9], lo, hi, scale)
        assert_same_bits(out[0], expected[0])


def test_perturb_nan_stays_nan(isa):
    for dtype in DTYPES:
        w = torch.tensor([float("nan"), -float("nan"), 1.0], dtype=dtype)
        out = torch.empty_like(w)
        cpu.perturb([w], [out], [0], 1, 2, _f32(0.5))
        assert torch.isnan(out[:2]).all() and not torch.isnan(out[2])


def test_perturb_empty_tensor_in_list():
    tensors = [torch.zeros(0), torch.ones(5), torch.zeros(0, 3), torch.ones(6)]
    offsets = _offsets(tensors, 3)
    expected = [t.clone() for t in tensors]
    reference.perturb(expected, expected, offsets, 1, 0, 1.0)
    cpu.perturb(tensors, tensors, offsets, 1, 0, 1.0)
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


# ------------------------------------------------------------------------------------------------
# zo_update
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_dirs,decay", [(1, 0.0), (10, 0.0), (10, 1e-6 * 0.01), (3, 0.25)])
def test_zo_update_matches_reference(isa, dtype, num_dirs, decay):
    g = torch.Generator().manual_seed(num_dirs)
    seeds = [0, 2**64 - 1] + torch.randint(0, 2**62, (num_dirs,), generator=g).tolist()
    seeds = seeds[:num_dirs]
    keys = [_keys(s) for s in seeds]
    coeffs = [_f32(c) for c in (torch.randn(num_dirs, generator=g) * 1e-3).tolist()]
    decay = _f32(decay)
    sizes = [1, 3, 5, 1023, 4099, 20011] if num_dirs > 1 else SIZES
    tensors = _weights(sizes, dtype, gen_seed=num_dirs)
    offsets = _offsets(tensors, 2**32 + 3)
    expected = [t.clone() for t in tensors]
    reference.zo_update(expected, offsets, [k[0] for k in keys], [k[1] for k in keys], coeffs, decay)
    cpu.zo_update(tensors, offsets, [k[0] for k in keys], [k[1] for k in keys], coeffs, decay)
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


def test_zo_update_decay_only():
    tensors = _weights([7, 1030], torch.bfloat16) + _weights([9], torch.float32)
    offsets = _offsets(tensors, 0)
    expected = [t.clone() for t in tensors]
    reference.zo_update(expected, offsets, [], [], [], _f32(0.01))
    cpu.zo_update(tensors, offsets, [], [], [], _f32(0.01))
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


def test_zo_update_many_tensors(isa):
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 2000, (50,), generator=g).tolist()
    tensors = [(torch.randn(n, generator=g) * 0.1).to(DTYPES[j % 3]) for j, n in enumerate(sizes)]
    offsets = _offsets(tensors, 12345)
    seeds = list(range(2**64 - 4, 2**64)) + [1, 2]
    keys = [_keys(s) for s in seeds]
    coeffs = [_f32(c) for c in (0.1, -0.2, 0.3, -0.4, 0.5, -0.6)]
    expected = [t.clone() for t in tensors]
    reference.zo_update(expected, offsets, [k[0] for k in keys], [k[1] for k in keys], coeffs, _f32(1e-4))
    cpu.zo_update(tensors, offsets, [k[0] for k in keys], [k[1] for k in keys], coeffs, _f32(1e-4))
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


# ------------------------------------------------------------------------------------------------
# threads, variants, public API, header constants
# ------------------------------------------------------------------------------------------------
def test_threaded_equals_single_threaded():
    before = torch.get_num_threads()
    sizes = [300007, 5, 70001, 129]
    lo, hi = _keys(99)
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            z = cpu.randn(lo, hi, 500003, 2**35 + 1, "cpu")
            ws = _weights(sizes, torch.bfloat16) + _weights(sizes, torch.float32)
            offsets = _offsets(ws, 77)
            outs = [torch.empty_like(w) for w in ws]
            cpu.perturb(ws, outs, offsets, lo, hi, _f32(1e-3))
            cpu.zo_update(ws, offsets, [lo, 3], [hi, 4], [_f32(1e-3), _f32(-2e-3)], _f32(1e-5))
            results[threads] = [z] + outs + ws
    finally:
        torch.set_num_threads(before)
    for threads in (2, 4):
        for a, b in zip(results[threads], results[1]):
            assert_same_bits(a, b)


def test_simd_variants_agree_on_a_large_draw():
    """Beyond the reference-checked sizes: every variant gives the same bits on 2M coordinates."""
    before = _C.isa()
    draws = {}
    try:
        for name in ISAS:
            _C.set_isa(name)
            draws[name] = cpu.randn(7, 8, 2_000_003, 2**36 + 2, "cpu")
    finally:
        _C.set_isa(before)
    for name in ISAS[1:]:
        assert_same_bits(draws[name], draws[ISAS[0]])


def test_public_api_uses_cpu_backend():
    ops = pytest.importorskip("hosl.ops")
    tensors = _weights([1023, 5], torch.float16)
    expected = [t.clone() for t in tensors]
    ops.perturb_(expected, 2**64 - 1, 1e-3, offset=3, backend="reference")
    ops.perturb_(tensors, 2**64 - 1, 1e-3, offset=3, backend="cpu")
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)
    ops.zo_update_(expected, [1, 2], [0.5, -0.25], lr=1e-3, weight_decay=0.1, backend="reference")
    ops.zo_update_(tensors, [1, 2], [0.5, -0.25], lr=1e-3, weight_decay=0.1, backend="cpu")
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


def test_header_constants_match_spec():
    header = (Path(__file__).resolve().parents[1] / "csrc" / "hosl_direction.h").read_text()

    def const(name):
        m = re.search(rf"constexpr \w+ {name} = (-?0x[0-9a-fA-F.p+-]+?)(u|f)?;", header)
        assert m, name
        text = m.group(1)
        return int(text, 16) if m.group(2) == "u" else float.fromhex(text)

    assert [const(n) for n in ("kPhiloxM0", "kPhiloxM1", "kPhiloxW0", "kPhiloxW1")] == [
        spec.PHILOX_M0, spec.PHILOX_M1, spec.PHILOX_W0, spec.PHILOX_W1]
    assert (const("kLn2"), const("kSqrt2"), const("kTwoPowM23")) == (spec.LN2, spec.SQRT2, spec.TWO_POW_M23)
    assert tuple(const(f"kLogL{k}") for k in (3, 5, 7, 9)) == spec.LOG_COEFFS
    assert tuple(const(f"kSinS{k}") for k in (1, 3, 5, 7, 9, 11, 13)) == spec.SIN_COEFFS
    assert tuple(const(f"kCosC{k}") for k in (0, 2, 4, 6, 8, 10, 12)) == spec.COS_COEFFS
