"""Direction families (``family=`` "gaussian" | "rademacher" | "sphere"): the spec's definitions and
statistics, bit-identity of every backend here against the reference, and the API's checks.

Equality is on bit patterns. The Triton backend runs under the interpreter on machines without a
GPU (~18 ms per program of 4096 elements), so sizes stay within a few programs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import hosl.ops as ops
from hosl.directions import families, spec
from hosl.ops.backends import reference as ref

ROOT = Path(__file__).resolve().parents[1]
FAST_BACKENDS = [b for b in ops.available_backends() if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [0, 2**64 - 1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    diff = (_bits(got) != _bits(want)).reshape(-1)
    if diff.any():
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at {i}: "
                             f"{got.reshape(-1)[i].item()!r} vs {want.reshape(-1)[i].item()!r}")


def _weights(sizes, dtype, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return [(torch.randn(n, generator=g) * 0.05).to(dtype) for n in sizes]


def _f32(x: float) -> float:
    return float(np.float32(x))


# ================================================================================ the spec
def test_rademacher_bit_layout_is_the_documented_one():
    """Coordinate 128n + 32w + j is bit j of Philox word x_w of counter n; a 1 bit gives -1."""
    seed, n = 0x0123456789ABCDEF, 2**33 + 5
    c = tuple(torch.tensor([v], dtype=torch.int64) for v in (n & 0xFFFFFFFF, n >> 32, 0, 0))
    words = [int(x) for x in spec.philox4x32_10(c, spec.split_seed(seed))]
    z = spec.rademacher_reference(seed, 128, 128 * n)
    expected = [-1.0 if (words[i // 32] >> (i % 32)) & 1 else 1.0 for i in range(128)]
    assert z.tolist() == expected
    # a window that starts and ends mid-counter is the slice of a longer draw
    long = spec.rademacher_reference(seed, 1000, 128 * n - 300)
    assert torch.equal(spec.rademacher_reference(seed, 333, 128 * n - 17), long[283:283 + 333])


@pytest.mark.parametrize("seed", SEEDS + [12345])
def test_rademacher_values_balance_and_independence(seed):
    n = 1 << 20
    z = spec.rademacher_reference(seed, n, 2**40 + 3)
    assert set(torch.unique(z).tolist()) == {-1.0, 1.0}
    # balanced: the sum of n fair signs has standard deviation sqrt(n) = 1024
    assert abs(float(z.sum())) < 5 * math.sqrt(n)
    # neighbouring coordinates (same word, next word, next counter) are uncorrelated
    for lag in (1, 31, 32, 127, 128):
        corr = float((z[:-lag] * z[lag:]).mean())
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)
    # and so are neighbouring seeds
    other = spec.rademacher_reference((seed + 1) % 2**64, n, 2**40 + 3)
    assert abs(float((z * other).mean())) < 5 / math.sqrt(n)


def test_sphere_spec_norm_scale_and_direction():
    seed = 2**64 - 1
    for numel, offset in [(1000, 0), (4099, 2**32 + 1), (7, 2**62)]:
        g = spec.randn_reference(seed, numel, offset)
        s = spec.sphere_reference(seed, numel, offset)
        # a rescaled Gaussian: one float32 factor times z
        factor = spec.sphere_scale(numel, spec.sphere_sq_norm(g))
        assert torch.equal(s, torch.tensor(factor, dtype=torch.float32) * g)
        assert math.isclose(float(s.double().norm()), math.sqrt(numel), rel_tol=2e-6)
    # the fixed-point norm is exact: floor(z^2 * 2^24) summed as integers, whatever the order
    g = spec.randn_reference(3, 5000, 11)
    fixed = [math.floor(float(np.float32(v) * np.float32(v)) * 2**24) for v in g.tolist()]
    assert spec.sphere_sq_norm(g) == sum(fixed) == spec.sphere_sq_norm(g.flip(0))
    # the degenerate slice whose norm rounds to 0 keeps factor 1
    assert spec.sphere_scale(1, 0) == 1.0
    assert spec.sphere_scale(4, 4 << 24) == 1.0


def test_direction_reference_names_families():
    assert torch.equal(families.direction_reference("gaussian", 5, 10, 3), spec.randn_reference(5, 10, 3))
    with pytest.raises(ValueError, match="family"):
        families.direction_reference("uniform", 5, 10)


def test_constants_agree_across_spec_header_and_kernels():
    header = (ROOT / "csrc" / "hosl_direction.h").read_text()
    assert re.search(r"kSphereFixedOne = 0x1p\+24f", header) and spec.SPHERE_FRACTION_BITS == 24
    assert re.search(r"kRademacherShift = 7;", header) and spec.RADEMACHER_COORDS_PER_COUNTER == 128
    pytest.importorskip("triton")
    import importlib

    kr = importlib.import_module("hosl.kernels.randn")  # the package attribute is the launcher

    assert kr.SPHERE_FIXED_ONE.value == 2.0**spec.SPHERE_FRACTION_BITS


# ================================================================================ backends
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("family", ["rademacher", "sphere"])
def test_randn_matches_reference(backend, family):
    for seed in SEEDS:
        for numel, offset in [(1, 0), (5, 2**32 + 3), (129, 127), (5000, 2**40 + 1), (300, 2**63 - 300)]:
            want = ops.randn(seed, numel, offset, family=family, backend="reference")
            got = ops.randn(seed, numel, offset, family=family, backend=backend)
            assert_same_bits(got, want, f"{backend} {family} seed={seed} numel={numel} offset={offset}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_sphere_norms_match_reference(backend):
    numels, offsets = [5000, 0, 7, 300, 1], [3, 0, 2**40, 2**63 - 300, 2**32 - 1]
    for seed in SEEDS:
        key = spec.split_seed(seed)
        want = ref.sq_norms(numels, offsets, *key, "cpu")
        assert want[1] == 0 and all(w > 0 for w in want[:1] + want[2:4])
        module = __import__(f"hosl.ops.backends.{backend}", fromlist=["sq_norms"])
        assert module.sq_norms(numels, offsets, *key, "cpu") == want


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("family", ["rademacher", "sphere"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_and_update_match_reference(backend, family, dtype):
    """Many tensors of odd sizes (one empty), placed above 2**32, both extreme seeds."""
    sizes = [1, 3, 0, 130, 1023, 2050]
    base = 2**32 + 1 + DTYPES.index(dtype)
    for seed in SEEDS:
        ws = _weights(sizes, dtype, gen_seed=seed % 7)
        want = [w.clone() for w in ws]
        outs = [torch.full_like(w, float("nan")) for w in ws]
        ops.perturb_(ws, seed, 1e-3, out=outs, offset=base, family=family, backend=backend)
        ops.perturb_(want, seed, 1e-3, offset=base, family=family, backend="reference")
        for j, (o, e) in enumerate(zip(outs, want)):
            assert_same_bits(o, e, f"perturb out {backend} {family} {dtype} tensor {j}")
        ops.perturb_(ws, seed, 1e-3, offset=base, family=family, backend=backend)
        for j, (w, e) in enumerate(zip(ws, want)):
            assert_same_bits(w, e, f"perturb {backend} {family} {dtype} tensor {j}")

        seeds, coeffs = [seed, 7, 2**63 + 1], [1.5, -0.25, 3.0]
        ops.zo_update_(ws, seeds, coeffs, lr=0.01, weight_decay=0.1, offset=base, family=family, backend=backend)
        ops.zo_update_(want, seeds, coeffs, lr=0.01, weight_decay=0.1, offset=base, family=family,
                       backend="reference")
        for j, (w, e) in enumerate(zip(ws, want)):
            assert_same_bits(w, e, f"zo_update {backend} {family} {dtype} tensor {j}")


@pytest.mark.slow
def test_cpu_rademacher_update_many_directions_and_tiles():
    """The C++ Rademacher update takes directions in batches of 16 and reuses Philox words across
    tiles: Q = 1, 16, 17 and 40 over tensors spanning several tiles and chunks, every SIMD variant."""
    cpu = pytest.importorskip("hosl.ops.backends.cpu")
    if not cpu.is_available():
        pytest.skip(cpu.unavailable_reason())
    from hosl import _C

    before = _C.isa()
    sizes = [70001, 5, 2049, 16385]
    try:
        for isa in ("avx512", "avx2", "scalar"):
            if not _C.set_isa(isa):
                continue
            for q_count in (1, 16, 17, 40):
                ws = _weights(sizes, torch.float32, gen_seed=q_count)
                want = [w.clone() for w in ws]
                seeds = [(2**64 - 1 - 977 * q) for q in range(q_count)]
                coeffs = [(-1) ** q * (q + 1) * 0.1 for q in range(q_count)]
                ops.zo_update_(ws, seeds, coeffs, lr=0.01, offset=2**34 - 77, family="rademacher", backend="cpu")
                ops.zo_update_(want, seeds, coeffs, lr=0.01, offset=2**34 - 77, family="rademacher",
                               backend="reference")
                for j, (w, e) in enumerate(zip(ws, want)):
                    assert_same_bits(w, e, f"{isa} Q={q_count} tensor {j}")
    finally:
        _C.set_isa(before)


# ================================================================================ public API
def test_sphere_tensors_have_norm_sqrt_numel_each():
    ws = [torch.zeros(n) for n in (1000, 37, 4099, 2)]
    ops.perturb_(ws, 2**64 - 1, 1.0, offset=2**33, family="sphere")
    for w in ws:
        assert math.isclose(float(w.double().norm()), math.sqrt(w.numel()), rel_tol=2e-6), w.numel()
    # each tensor is its own Gaussian slice rescaled (per-tensor, not one global factor)
    z = ops.randn(2**64 - 1, sum(w.numel() for w in ws), 2**33)
    ratios = [float((w / z[s:s + w.numel()]).mean()) for w, s in zip(ws, [0, 1000, 1037, 5136])]
    assert len({round(r, 5) for r in ratios}) == 4


def test_rademacher_perturb_is_plus_minus_scale():
    w = torch.zeros(1000)
    ops.perturb_(w, 9, 0.125, family="rademacher")
    assert set(torch.unique(w).tolist()) == {-0.125, 0.125}
    assert torch.equal(w, 0.125 * ops.randn(9, 1000, family="rademacher"))


def test_sphere_scales_are_the_spec_and_can_be_passed_back():
    ws = _weights([100, 3, 5000], torch.bfloat16)
    scales = ops.sphere_scales(ws, 77, offset=5)
    want = [spec.sphere_scale(n, spec.sphere_sq_norm(spec.randn_reference(77, n, o)))
            for n, o in zip([100, 3, 5000], [5, 105, 108])]
    assert scales == want
    a, b = [w.clone() for w in ws], [w.clone() for w in ws]
    ops.perturb_(a, 77, 0.5, offset=5, family="sphere")
    ops.perturb_(b, 77, 0.5, offset=5, family="sphere", scales=scales)
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    # scales change the result: they are used, not recomputed
    c = [w.clone() for w in ws]
    ops.perturb_(c, 77, 0.5, offset=5, family="sphere", scales=[2.0 * s for s in scales])
    assert not torch.equal(_bits(c[2]), _bits(a[2]))
    # zo_update: one list per seed
    s2 = [scales, ops.sphere_scales(ws, 78, offset=5)]
    ops.zo_update_(a, [77, 78], [1.0, 2.0], lr=0.1, offset=5, family="sphere")
    ops.zo_update_(b, [77, 78], [1.0, 2.0], lr=0.1, offset=5, family="sphere", scales=s2)
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def test_gaussian_family_is_the_default():
    ws = _weights([5, 33], torch.float32)
    a, b = [w.clone() for w in ws], [w.clone() for w in ws]
    ops.perturb_(a, 3, 0.5)
    ops.perturb_(b, 3, 0.5, family="gaussian")
    ops.zo_update_(a, [1, 2], [1.0, 2.0], lr=0.1)
    ops.zo_update_(b, [1, 2], [1.0, 2.0], lr=0.1, family="gaussian")
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    assert torch.equal(ops.randn(3, 10, family="gaussian"), ops.randn(3, 10))


def _rejected(exc, match, call, tensors):
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        call()
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(before, tensors)), "a rejected call wrote"


@pytest.mark.parametrize("bad,exc", [("uniform", ValueError), ("Gaussian", ValueError), (None, TypeError),
                                     (1, TypeError)])
def test_bad_family_rejected_and_nothing_written(bad, exc):
    ws = _weights([5, 33], torch.float32)
    out = [torch.zeros_like(w) for w in ws]
    match = "family"
    _rejected(exc, match, lambda: ops.perturb_(ws, 1, 0.5, family=bad), ws)
    _rejected(exc, match, lambda: ops.perturb_(ws, 1, 0.5, out=out, family=bad), ws + out)
    _rejected(exc, match, lambda: ops.zo_update_(ws, [1], [1.0], lr=0.1, family=bad), ws)
    with pytest.raises(exc, match=match):
        ops.randn(1, 10, family=bad)


def test_bad_scales_rejected_and_nothing_written():
    ws = _weights([5, 33], torch.float32)
    _rejected(ValueError, "only for family='sphere'", lambda: ops.perturb_(ws, 1, 0.5, scales=[1.0, 1.0]), ws)
    _rejected(ValueError, "only for family='sphere'",
              lambda: ops.zo_update_(ws, [1], [1.0], lr=0.1, family="rademacher", scales=[[1.0, 1.0]]), ws)
    _rejected(ValueError, "expected 2", lambda: ops.perturb_(ws, 1, 0.5, family="sphere", scales=[1.0]), ws)
    _rejected(ValueError, "finite", lambda: ops.perturb_(ws, 1, 0.5, family="sphere", scales=[1.0, math.inf]), ws)
    _rejected(ValueError, "one list per seed",
              lambda: ops.zo_update_(ws, [1, 2], [1.0, 1.0], lr=0.1, family="sphere", scales=[[1.0, 1.0]]), ws)


def test_family_ops_go_through_torch_library():
    """The schemas carry the family (default gaussian) and the sphere factors, never a backend."""
    schema = str(torch.ops.hosl.perturb.default._schema)
    assert 'str family="gaussian"' in schema and "float[]? dir_scales=None" in schema
    assert 'str family="gaussian"' in str(torch.ops.hosl.zo_update_.default._schema)
    assert 'str family="gaussian"' in str(torch.ops.hosl.randn.default._schema)
    for name in ("randn", "direction_sq_norms", "perturb", "zo_update_", "perturbed_linear", "perturbed_embedding"):
        assert "backend" not in str(getattr(torch.ops.hosl, name).default._schema), name
    with ops.use_backend("reference"):
        norms = torch.ops.hosl.direction_sq_norms([10, 0], [0, 0], 1, 0, torch.device("cpu"))
    assert norms.dtype == torch.int64 and norms.tolist() == ref.sq_norms([10, 0], [0, 0], 1, 0, "cpu")
