"""The fused perturbed embedding (Triton, interpreted on CPU): the gathered rows of ``W + s Z``, bit for bit.

Reference: ``perturb_(W, seed, scale, out=..., backend="reference")`` on the whole table, then
``F.embedding``. A lookup only moves values, so the fused kernel must give exactly those bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hosl import ops  # noqa: E402
from hosl.ops import available_backends  # noqa: E402
from hosl.ops.backends import triton as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=f"triton backend: {tb.unavailable_reason()}")

DEVICE = tb.DEVICE_TYPES[0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [3, 2**64 - 1, 0xFEDCBA9876543210]
SCALES = [float(np.float32(s)) for s in (1e-3, -1e-3, 0.5)]
# (vocab, hidden, offset): unaligned rows (per-element z) and aligned ones (row_normals), odd sizes
TABLES = [(37, 7, 5), (50, 24, 12), (9, 132, 2**35)]


def _bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _table(v, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, h, generator=g) * 0.1).to(dtype).to(DEVICE)


def _ids(shape, vocab, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _reference(ids, w, offset, seeds, scales, shared):
    rows = []
    for d, (seed, scale) in enumerate(zip(seeds, scales)):
        wp = torch.empty_like(w)
        ops.perturb_(w, seed, scale, out=wp, offset=offset, backend="reference")
        rows.append(F.embedding(ids if shared else ids[d], wp))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,hidden,offset", TABLES)
@pytest.mark.parametrize("shared", [True, False])
def test_rows_are_the_materialised_rows_bit_for_bit(dtype, vocab, hidden, offset, shared):
    w = _table(vocab, hidden, dtype)
    w0 = w.clone()
    ids = _ids((2, 5) if shared else (3, 2, 5), vocab)
    ids.view(-1)[:2] = vocab - 1  # the last row, twice
    y = ops.perturbed_embedding(ids, w, seeds=SEEDS, scales=SCALES, offset=offset, per_direction_input=not shared,
                                backend="triton")
    want = _reference(ids, w, offset, SEEDS, SCALES, shared)
    assert y.shape == want.shape and y.dtype == dtype
    assert torch.equal(_bits(y), _bits(want))
    assert torch.equal(_bits(w), _bits(w0)), "the table was written"
    assert not torch.equal(_bits(y[2]), _bits(F.embedding(ids if shared else ids[2], w)))


def test_batched_equals_looped():
    w = _table(40, 16, torch.bfloat16)
    ids = _ids((11,), 40)
    batched = ops.perturbed_embedding(ids, w, seeds=SEEDS, scales=SCALES, offset=8, backend="triton")
    looped = torch.cat([ops.perturbed_embedding(ids, w, seeds=[s], scales=[c], offset=8, backend="triton")
                        for s, c in zip(SEEDS, SCALES)])
    assert torch.equal(_bits(batched), _bits(looped))


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in available_backends()])
def test_materialising_backends_agree(backend):
    """The non-fused backends (cpu perturbs only the looked-up rows) give the same bits."""
    w = _table(30, 10, torch.float16)
    ids = _ids((3, 4), 30)
    kw = dict(seeds=SEEDS, scales=SCALES, offset=7)
    assert torch.equal(_bits(ops.perturbed_embedding(ids.cpu(), w.cpu(), backend=backend, **kw)),
                       _bits(ops.perturbed_embedding(ids, w, backend="triton", **kw)))


def test_argument_errors():
    w = torch.zeros(5, 3)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        ops.perturbed_embedding(torch.tensor([0, 5]), w, seeds=[1], scales=[1.0], offset=0)
    with pytest.raises(IndexError):
        ops.perturbed_embedding(torch.tensor([-1]), w, seeds=[1], scales=[1.0], offset=0)
    with pytest.raises(TypeError, match="int64"):
        ops.perturbed_embedding(torch.tensor([0.0]), w, seeds=[1], scales=[1.0], offset=0)
    with pytest.raises(ValueError, match="empty"):
        ops.perturbed_embedding(torch.tensor([0]), w, seeds=[], scales=[], offset=0)


@pytest.mark.parametrize("family", ["rademacher", "sphere"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,hidden,offset", [(37, 7, 5), (20, 8, 128), (9, 96, 2**35 + 64)])
def test_families_are_the_materialised_rows_bit_for_bit(family, dtype, vocab, hidden, offset):
    w = _table(vocab, hidden, dtype)
    ids = _ids((2, 5), vocab)
    y = ops.perturbed_embedding(ids, w, seeds=SEEDS, scales=SCALES, offset=offset, family=family, backend="triton")
    for d, (seed, scale) in enumerate(zip(SEEDS, SCALES)):
        wp = torch.empty_like(w)
        ops.perturb_(w, seed, scale, out=wp, offset=offset, family=family, backend="reference")
        assert torch.equal(_bits(y[d]), _bits(F.embedding(ids, wp))), f"direction {d}"
    # the materialising backend (only the rows looked up) gives the same bits
    cpu = ops.perturbed_embedding(ids.cpu(), w.cpu(), seeds=SEEDS, scales=SCALES, offset=offset, family=family,
                                  backend="cpu")
    assert torch.equal(_bits(cpu), _bits(y))
