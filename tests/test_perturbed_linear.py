"""The fused perturbed linear (Triton, interpreted on CPU) against the materialised reference.

Reference: ``hosl.ops.perturb_(W, seed, scale, out=..., backend="reference")`` (the spec's z, rounded
into W's dtype), then ``F.linear`` in float32. The identity-row probe ``x = I`` makes the kernel
write its perturbed weight tile itself (``y[d] = (W + s Z)^T`` exactly: every sum has one non-zero
term), so the generated Z is checked bit for bit, in every dtype, on the aligned and per-element paths.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hosl import ops  # noqa: E402
from hosl.directions.spec import randn_reference  # noqa: E402
from hosl.ops.backends import triton as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=f"triton backend: {tb.unavailable_reason()}")

DEVICE = tb.DEVICE_TYPES[0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [7, 2**64 - 1, 0x0123456789ABCDEF]
SCALES = [float(np.float32(s)) for s in (1e-2, -1e-2, 0.75)]
# (M, N, K, weight offset): odd sizes with an offset that is not a multiple of 4 (per-element z),
# and aligned ones (row_normals); neither a multiple of the block sizes
SHAPES = [(5, 7, 9, 3), (19, 24, 36, 8)]


@pytest.fixture
def exact_fp32(request):
    """fp32 dots in "ieee" precision on a GPU, for the bit-exact probes: the default "tf32x3" can miss
    by an ulp (kernels/perturbed_linear.py, fp32_precision). The interpreter is exact either way."""
    matmul = torch.backends.cuda.matmul
    if DEVICE != "cuda":
        yield
        return
    if not hasattr(matmul, "fp32_precision"):
        if request.node.callspec.params.get("dtype") == torch.float32:
            pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision to ask for ieee fp32 dots")
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _tensor(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _perturbed(t, seed, scale, offset):
    out = torch.empty_like(t)
    ops.perturb_(t, seed, scale, out=out, offset=offset, backend="reference")
    return out


def _reference(x, w, b, w_off, b_off, seeds, scales, shared):
    ys = []
    for d, (seed, scale) in enumerate(zip(seeds, scales)):
        wp = _perturbed(w, seed, scale, w_off)
        bp = None if b is None else (b if b_off is None else _perturbed(b, seed, scale, b_off))
        xd = x if shared else x[d]
        ys.append(F.linear(xd.float(), wp.float(), None if bp is None else bp.float()).to(x.dtype))
    return torch.stack(ys)


def _tolerance(dtype):
    # one rounding of the output into dtype, plus float32 summation-order noise
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,w_off", SHAPES)
@pytest.mark.parametrize("shared", [True, False])
def test_matches_materialised_reference(dtype, m, n, k, w_off, shared):
    w, b = _tensor((n, k), dtype, 1, 0.2), _tensor((n,), dtype, 2, 0.2)
    x = _tensor((m, k) if shared else (3, m, k), dtype, 3)
    w0, b0 = w.clone(), b.clone()
    b_off = w_off + n * k
    y = ops.perturbed_linear(x, w, b, seeds=SEEDS, scales=SCALES, weight_offset=w_off, bias_offset=b_off,
                             per_direction_input=not shared, backend="triton")
    want = _reference(x, w, b, w_off, b_off, SEEDS, SCALES, shared)
    assert y.shape == (3, m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), want.float(), **_tolerance(dtype))
    # the weights are read, never written
    assert torch.equal(_bits(w), _bits(w0)) and torch.equal(_bits(b), _bits(b0))
    # and the perturbation is really there: far from the unperturbed layer for the 0.75 direction
    assert (y[2].float() - F.linear(x.float() if shared else x[2].float(), w.float(), b.float())).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,w_off", SHAPES + [(3, 5, 6, 2**33 + 1)])
def test_identity_probe_gives_the_spec_z_bit_for_bit(dtype, m, n, k, w_off, exact_fp32):
    """x = identity rows: y[d].T is the kernel's perturbed weight, which must be perturb_'s bits."""
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    zero_w = torch.zeros((n, k), dtype=dtype, device=DEVICE)
    y = ops.perturbed_linear(eye, zero_w, seeds=SEEDS[:2], scales=[1.0, 1.0], weight_offset=w_off, backend="triton")
    for d, seed in enumerate(SEEDS[:2]):
        z = randn_reference(seed, n * k, w_off).view(n, k).to(dtype)
        assert torch.equal(_bits(y[d].T), _bits(z)), f"direction {d}: the kernel's Z is not the spec's"
    w = _tensor((n, k), dtype, 4, 0.2)
    y = ops.perturbed_linear(eye, w, seeds=SEEDS, scales=SCALES, weight_offset=w_off, backend="triton")
    for d, (seed, scale) in enumerate(zip(SEEDS, SCALES)):
        assert torch.equal(_bits(y[d].T), _bits(_perturbed(w, seed, scale, w_off)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_probe_bit_for_bit(dtype):
    """x = 0: y[d] is the perturbed bias on every row (its own coordinates), or the bias untouched."""
    n, k = 11, 6
    w, b = _tensor((n, k), dtype, 5), _tensor((n,), dtype, 6)
    x = torch.zeros((2, k), dtype=dtype, device=DEVICE)
    y = ops.perturbed_linear(x, w, b, seeds=SEEDS[:2], scales=SCALES[:2], weight_offset=1, bias_offset=1 + n * k + 5,
                             backend="triton")
    for d, (seed, scale) in enumerate(zip(SEEDS[:2], SCALES[:2])):
        want = _perturbed(b, seed, scale, 1 + n * k + 5)
        assert torch.equal(_bits(y[d]), _bits(want.expand(2, n)))
    y = ops.perturbed_linear(x, w, b, seeds=SEEDS[:1], scales=SCALES[:1], weight_offset=1, backend="triton")
    assert torch.equal(_bits(y[0]), _bits(b.expand(2, n)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_equals_looped(dtype):
    m, n, k, w_off = 6, 10, 20, 4
    w, b = _tensor((n, k), dtype, 7, 0.2), _tensor((n,), dtype, 8)
    x = _tensor((3, m, k), dtype, 9)
    kw = dict(weight_offset=w_off, bias_offset=w_off + n * k, backend="triton")
    batched = ops.perturbed_linear(x, w, b, seeds=SEEDS, scales=SCALES, per_direction_input=True, **kw)
    looped = torch.cat([ops.perturbed_linear(x[d], w, b, seeds=[s], scales=[c], **kw)
                        for d, (s, c) in enumerate(zip(SEEDS, SCALES))])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6)
    # a shared input is the same as that input given to every direction
    shared = ops.perturbed_linear(x[0], w, b, seeds=SEEDS, scales=SCALES, **kw)
    repeated = ops.perturbed_linear(x[:1].expand(3, m, k), w, b, seeds=SEEDS, scales=SCALES,
                                    per_direction_input=True, **kw)
    torch.testing.assert_close(shared, repeated, rtol=1e-6, atol=1e-6)


def test_leading_dimensions_and_backends_agree():
    """[B, T, K] inputs keep their shape; the reference and materialising backends give the same."""
    w, b = _tensor((5, 8), torch.float32, 10), _tensor((5,), torch.float32, 11)
    x = _tensor((2, 3, 8), torch.float32, 12)
    kw = dict(seeds=SEEDS[:2], scales=SCALES[:2], weight_offset=0, bias_offset=40)
    y = ops.perturbed_linear(x, w, b, backend="triton", **kw)
    assert y.shape == (2, 2, 3, 5)
    torch.testing.assert_close(y, ops.perturbed_linear(x, w, b, backend="reference", **kw), rtol=1e-5, atol=1e-5)


def test_argument_errors():
    w = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="in_features"):
        ops.perturbed_linear(torch.zeros(2, 4), w, seeds=[1], scales=[1.0], weight_offset=0)
    with pytest.raises(TypeError, match="dtype"):
        ops.perturbed_linear(torch.zeros(2, 3, dtype=torch.float16), w, seeds=[1], scales=[1.0], weight_offset=0)
    with pytest.raises(ValueError, match="one scale per seed"):
        ops.perturbed_linear(torch.zeros(2, 3), w, seeds=[1, 2], scales=[1.0], weight_offset=0)
    with pytest.raises(ValueError, match="D=2"):
        ops.perturbed_linear(torch.zeros(3, 2, 3), w, seeds=[1, 2], scales=[1.0, 1.0], weight_offset=0,
                             per_direction_input=True)
    with pytest.raises(ValueError, match="contiguous"):
        ops.perturbed_linear(torch.zeros(2, 4), torch.zeros(3, 4).T, seeds=[1], scales=[1.0], weight_offset=0)


FAMILIES = ["rademacher", "sphere"]


def _perturbed_family(t, seed, scale, offset, family):
    out = torch.empty_like(t)
    ops.perturb_(t, seed, scale, out=out, offset=offset, family=family, backend="reference")
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,w_off", [(5, 7, 9, 3), (4, 6, 8, 200), (3, 5, 96, 2**33 + 32)])
def test_families_identity_probe_bit_for_bit(family, dtype, m, n, k, w_off, exact_fp32):
    """x = identity rows, x = 0 for the bias: the kernel's perturbed weight and bias are perturb_'s
    bits of the same family (sphere: the factor of the whole tensor at its own offset)."""
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    w, b = _tensor((n, k), dtype, 4, 0.2), _tensor((n,), dtype, 5, 0.2)
    b_off = w_off + n * k + 1
    y = ops.perturbed_linear(eye, w, seeds=SEEDS, scales=SCALES, weight_offset=w_off, family=family,
                             backend="triton")
    yb = ops.perturbed_linear(torch.zeros((2, k), dtype=dtype, device=DEVICE), w, b, seeds=SEEDS, scales=SCALES,
                              weight_offset=w_off, bias_offset=b_off, family=family, backend="triton")
    for d, (seed, scale) in enumerate(zip(SEEDS, SCALES)):
        assert torch.equal(_bits(y[d].T), _bits(_perturbed_family(w, seed, scale, w_off, family))), f"direction {d}"
        assert torch.equal(_bits(yb[d]), _bits(_perturbed_family(b, seed, scale, b_off, family).expand(2, n)))
        assert not torch.equal(_bits(y[d].T), _bits(_perturbed(w, seed, scale, w_off)))  # not the Gaussian's


@pytest.mark.parametrize("family", FAMILIES)
def test_families_match_the_materialising_backends(family):
    w, b = _tensor((6, 8), torch.float32, 10), _tensor((6,), torch.float32, 11)
    x = _tensor((2, 3, 8), torch.float32, 12)
    kw = dict(seeds=SEEDS[:2], scales=SCALES[:2], weight_offset=4, bias_offset=60, family=family)
    want = ops.perturbed_linear(x, w, b, backend="reference", **kw)
    torch.testing.assert_close(ops.perturbed_linear(x, w, b, backend="triton", **kw), want, rtol=1e-5, atol=1e-5)
    # the materialising compiled backends that run on these tensors: cpu here, cuda on a GPU
    for name in _materialising_backends():
        torch.testing.assert_close(ops.perturbed_linear(x, w, b, backend=name, **kw), want, rtol=1e-5, atol=1e-5)


def _materialising_backends() -> list[str]:
    return [name for name in ops.available_backends() if name in ("cpu", "cuda")
            and DEVICE in importlib.import_module(f"hosl.ops.backends.{name}").DEVICE_TYPES]


def test_family_argument_errors():
    w = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="family"):
        ops.perturbed_linear(torch.zeros(2, 3), w, seeds=[1], scales=[1.0], weight_offset=0, family="uniform")
    with pytest.raises(ValueError, match="factors is only for family='sphere'"):
        ops.perturbed_linear(torch.zeros(2, 3), w, seeds=[1], scales=[1.0], weight_offset=0, factors=[[1.0]])
    with pytest.raises(ValueError, match="one per direction"):
        ops.perturbed_linear(torch.zeros(2, 3), w, seeds=[1, 2], scales=[1.0, 1.0], weight_offset=0,
                             family="sphere", factors=[[1.0]])
