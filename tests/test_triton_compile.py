"""Every Triton kernel compiles ahead of time for a real GPU (sm_90) and its PTX keeps the spec's rules.

The interpreter runs code the real compiler would reject and cannot see how floats are lowered, so
this compiles each kernel listed by ``hosl.kernels.aot_specs()`` with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` -- no GPU needed, but ptxas must exist -- and reads the PTX.

Under ``TRITON_INTERPRET=1`` (set by conftest.py on machines without a GPU) ``@triton.jit`` gives
interpreted functions that cannot be compiled, so the compile runs in a child process without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import hosl.kernels.api as K

out = sys.argv[1]
target = GPUTarget("cuda", 90, 32)


def build(fn, signature, constexprs, options):
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                              options=options)
    return {"name": fn.__name__, "constexprs": constexprs, "ptx": compiled.asm["ptx"],
            "cubin_bytes": len(compiled.asm.get("cubin", b""))}


results = {"kernels": [build(fn, sig, cst, dict(K.COMPILE_OPTIONS)) for fn, sig, cst in K.aot_specs()]}
# the same kernel with fusion allowed: shows the PTX checks below can see an FMA when there is one
fn, sig, cst = [s for s in K.aot_specs() if s[0].__name__ == "perturb_kernel"][0]
results["fused_control"] = build(fn, sig, cst, dict(K.COMPILE_OPTIONS, enable_fp_fusion=True))

# every @triton.jit kernel (name ending in _kernel) defined in the package must be in aot_specs()
import importlib, pkgutil
from triton.runtime.jit import JITFunction
names = set()
import hosl.kernels
for mod in pkgutil.iter_modules(hosl.kernels.__path__):
    m = importlib.import_module("hosl.kernels." + mod.name)
    names |= {n for n, v in vars(m).items() if isinstance(v, JITFunction) and n.endswith("_kernel")}
results["all_kernels"] = sorted(names)
json.dump(results, open(out, "w"))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "ptx.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # really compile
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        if re.search(r"ptxas.*(not found|No such file)|Cannot find ptxas", proc.stderr):
            pytest.skip("ptxas is not available: cannot compile for a real GPU target")
        raise AssertionError(f"ahead-of-time compile failed:\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _instructions(ptx: str) -> list[str]:
    """Opcodes of the PTX body (predicates and operands stripped), e.g. ``mul.rn.f32``."""
    ops = []
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)\s", line)
        if m and not line.lstrip().startswith((".", "//")):
            ops.append(m.group(1))
    return ops


def _rademacher(kernel) -> bool:
    from hosl.directions.families import FAMILY_CODES

    return kernel["constexprs"].get("FAMILY") == FAMILY_CODES["rademacher"]


@pytest.mark.slow
def test_every_family_is_compiled(compiled):
    """Each direction family has AOT variants of randn, perturb and zo_update (and the sphere norm)."""
    from hosl.directions.families import FAMILY_CODES

    built = {(k["name"], k["constexprs"].get("FAMILY", 0)) for k in compiled["kernels"]}
    for name in ("randn_kernel", "perturb_kernel", "zo_update_kernel"):
        assert {(name, f) for f in FAMILY_CODES.values()} <= built, name
    assert ("sq_norm_kernel", 0) in built


def _f32_ops(ptx: str) -> list[str]:
    return [op for op in _instructions(ptx) if op.endswith(".f32")]


@pytest.mark.slow
def test_every_kernel_is_compiled(compiled):
    built = {k["name"] for k in compiled["kernels"]}
    assert built == set(compiled["all_kernels"]) and built >= {"randn_kernel", "perturb_kernel", "zo_update_kernel",
                                                              "perturbed_linear_kernel", "perturbed_embedding_kernel"}
    for k in compiled["kernels"]:
        assert k["cubin_bytes"] > 0, f"{k['name']}: ptxas produced no cubin"


def _dot_fmas(constexprs) -> int:
    """fma.rn.f32 that an fp32 "ieee" ``tl.dot`` (the bit-exact probes' precision) is made of: one per
    multiply-add of the [DB, BM, BK] x [DB, BK, BN] tile per thread (4 warps); 0 for every other kernel."""
    c = constexprs
    if c.get("PRECISION") != "ieee" or c.get("DTYPE") != 0:
        return 0
    return c["DB"] * c["BM"] * c["BN"] * c["BK"] // 128


@pytest.mark.slow
def test_ptx_has_no_fma(compiled):
    """No FMA anywhere, except exactly the multiply-adds of an fp32 "ieee" dot (its accumulation;
    the perturbed elements around it are still mul + add)."""
    for k in compiled["kernels"]:
        fma = [op for op in _instructions(k["ptx"]) if op.startswith("fma.")]
        dot = _dot_fmas(k["constexprs"])
        if dot:
            assert set(fma) == {"fma.rn.f32"} and len(fma) == dot, f"{k['name']} {k['constexprs']}: {len(fma)} fma"
            continue
        assert not fma, f"{k['name']} {k['constexprs']}: {sorted(set(fma))}"


@pytest.mark.slow
def test_check_sees_fma_when_fusion_is_allowed(compiled):
    """Control: the same kernel with enable_fp_fusion=True does contain fma.rn.f32."""
    assert "fma.rn.f32" in _instructions(compiled["fused_control"]["ptx"])


@pytest.mark.slow
def test_ptx_float_ops_are_correctly_rounded(compiled):
    """Every f32 add/sub/mul/div/sqrt carries ``.rn`` (explicit rounding: correctly rounded, and
    ptxas may not contract it into an FMA), nothing flushes subnormals (``.ftz``), and nothing
    approximate (``div.full``, ``.approx``: ex2, lg2, sin, cos, rsqrt, rcp) appears."""
    for k in compiled["kernels"]:
        where = f"{k['name']} {k['constexprs']}"
        ops = _f32_ops(k["ptx"])
        if not _rademacher(k):  # Rademacher directions are sign bits: no log, no sqrt
            assert "div.rn.f32" in ops and "sqrt.rn.f32" in ops, where
        arith = [op for op in ops if op.split(".")[0] in ("add", "sub", "mul", "div", "sqrt")]
        assert (arith or _rademacher(k)) and all(op in ("add.rn.f32", "sub.rn.f32", "mul.rn.f32", "div.rn.f32", "sqrt.rn.f32")
                             for op in arith), f"{where}: {sorted(set(arith))}"
        bad = [op for op in _instructions(k["ptx"]) if ".ftz" in op or ".approx" in op or ".full" in op]
        assert not bad, f"{where}: {sorted(set(bad))}"


# Elements per thread (4 warps: 128 threads) that a per-element Rademacher would run Philox for, in
# the fused kernels (weight tile + bias for the linear)
_FUSED_RADEMACHER_CALLS = {
    "perturbed_linear_kernel": lambda c: (c["DB"] * c["BN"] * c["BK"] + c["DB"] * c["BN"]) // 128,
    "perturbed_embedding_kernel": lambda c: c["DB"] * c["BT"] * c["BH"] // 128,
}


def test_fused_rademacher_variants_cover_both_tile_paths():
    """The AOT check sees the row_signs path (32-aligned rows) and the span_signs path (any row) of
    both fused kernels."""
    import hosl.kernels.api as K
    from hosl.directions.families import FAMILY_CODES

    for name in _FUSED_RADEMACHER_CALLS:
        paths = {cst["ALIGNED"] for fn, _, cst in K.aot_specs()
                 if fn.__name__ == name and cst.get("FAMILY") == FAMILY_CODES["rademacher"]}
        assert paths == {True, False}, name


@pytest.mark.slow
def test_ptx_per_counter_work(compiled):
    """One Philox call per counter, feeding two Box-Muller pairs (one div.rn in the log and one
    sqrt.rn each): at most 2 mul.hi.u32 x 10 rounds per pair of divisions. Guards against a layout
    change that would run Philox once per element (4x the integer work)."""
    for k in compiled["kernels"]:
        ops = _instructions(k["ptx"])
        n_div, n_sqrt = ops.count("div.rn.f32"), ops.count("sqrt.rn.f32")
        n_mulhi = ops.count("mul.hi.u32")
        if _rademacher(k) and k["name"] in _FUSED_RADEMACHER_CALLS:
            # the fused forwards: row_signs / span_signs run one Philox call per 32 coordinates of a
            # row tile (span_signs a word or a few more per row, the bias likewise); the layout may
            # replicate the row words across threads, so the guard is "at least 8x fewer calls than
            # one per element" (sm_90, bf16: linear 52 / 88 mul.hi aligned / not, embedding 36 / 72;
            # one call per element, as before span_signs, was 1408 and 1152 unaligned)
            per_element = _FUSED_RADEMACHER_CALLS[k["name"]](k["constexprs"])
            assert n_div == n_sqrt == 0 and 0 < n_mulhi <= 2 * 10 * per_element // 8, (k["name"], n_mulhi)
            continue
        if _rademacher(k):
            # BN counters of 128 coordinates per program of 128 threads: BN coordinates per thread,
            # one Philox call (one word kept) per 32 of them, per direction (kernels/direction.py
            # block_signs). With fewer counters than threads (BN=8) the compiler recomputes Philox for
            # the counter of each of a thread's coordinates instead: 8 calls for 8 coordinates.
            coords_per_thread = k["constexprs"]["BN"] * 128 // 128
            assert coords_per_thread >= 32, k["constexprs"]
            assert n_div == n_sqrt == 0 and 0 < n_mulhi <= 2 * 10 * coords_per_thread // 32, (k["name"], n_mulhi)
            continue
        assert n_div == n_sqrt and n_div % 2 == 0, k["name"]
        counters = n_div // 2  # per thread (per loop iteration for zo_update)
        assert n_mulhi <= 2 * 10 * counters, (k["name"], n_mulhi, counters)


def test_launchers_pass_the_compile_options(monkeypatch):
    """What the AOT check compiled with is what the launchers ask for at run time (the interpreter
    ignores these options, so only this test sees them)."""
    import importlib

    import torch

    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs)

    hk = importlib.import_module("hosl.kernels.api")
    for mod_name, attr in [("randn", "randn_kernel"), ("perturb", "perturb_kernel"),
                           ("zo_update", "zo_update_kernel"), ("perturbed_linear", "perturbed_linear_kernel"),
                           ("perturbed_embedding", "perturbed_embedding_kernel")]:
        monkeypatch.setattr(importlib.import_module(f"hosl.kernels.{mod_name}"), attr, Recorder())
    w = torch.zeros(10)
    hk.randn(0, 0, 10, 0, "cpu")
    hk.perturb([w], [w], [0], 0, 0, 1.0)
    hk.zo_update([w], [0], [1], [2], [0.5], 0.0)
    hk.perturbed_linear(torch.zeros(2, 5), w.view(2, 5), None, 0, None, [1], [2], [0.5], True)
    hk.perturbed_embedding(torch.zeros(3, dtype=torch.int64), w.view(2, 5), 0, [1], [2], [0.5], True)
    assert len(seen) == 5
    for kwargs in seen:
        assert kwargs["enable_fp_fusion"] is False
        assert {k: kwargs[k] for k in hk.COMPILE_OPTIONS} == hk.COMPILE_OPTIONS
