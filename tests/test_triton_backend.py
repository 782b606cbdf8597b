"""The Triton backend gives the reference backend's bits: randn, perturb (in place / into out), zo_update.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). The interpreter costs ~20 ms per program whatever its size and the default
program is 4096 elements there, so sizes here are a few programs at most.

Equality is on bit patterns (``.view(int32)`` / ``.view(int16)``): ``torch.equal`` on floats would
call -0.0 and 0.0 equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import hosl.directions.spec as spec  # noqa: E402
import hosl.kernels.api as kernels  # noqa: E402
from hosl.ops.backends import reference as ref  # noqa: E402
from hosl.ops.backends import triton as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=f"triton backend: {tb.unavailable_reason()}")

DEVICE = tb.DEVICE_TYPES[0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [0, 2**64 - 1, 0x0123456789ABCDEF]
PER_PROGRAM = 4 * kernels.default_block_counters()  # elements per program of the default launch


def _keys(seed: int) -> tuple[int, int]:
    return spec.split_seed(seed)


def _f32(x: float) -> float:
    """The nearest float32 value, as a Python float (the contract passes exact float32 values)."""
    return float(np.float32(x))


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (_bits(got) != _bits(want)).reshape(-1)
    if diff.any():
        where = diff.nonzero().flatten()
        i = int(where[0])
        raise AssertionError(
            f"{int(diff.sum())} of {diff.numel()} elements differ; first at {i}: "
            f"{got.reshape(-1)[i].item()!r} vs {want.reshape(-1)[i].item()!r}")


def _weights(numel: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g) * 0.05).to(dtype).to(DEVICE)


def _shapes_and_offsets(sizes, base: int):
    """Shapes and the offsets of consecutive tensors in a flattened parameter list starting at ``base``."""
    offsets, at = [], base
    for s in sizes:
        offsets.append(at)
        at += int(np.prod(s)) if s else 1
    return offsets


# ------------------------------------------------------------------------------------------------
# randn
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 3, 2**32 - 2, 2**32 + 1, 2**62 + 7])
def test_randn_matches_reference(seed, offset):
    numel = PER_PROGRAM + 7  # two programs; not a multiple of 4
    lo, hi = _keys(seed)
    got = tb.randn(lo, hi, numel, offset, DEVICE)
    assert got.dtype == torch.float32 and got.device.type == DEVICE
    assert_same_bits(got, ref.randn(lo, hi, numel, offset, "cpu"))


@pytest.mark.parametrize("numel", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**33 + 3])
def test_randn_small(numel, offset):
    lo, hi = _keys(SEEDS[2])
    assert_same_bits(tb.randn(lo, hi, numel, offset, DEVICE), ref.randn(lo, hi, numel, offset, "cpu"))


def test_randn_is_a_slice_of_one_direction():
    """Chunking does not change z: any window equals the same window of a longer draw."""
    lo, hi = _keys(7)
    whole = tb.randn(lo, hi, 4000, 2**32 - 1001, DEVICE)
    for start, n in [(0, 1), (1, 4), (3, 1021), (997, 3003)]:
        assert_same_bits(tb.randn(lo, hi, n, 2**32 - 1001 + start, DEVICE), whole[start:start + n])


def test_different_seeds_differ():
    a = tb.randn(*_keys(1), 1000, 0, DEVICE)
    b = tb.randn(*_keys(2), 1000, 0, DEVICE)
    c = tb.randn(*_keys(1 << 32), 1000, 0, DEVICE)  # same low half, different high half
    assert (a != b).float().mean() > 0.99 and (a != c).float().mean() > 0.99


# ------------------------------------------------------------------------------------------------
# perturb
# ------------------------------------------------------------------------------------------------
SIZES = [(3, 5), (PER_PROGRAM + 3, ), (7, ), (1, ), (), (0, ), (2, 2, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "into_out"])
def test_perturb_matches_reference(dtype, in_place):
    seed, scale = SEEDS[1] if in_place else SEEDS[2], _f32(-1e-3 if in_place else 2e-3)
    offsets = _shapes_and_offsets(SIZES, base=2**32 + 1)
    ws = [_weights(int(np.prod(s)) if s else 1, dtype, i).reshape(s) for i, s in enumerate(SIZES)]
    originals = [w.clone() for w in ws]
    want = [w.clone().cpu() for w in ws]
    ref.perturb([w.cpu() for w in ws], want, offsets, *_keys(seed), scale)

    outs = ws if in_place else [torch.full_like(w, float("nan")) for w in ws]
    tb.perturb(ws, outs, offsets, *_keys(seed), scale)
    for got, w_want in zip(outs, want):
        assert_same_bits(got, w_want)
    if not in_place:
        for w, orig in zip(ws, originals):
            assert_same_bits(w, orig)  # inputs untouched
    # the perturbation really changed the large tensor (a no-op kernel would fail here)
    assert (_bits(outs[1]) != _bits(originals[1])).float().mean() > 0.5


def test_perturb_mixed_dtypes_many_tensors():
    """One call with 40 tensors of three dtypes and odd sizes: one launch per dtype, all rows right."""
    g = torch.Generator().manual_seed(3)
    sizes = [int(s) for s in torch.randint(1, 300, (40, ), generator=g)]
    dtypes = [DTYPES[i % 3] for i in range(40)]
    offsets = _shapes_and_offsets([(s, ) for s in sizes], base=5)
    ws = [_weights(s, d, i) for i, (s, d) in enumerate(zip(sizes, dtypes))]
    want = [w.clone().cpu() for w in ws]
    scale = _f32(1e-2)
    ref.perturb(want, want, offsets, *_keys(SEEDS[0]), scale)
    tb.perturb(ws, ws, offsets, *_keys(SEEDS[0]), scale)
    for got, w_want in zip(ws, want):
        assert_same_bits(got, w_want)


def test_perturb_subnormal_scale_and_zero_scale():
    w = _weights(1001, torch.float32, 0) * 1e-37  # some results subnormal: no flush to zero allowed
    for scale in (float.fromhex("0x1.8p-140"), 0.0, -0.0):
        got, want = torch.empty_like(w), torch.empty_like(w).cpu()
        tb.perturb([w], [got], [9], *_keys(SEEDS[2]), scale)
        ref.perturb([w.cpu()], [want], [9], *_keys(SEEDS[2]), scale)
        assert_same_bits(got, want)


def test_perturb_small_programs_many_rows():
    """Tiny programs (32 elements) so every tensor spans many programs: exercises the table search."""
    sizes = [1, 33, 64, 95, 130, 2, 31]
    offsets = _shapes_and_offsets([(s, ) for s in sizes], base=2**40 + 2)
    ws = [_weights(s, torch.bfloat16, i) for i, s in enumerate(sizes)]
    want = [w.clone().cpu() for w in ws]
    ref.perturb(want, want, offsets, *_keys(11), _f32(0.5))
    kernels.perturb(ws, ws, offsets, *_keys(11), _f32(0.5), block_counters=8)
    for got, w_want in zip(ws, want):
        assert_same_bits(got, w_want)


# ------------------------------------------------------------------------------------------------
# zo_update
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 4])
def test_zo_update_matches_reference(dtype, q):
    sizes = [(PER_PROGRAM + 1, ), (3, 3), (1, ), (0, ), (257, )]
    offsets = _shapes_and_offsets(sizes, base=2**32 + 3)
    seeds = [(SEEDS[i % 3] + i) % 2**64 for i in range(q)]
    seeds[0] = 2**64 - 1
    coeffs = [_f32(c) for c in (1e-3, -2.5e-4, 7e-3, -1e-2)[:q]]
    decay = _f32(1e-5) if q == 4 else 0.0
    ws = [_weights(int(np.prod(s)), dtype, 10 + i).reshape(s) for i, s in enumerate(sizes)]
    before = [w.clone() for w in ws]
    want = [w.clone().cpu() for w in ws]
    keys_lo, keys_hi = zip(*(_keys(s) for s in seeds))
    ref.zo_update(want, offsets, keys_lo, keys_hi, coeffs, decay)
    tb.zo_update(ws, offsets, list(keys_lo), list(keys_hi), coeffs, decay)
    for got, w_want in zip(ws, want):
        assert_same_bits(got, w_want)
    assert (_bits(ws[0]) != _bits(before[0])).float().mean() > 0.3


def test_zo_update_is_one_pass_not_q_updates():
    """All Q directions accumulate in float32 before one rounding: not the same as Q rounded steps."""
    w = _weights(3000, torch.bfloat16, 5)
    seeds, coeffs = [1, 2, 3, 4], [_f32(2e-3)] * 4
    keys_lo, keys_hi = zip(*(_keys(s) for s in seeds))
    fused = w.clone()
    tb.zo_update([fused], [0], list(keys_lo), list(keys_hi), coeffs, 0.0)
    stepwise = w.clone()
    for lo, hi, c in zip(keys_lo, keys_hi, coeffs):
        tb.zo_update([stepwise], [0], [lo], [hi], [c], 0.0)
    want = w.clone()
    ref.zo_update([want], [0], keys_lo, keys_hi, coeffs, 0.0)
    assert_same_bits(fused, want)
    assert (_bits(fused) != _bits(stepwise)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_half_to_even_on_ties(dtype):
    """decay = -0.5 makes acc = 1.5 * w, exact in float32. For a w whose significand M (8 bits for
    bf16, 11 for fp16) is odd and 3M needs one bit more than M, that is exactly half-way between two
    representable values: ~17% of the elements. Truncation (what the interpreter's own fp32->bf16
    cast does) and round-half-away both differ from round-half-even on many of them."""
    decay = -0.5
    w = _weights(4096, dtype, 1)
    want = w.clone()
    ref.zo_update([want], [0], [0], [0], [0.0], decay)
    got = w.clone()
    tb.zo_update([got], [0], [0], [0], [0.0], decay)
    assert_same_bits(got, want)
    # the ties really occur: nudging the exact value away from zero by 2**-20 (far below half an
    # ulp of the narrow type, so it moves only ties) changes the rounded result of many elements
    half_away = (w.float() * 1.5 * (1 + 2.0**-20)).to(dtype)
    assert (_bits(half_away) != _bits(want)).sum() > 100


def test_zo_update_no_directions_is_pure_decay():
    w = _weights(100, torch.float32, 2)
    got, want = w.clone(), w.clone()
    tb.zo_update([got], [0], [], [], [], _f32(0.1))
    ref.zo_update([want], [0], [], [], [], _f32(0.1))
    assert_same_bits(got, want)


def test_nothing_to_do():
    """Empty lists and empty tensors launch nothing and touch nothing."""
    e = torch.empty(0, device=DEVICE)
    tb.perturb([], [], [], 1, 2, 1.0)
    tb.perturb([e], [e], [3], 1, 2, 1.0)
    tb.zo_update([e], [3], [1], [2], [1.0], 0.0)
    assert tb.randn(1, 2, 0, 5, DEVICE).shape == (0, )


def test_launchers_reject_strided_views():
    """The interpreter would silently write the wrong elements of a strided view: the launcher says no."""
    w = torch.zeros(8, 8, device=DEVICE).t()
    with pytest.raises(AssertionError, match="contiguous"):
        tb.perturb([w], [w], [0], 0, 0, 1.0)


def test_a_family_without_a_fused_tile_is_materialised(monkeypatch):
    """A family the fused linear/embedding tiles do not generate (here: Rademacher, taken out of
    kernels.FUSED_FAMILIES) never reaches them: the Triton backend materialises W + s*z with its own
    perturb, which gives the reference backend's result."""
    def fused_must_not_run(*args, **kwargs):
        raise AssertionError("the fused kernel ran for a family it does not implement")

    monkeypatch.setattr(kernels, "FUSED_FAMILIES", ("gaussian", "sphere"))
    monkeypatch.setattr(kernels, "perturbed_linear", fused_must_not_run)
    monkeypatch.setattr(kernels, "perturbed_embedding", fused_must_not_run)
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE), torch.randn(8, device=DEVICE)
    keys = [_keys(s) for s in SEEDS[:2]]
    args = (w_off := 64, w_off + w.numel(), [k[0] for k in keys], [k[1] for k in keys], [0.5, -0.25], True)
    got = tb.perturbed_linear(x, w, b, *args, family="rademacher")
    want = ref.perturbed_linear(x, w, b, *args, family="rademacher")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ids = torch.tensor([1, 7, 3], device=DEVICE)
    emb = tb.perturbed_embedding(ids, w, 64, *args[2:4], [0.5, -0.25], True, family="rademacher")
    assert torch.equal(emb, ref.perturbed_embedding(ids, w, 64, *args[2:4], [0.5, -0.25], True, family="rademacher"))
    with pytest.raises(AssertionError, match="fused kernel ran"):  # and a fused family does reach them
        tb.perturbed_linear(x, w, b, *args, family="gaussian")
