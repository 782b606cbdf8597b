"""The CPU's generic family path gives the same bits as the SIMD paths and the spec.

A family defined only in csrc/hosl_direction.h (``direction4<Family::k...>``) runs on the CPU through
the generic tile path of csrc/cpu/direction_cpu.cpp (direction4 per group of 4 coordinates, scalar).
``hosl._C.force_generic(True)`` sends the existing families down that path too, so that it can be
checked against their SIMD paths and the spec reference, bit for bit, for every op.
"""

from __future__ import annotations

import pytest
import torch

from hosl.directions import families, spec
from hosl.ops.backends import reference

cpu = pytest.importorskip("hosl.ops.backends.cpu")
if not cpu.is_available():  # pragma: no cover - only without a build
    pytest.skip(f"CPU backend not built: {cpu.unavailable_reason()}", allow_module_level=True)
from hosl import _C  # noqa: E402

FAMILIES = list(families.FAMILY_CODES)  # the families with kernels (a shaped family has none)
SEED = 0x0123456789ABCDEF
KEY = spec.split_seed(SEED)
# (numel, offset): unaligned ends, a partial 128-coordinate Rademacher counter, several tiles and
# chunks of the CPU layout (1024 / 16384 coordinates), and coordinates near 2**64.
CASES = [(1, 0), (5, 3), (131, 125), (4099, 1), (20000, 16380), (300, 2**64 - 300)]


def _isas():
    found, current = [], _C.isa()
    for name in ("avx512", "avx2", "scalar"):
        if _C.set_isa(name):
            found.append(name)
    _C.set_isa(current)
    return found


@pytest.fixture(params=_isas())
def isa(request):
    before = _C.isa()
    assert _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _run(generic: bool, fn):
    before = _C.force_generic(generic)
    try:
        return fn()
    finally:
        _C.force_generic(before)


def _factor(family: str, numel: int, offset: int) -> float:
    if family != "sphere":
        return 1.0
    return spec.sphere_scale(numel, spec.sphere_sq_norm(spec.randn_reference(SEED, numel, offset)))


def test_force_generic_returns_the_previous_setting():
    assert _C.force_generic(True) is False
    assert _C.force_generic(False) is True
    assert _C.force_generic(False) is False


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("numel,offset", CASES)
def test_randn_generic_equals_simd_and_spec(isa, family, numel, offset):
    factor = _factor(family, numel, offset)
    generic = _run(True, lambda: cpu.randn(*KEY, numel, offset, torch.device("cpu"), family, factor))
    simd = _run(False, lambda: cpu.randn(*KEY, numel, offset, torch.device("cpu"), family, factor))
    expected = families.direction_reference(family, SEED, numel, offset)
    assert _same_bits(generic, expected), f"generic path differs from spec ({family}, {numel}, {offset})"
    assert _same_bits(simd, expected), f"SIMD path differs from spec ({family}, {numel}, {offset})"


def _tensors(dtypes, numels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dt) for n, dt in zip(numels, dtypes)]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUMELS = [4099, 0, 130, 17000]
OFFSETS = [3, 5000, 5000, 5131]


def _dir_scales(family, seeds):
    if family != "sphere":
        return None
    return [_factor_for(seed, n, o) for seed in seeds for n, o in zip(NUMELS, OFFSETS)]


def _factor_for(seed, numel, offset):
    return spec.sphere_scale(numel, spec.sphere_sq_norm(spec.randn_reference(seed, numel, offset)))


@pytest.mark.parametrize("family", FAMILIES)
def test_perturb_generic_equals_simd_and_reference(isa, family):
    dtypes = [DTYPES[j % 3] for j in range(len(NUMELS))]
    scales = _dir_scales(family, [SEED])
    results = {}
    for name, fn in (("generic", lambda ts, os: _run(True, lambda: cpu.perturb(ts, os, OFFSETS, *KEY, 1e-3, family,
                                                                                 scales))),
                     ("simd", lambda ts, os: _run(False, lambda: cpu.perturb(ts, os, OFFSETS, *KEY, 1e-3, family,
                                                                              scales))),
                     ("reference", lambda ts, os: reference.perturb(ts, os, OFFSETS, *KEY, 1e-3, family, scales))):
        ins = _tensors(dtypes, NUMELS)
        outs = [torch.empty_like(t) for t in ins]
        fn(ins, outs)
        results[name] = outs
    for a, g, s in zip(results["reference"], results["generic"], results["simd"]):
        assert _same_bits(g, a), f"generic perturb differs from the reference ({family}, {a.dtype}, {a.numel()})"
        assert _same_bits(s, a), f"SIMD perturb differs from the reference ({family}, {a.dtype}, {a.numel()})"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_dirs", [1, 3])
def test_zo_update_generic_equals_simd_and_reference(isa, family, num_dirs):
    dtypes = [DTYPES[(j + 1) % 3] for j in range(len(NUMELS))]
    seeds = [SEED + 7 * q for q in range(num_dirs)]
    keys_lo = [spec.split_seed(s)[0] for s in seeds]
    keys_hi = [spec.split_seed(s)[1] for s in seeds]
    coeffs = [0.25 - 0.125 * q for q in range(num_dirs)]
    scales = _dir_scales(family, seeds)
    results = {}
    for name, fn in (("generic", lambda ts: _run(True, lambda: cpu.zo_update(ts, OFFSETS, keys_lo, keys_hi, coeffs,
                                                                               0.01, family, scales))),
                     ("simd", lambda ts: _run(False, lambda: cpu.zo_update(ts, OFFSETS, keys_lo, keys_hi, coeffs,
                                                                            0.01, family, scales))),
                     ("reference", lambda ts: reference.zo_update(ts, OFFSETS, keys_lo, keys_hi, coeffs, 0.01,
                                                                   family, scales))):
        ws = _tensors(dtypes, NUMELS, seed=2)
        fn(ws)
        results[name] = ws
    for a, g, s in zip(results["reference"], results["generic"], results["simd"]):
        assert _same_bits(g, a), f"generic zo_update differs from the reference ({family}, {a.dtype}, {a.numel()})"
        assert _same_bits(s, a), f"SIMD zo_update differs from the reference ({family}, {a.dtype}, {a.numel()})"


def test_sq_norms_generic_equals_simd_and_reference():
    args = (NUMELS, OFFSETS, *KEY, torch.device("cpu"))
    generic = [int(v) for v in _run(True, lambda: cpu.sq_norms(*args))]
    simd = [int(v) for v in _run(False, lambda: cpu.sq_norms(*args))]
    expected = [int(v) for v in reference.sq_norms(*args)]
    assert generic == expected
    assert simd == expected
