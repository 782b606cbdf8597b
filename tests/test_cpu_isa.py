"""Each SIMD variant of the C++ CPU kernels (hosl._C: avx512, avx2, scalar), forced with set_isa,
gives the spec's bits for every family and op.

The variants are one template compiled under different GCC target attributes, so a difference
between them is a vectorisation bug (a fused multiply-add, a reordered reduction, a wrong tail).
The windows below start and end off every width that matters: the 8-float AVX2 and 16-float
AVX-512 vectors, the 4 coordinates of a Gaussian Philox counter, the 16-counter SIMD Philox fill,
Rademacher's 128 coordinates per counter, the 1024-coordinate tile and the 16384-coordinate chunk.
A variant the CPU lacks is skipped with the reason (avx512 on an AVX2-only machine).

Also checked: which variants load follows the CPU's flags, and the AVX2 build of the Box-Muller
loop really is 8-wide (it ran scalar until the log's halving was made an integer op, see
csrc/hosl_direction.h log_open).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import hosl.ops as ops

cpu = pytest.importorskip("hosl.ops.backends.cpu")
if not cpu.is_available():
    pytest.skip(cpu.unavailable_reason(), allow_module_level=True)
from hosl import _C  # noqa: E402

FAMILIES = ["gaussian", "rademacher", "sphere"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the CPU flags (/proc/cpuinfo) each variant needs; has_avx2 / has_avx512 in csrc/cpu/direction_cpu.cpp
REQUIRED_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2"},
    "avx2": {"avx2"},
    "scalar": set(),
}
# (numel, offset): tails and starts that are not multiples of any vector, counter, tile or chunk
WINDOWS = [
    (1, 0), (3, 5), (7, 1), (9, 2**32 - 3), (17, 127), (33, 6), (130, 126), (1000, 3), (1023, 1),
    (1025, 4093), (4099, 2**63 - 4099 - 2001), (16384 + 37, 16384 - 19), (20013, 2**40 + 9),
]
SIZES = [1, 3, 13, 130, 1025, 4099, 17001]  # one tensor list, consecutive coordinates
SEEDS = [0, 2**64 - 1, 0x0123456789ABCDEF]


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return None


@pytest.fixture(params=list(REQUIRED_FLAGS))
def forced_isa(request):
    """Force one SIMD variant for the test (skip when the CPU lacks it), then restore the default."""
    name, before = request.param, _C.isa()
    if not _C.set_isa(name):
        pytest.skip(f"this CPU lacks {name} (needs {', '.join(sorted(REQUIRED_FLAGS[name]))})")
    assert _C.isa() == name
    yield name
    _C.set_isa(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    diff = _bits(got) != _bits(want)
    if diff.any():
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at {i}: "
                             f"{got[i].item()!r} vs {want[i].item()!r}")


def _weights(dtype, gen_seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(gen_seed)
    return [(torch.randn(n, generator=g) * 0.05).to(dtype) for n in SIZES]


# ================================================================================ which variant runs
def test_supported_variants_follow_the_cpu_flags():
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    before = _C.isa()
    try:
        for name, needs in REQUIRED_FLAGS.items():
            assert _C.set_isa(name) == needs.issubset(flags), name
    finally:
        _C.set_isa(before)
    assert cpu.supported_isas() == [n for n, needs in REQUIRED_FLAGS.items() if needs.issubset(flags)]
    assert _C.isa() == before  # supported_isas leaves the variant in use alone


def test_unknown_or_unsupported_variant_is_refused_and_changes_nothing():
    before = _C.isa()
    assert not _C.set_isa("avx1024")
    assert _C.isa() == before
    for name in REQUIRED_FLAGS:
        if name not in cpu.supported_isas():
            assert not _C.set_isa(name)
            assert _C.isa() == before


@pytest.mark.skipif(bool(os.environ.get("HOSL_CPU_ISA")), reason="HOSL_CPU_ISA lowers the default on purpose")
def test_default_variant_is_the_best_the_cpu_supports():
    # a fresh interpreter: other tests in this process may have switched variants
    code = "from hosl import _C; print(_C.isa())"
    env = {k: v for k, v in os.environ.items() if k != "HOSL_CPU_ISA"}
    loaded = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert loaded.stdout.strip() == cpu.supported_isas()[0]


def test_info_names_the_isa_in_use(capsys):
    from hosl.cli import main

    before = _C.isa()
    try:
        for name in cpu.supported_isas():
            _C.set_isa(name)
            assert main(["info"]) == 0
            line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cpu kernels:")]
            assert line == [f"cpu kernels: ISA {name} (this CPU supports: {', '.join(cpu.supported_isas())}) "
                            f"on {cpu.cpu_model()}"]
    finally:
        _C.set_isa(before)


# ================================================================================ bits, per variant
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("numel,offset", WINDOWS)
def test_randn_matches_reference(forced_isa, family, numel, offset):
    seed = SEEDS[(numel + offset) % len(SEEDS)]
    got = ops.randn(seed, numel, offset, family=family, backend="cpu")
    want = ops.randn(seed, numel, offset, family=family, backend="reference")
    assert got.shape == (numel,)
    assert_same_bits(got, want, f"{forced_isa} {family} randn numel={numel} offset={offset}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 5, 2**34 - 3])
def test_perturb_matches_reference(forced_isa, family, dtype, offset):
    seed, scale = SEEDS[offset % len(SEEDS)], -1e-3
    ws, want = _weights(dtype, 1), _weights(dtype, 1)
    ops.perturb_(ws, seed, scale, offset=offset, family=family, backend="cpu")
    ops.perturb_(want, seed, scale, offset=offset, family=family, backend="reference")
    for j, (w, e) in enumerate(zip(ws, want)):
        assert_same_bits(w, e, f"{forced_isa} {family} {dtype} perturb tensor {j} (numel {w.numel()})")
    # the direction changed every weight it touched (a no-op kernel would pass the comparison
    # only if the reference were a no-op too)
    assert not any(torch.equal(w, w0) for w, w0 in zip(ws, _weights(dtype, 1)) if w.numel() > 16)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_dirs", [1, 3, 10])
def test_zo_update_matches_reference(forced_isa, family, num_dirs):
    """The fused update: all Q directions applied to one float32 accumulator per tile."""
    seeds = [SEEDS[q % len(SEEDS)] ^ (977 * q) for q in range(num_dirs)]
    coeffs = [(-1) ** q * (q + 1) * 0.25 for q in range(num_dirs)]
    for dtype in DTYPES:
        ws, want = _weights(dtype, num_dirs), _weights(dtype, num_dirs)
        for backend, tensors in (("cpu", ws), ("reference", want)):
            ops.zo_update_(tensors, seeds, coeffs, lr=1e-2, weight_decay=0.1, offset=2**33 + 7, family=family,
                           backend=backend)
        for j, (w, e) in enumerate(zip(ws, want)):
            assert_same_bits(w, e, f"{forced_isa} {family} {dtype} Q={num_dirs} tensor {j} (numel {w.numel()})")


# ================================================================================ the AVX2 build is SIMD
def _disassembly(function: str) -> str:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                          text=True, check=True).stdout
    body = re.search(rf"^[0-9a-f]+ <[^>]*::{function}\(.*?>:\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    if body is None:
        pytest.skip(f"{function} not in the symbol table of {_C.__file__} (stripped build?)")
    return body.group(1)


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86 SIMD variants only")
def test_avx2_variant_runs_box_muller_eight_wide():
    """The AVX2 instantiation's Box-Muller (its divide for the log's s = (m-1)/(m+1) and its square
    root of -2 log u) uses 8-float ymm instructions. Before the fix, a conditional float multiply
    in log_open (GCC will not if-convert it without AVX-512 masking) kept the whole loop scalar:
    no vsqrtps / vdivps at all in run_chunk_avx2."""
    body = _disassembly("run_chunk_avx2")
    assert re.search(r"\bvsqrtps\s+%ymm", body), "no 8-wide square root in run_chunk_avx2"
    assert re.search(r"\bvdivps\s+%ymm", body), "no 8-wide divide in run_chunk_avx2"
    assert not re.search(r"\bvfn?m(add|sub)", body), "a fused multiply-add in run_chunk_avx2 (spec forbids)"
