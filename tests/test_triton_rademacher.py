"""The Triton Rademacher kernels (one Philox call per 32 coordinates) give the reference's bits.

``kernels/direction.py`` ``block_signs`` computes each Philox word once and expands its 32 bits with
shifts (``word_signs``). These tests run it under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU) against ``spec.rademacher_reference`` through the reference backend:
odd sizes, offsets that are not multiples of 32 or 128, one or many programs per tensor (small
``block_counters``), every dtype, randn / perturb (in place, into ``out``) / zo_update. Equality is
on bit patterns. The PTX side (one Philox call per thread's 32 coordinates on sm_90) is in
tests/test_triton_compile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import hosl.directions.spec as spec  # noqa: E402
import hosl.kernels.api as kernels  # noqa: E402
from hosl.kernels import multi_tensor as mt  # noqa: E402
from hosl.ops.backends import reference as ref  # noqa: E402
from hosl.ops.backends import triton as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=f"triton backend: {tb.unavailable_reason()}")

DEVICE = tb.DEVICE_TYPES[0]
FAMILY = "rademacher"
# offsets: aligned, inside a word, across a word, inside the last word of a counter, past 2**32 counters
OFFSETS = [0, 5, 37, 127 - 3, 2**32 * 128 + 77]
# elements: less than a word, a word and one, a counter minus one, a few counters, odd
NUMELS = [1, 33, 127, 389, 1001]


def _keys(seed: int) -> tuple[int, int]:
    return spec.split_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(_bits(got), _bits(want))


def _weights(numel: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g) * 0.05).to(dtype).to(DEVICE)


def _consecutive_offsets(numels, base: int) -> list[int]:
    return [base + sum(numels[:j]) for j in range(len(numels))]


def test_the_layout_gives_a_rademacher_program_32_coordinates_per_gaussian_program_4():
    """At the GPU's 256 counters per program a Rademacher program holds 32 counters: 128 Philox
    words, one per thread of its 4 warps (num_warps in kernels/_config.py)."""
    assert mt.family_layout(FAMILY, 256) == (32, 128)
    assert 4 * mt.family_layout(FAMILY, 256)[0] == 32 * kernels.COMPILE_OPTIONS["num_warps"]
    assert mt.family_layout("gaussian", 256) == (256, 4)
    assert mt.family_layout(FAMILY, 16) == (2, 128) and mt.family_layout(FAMILY, 1) == (1, 128)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("block_counters", [4, None], ids=["one_counter_programs", "default"])
def test_randn_matches_the_reference(offset, block_counters):
    seed = 0x0123456789ABCDEF
    numel = 1001
    got = kernels.randn(*_keys(seed), numel, offset, DEVICE, family=FAMILY, block_counters=block_counters)
    want = spec.rademacher_reference(seed, numel, offset)
    assert _same_bits(got.cpu(), want)


@pytest.mark.parametrize("numel", NUMELS)
def test_randn_of_odd_sizes_is_the_reference_slice(numel):
    got = kernels.randn(*_keys(2**64 - 1), numel, 37, DEVICE, family=FAMILY, block_counters=4)
    assert _same_bits(got.cpu(), spec.rademacher_reference(2**64 - 1, numel, 37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "into_out"])
@pytest.mark.parametrize("block_counters", [8, None], ids=["small_programs", "default"])
def test_perturb_matches_the_reference(dtype, in_place, block_counters):
    offsets = _consecutive_offsets(NUMELS, base=OFFSETS[-1])
    ws = [_weights(n, dtype, j) for j, n in enumerate(NUMELS)]
    originals = [w.clone() for w in ws]
    want = [w.clone().cpu() for w in ws]
    scale = float(np.float32(-3e-3))
    ref.perturb([w.cpu() for w in ws], want, offsets, *_keys(7), scale, family=FAMILY)
    outs = ws if in_place else [torch.full_like(w, float("nan")) for w in ws]
    kernels.perturb(ws, outs, offsets, *_keys(7), scale, family=FAMILY, block_counters=block_counters)
    assert all(_same_bits(got, w_want) for got, w_want in zip(outs, want))
    if not in_place:
        assert all(_same_bits(w, orig) for w, orig in zip(ws, originals))
    assert (_bits(outs[-1]) != _bits(originals[-1])).float().mean() > 0.5  # a no-op kernel fails here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("block_counters", [8, None], ids=["small_programs", "default"])
def test_zo_update_matches_the_reference(dtype, q, block_counters):
    offsets = _consecutive_offsets(NUMELS, base=5)
    seeds = [2**64 - 1, 3, 0x0123456789ABCDEF][:q]
    coeffs = [float(np.float32(c)) for c in (1e-3, -2.5e-4, 7e-3)][:q]
    decay = float(np.float32(1e-5))
    ws = [_weights(n, dtype, 20 + j) for j, n in enumerate(NUMELS)]
    before = [w.clone() for w in ws]
    want = [w.clone().cpu() for w in ws]
    keys_lo, keys_hi = zip(*(_keys(s) for s in seeds))
    ref.zo_update(want, offsets, keys_lo, keys_hi, coeffs, decay, family=FAMILY)
    kernels.zo_update(ws, offsets, list(keys_lo), list(keys_hi), coeffs, decay, family=FAMILY,
                      block_counters=block_counters)
    assert all(_same_bits(got, w_want) for got, w_want in zip(ws, want))
    assert (_bits(ws[-1]) != _bits(before[-1])).float().mean() > 0.3


# ------------------------------------------------------------------------------------------------
# The fused linear / embedding tiles (kernels/perturbed_linear.py span_signs / row_signs)
# ------------------------------------------------------------------------------------------------
def _reference_perturbed(t: torch.Tensor, seed: int, scale: float, offset: int) -> torch.Tensor:
    out = t.clone().cpu()
    ref.perturb([t.cpu()], [out], [offset], *_keys(seed), scale, family=FAMILY)
    return out


@pytest.mark.parametrize("w_offset,k", [(3, 100), (64, 96), (2**33 + 17, 40)], ids=["unaligned", "aligned", "far"])
def test_fused_linear_tiles_at_the_gpu_block_sizes(w_offset, k):
    """The GPU's tiles (BK = 32, BN = 64: several k-steps, a partial last one, two column tiles):
    with x = identity rows the output is the perturbed weight, and with x = 0 the perturbed bias
    (its offset not a multiple of 32), bit for bit against the reference perturb."""
    from hosl.kernels import perturbed_linear as pl

    n, seeds, scales = 70, [7, 2**64 - 1], [float(np.float32(s)) for s in (0.5, -0.25)]
    w, b = _weights(n * k, torch.float32, 1).reshape(n, k), _weights(n, torch.float32, 2)
    b_offset = w_offset + n * k + 5
    keys_lo, keys_hi = zip(*(_keys(s) for s in seeds))
    blocks = {"DB": 2, "BM": 16, "BN": 64, "BK": 32}
    eye = torch.eye(k, dtype=torch.float32, device=DEVICE)
    y = pl.perturbed_linear(eye, w, None, w_offset, None, keys_lo, keys_hi, scales, True, blocks=blocks, family=FAMILY)
    zero = torch.zeros((1, k), dtype=torch.float32, device=DEVICE)
    yb = pl.perturbed_linear(zero, w, b, w_offset, b_offset, keys_lo, keys_hi, scales, True, blocks=blocks,
                             family=FAMILY)
    assert pl.aligned(FAMILY, w_offset, k, blocks["BK"]) == (w_offset % 32 == 0 and k % 32 == 0)
    for d, (seed, scale) in enumerate(zip(seeds, scales)):
        assert _same_bits(y[d].T.contiguous().cpu(), _reference_perturbed(w, seed, scale, w_offset)), d
        assert _same_bits(yb[d, 0].cpu(), _reference_perturbed(b, seed, scale, b_offset)), d


@pytest.mark.parametrize("w_offset,hidden", [(5, 70), (2**35 + 64, 96)], ids=["unaligned", "aligned"])
def test_fused_embedding_tiles_at_the_gpu_block_sizes(w_offset, hidden):
    from hosl.kernels import perturbed_embedding as pe

    vocab, seeds, scales = 11, [3, 0x0123456789ABCDEF], [float(np.float32(s)) for s in (0.5, -0.25)]
    w = _weights(vocab * hidden, torch.bfloat16, 3).reshape(vocab, hidden)
    ids = torch.tensor([4, 0, 10, 4, 7], dtype=torch.int64, device=DEVICE)
    keys_lo, keys_hi = zip(*(_keys(s) for s in seeds))
    y = pe.perturbed_embedding(ids, w, w_offset, keys_lo, keys_hi, scales, True,
                               blocks={"DB": 2, "BT": 4, "BH": 64}, family=FAMILY)
    for d, (seed, scale) in enumerate(zip(seeds, scales)):
        table = _reference_perturbed(w, seed, scale, w_offset)
        assert _same_bits(y[d].cpu(), table[ids.cpu()]), d
