"""hosl.transport.codecs: each upload codec's round trip within its stated bound, its bytes, its errors,
and why delta8 exists (a 16-bit cast of perturbed activations erases their eps-sized differences)."""

import math

import pytest
import torch

from hosl.transport import codecs as C

ROWS, SEQ, HIDDEN = 3, 5, 64
FLOAT_CODECS = ("float32", "bfloat16", "float16")


def _stack(k: int, dtype: torch.dtype, seed: int = 0, spread: float = 0.05):
    """(reference [ROWS, SEQ, HIDDEN], k perturbed copies of it stacked along dim 0)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(ROWS, SEQ, HIDDEN, generator=g) * 3
    t = ref.repeat(k, 1, 1) + spread * torch.randn(k * ROWS, SEQ, HIDDEN, generator=g)
    return ref.to(dtype), t.to(dtype)


def _err(codec, t, reference=None):
    out = C.decode(C.encode(t, codec, reference), codec, reference, dtype=t.dtype)
    assert out.shape == t.shape and out.dtype == t.dtype
    return (out.double() - t.double()).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("codec", C.CODECS)
def test_round_trip_within_the_stated_bound(codec, k, dtype):
    ref, t = _stack(k, dtype, seed=k)
    reference = ref if codec == "delta8" else None
    err = _err(codec, t, reference)
    bound = C.error_bound(codec, t, reference, dtype=t.dtype).double()
    assert bound.shape == t.shape
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) <= C.max_abs_error(codec, t, reference, dtype=t.dtype)


def test_the_bounds_are_not_vacuous():
    """The stated bounds are close to the errors actually seen (not just large)."""
    _, t = _stack(4, torch.float32, spread=1.0)
    # bfloat16/float16: some element rounds by more than half the format's unit roundoff
    for codec, u in (("bfloat16", 2.0**-8), ("float16", 2.0**-11)):
        rel = _err(codec, t) / t.double().abs().clamp_min(1e-3)
        assert u / 2 < float(rel.max()) <= u * (1 + 1e-6)
    # delta8: the bound is scale/2 of the row (plus float32 slack) and the error gets near it
    ref, t = _stack(4, torch.float32)
    _, scale = C.encode(t, "delta8", ref)
    err = _err("delta8", t, ref)
    half_step = scale.double().unsqueeze(-1) / 2
    assert bool((err <= half_step * (1 + 1e-3) + 1e-5).all())
    assert float((err / half_step).max()) > 0.9
    assert C.max_abs_error("delta8", t, ref) <= float(half_step.max()) * 1.01 + 1e-5


@pytest.mark.parametrize("codec", ["native", "float32"])
def test_native_and_float32_of_float32_are_bit_exact(codec):
    _, t = _stack(4, torch.float32)
    out = C.decode(C.encode(t, codec), codec)
    assert out.dtype == torch.float32 and torch.equal(out, t)
    assert C.max_abs_error(codec, t) == 0.0


def test_float_codecs_decode_to_the_dtype_asked_for():
    _, t = _stack(1, torch.float32)
    parts = C.encode(t, "bfloat16")
    assert len(parts) == 1 and parts[0].dtype == torch.bfloat16
    assert C.decode(parts, "bfloat16").dtype == torch.bfloat16  # the part's own dtype by default
    assert C.decode(parts, "bfloat16", dtype=torch.float32).dtype == torch.float32
    assert torch.equal(C.decode(C.encode(t.bfloat16(), "float32"), "float32", dtype=torch.bfloat16), t.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta8_of_copies_equal_to_the_reference_decodes_to_it_exactly(dtype):
    ref, _ = _stack(1, dtype)
    t = ref.repeat(4, 1, 1)
    q, scale = C.encode(t, "delta8", ref)
    assert not q.any() and not scale.any()
    out = C.decode([q, scale], "delta8", ref)
    assert out.dtype == dtype and torch.equal(out, t)
    # a copy whose rows partly equal the reference: those rows are exact, the others are not
    t2 = t.clone()
    t2[ROWS:, 0, :] += 0.01
    out2 = C.decode(C.encode(t2, "delta8", ref), "delta8", ref)
    assert torch.equal(out2[:ROWS], ref)
    assert torch.equal(out2[ROWS:, 1:], t2[ROWS:, 1:])


def test_delta8_parts_and_bytes():
    """int8 per element plus one float32 per row: (H + 4) / (4 H) of float32, 68/256 at H = 64."""
    k = 4
    ref, t = _stack(k, torch.float32)
    parts = C.encode(t, "delta8", ref)
    q, scale = parts
    assert q.dtype == torch.int8 and q.shape == t.shape
    assert scale.dtype == torch.float32 and scale.shape == t.shape[:-1]
    assert int(q.abs().max()) == 127  # each row's largest difference maps to +-127
    n, rows = t.numel(), k * ROWS * SEQ
    assert C.encoded_nbytes(parts) == n * 1 + rows * 4
    assert C.encoded_nbytes(C.encode(t, "float32")) == n * 4
    assert C.encoded_nbytes(C.encode(t, "bfloat16")) == C.encoded_nbytes(C.encode(t, "float16")) == n * 2
    assert C.encoded_nbytes(C.encode(t, "native")) == n * 4
    assert C.encoded_nbytes(parts) / C.encoded_nbytes(C.encode(t, "float32")) == (HIDDEN + 4) / (4 * HIDDEN)


def test_delta8_without_a_reference_quantises_the_tensor_itself():
    _, t = _stack(2, torch.float32)
    d = t - t.mean()
    q, scale = C.encode(d, "delta8")
    assert torch.allclose(scale, d.abs().amax(-1) / 127)
    out = C.decode([q, scale], "delta8")
    assert out.dtype == torch.float32
    assert bool(((out - d).abs() <= C.error_bound("delta8", d)).all())


def test_delta8_decodes_in_the_reference_dtype_or_the_one_asked_for():
    ref, t = _stack(2, torch.bfloat16)
    parts = C.encode(t, "delta8", ref)
    assert C.decode(parts, "delta8", ref).dtype == torch.bfloat16
    assert C.decode(parts, "delta8", ref, dtype=torch.float32).dtype == torch.float32


def test_bad_codec_name_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match="--wire") as e:
        C.check_codec("int4")
    for name in C.CODECS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="--upload-codec"):
        C.check_codec("int4", "--upload-codec")
    assert C.check_codec("delta8") == "delta8"
    _, t = _stack(1, torch.float32)
    with pytest.raises(ValueError, match="--wire"):
        C.encode(t, "fp8")
    with pytest.raises(ValueError, match="--wire"):
        C.decode([t], "fp8")


@pytest.mark.parametrize("bad", [(ROWS, SEQ, HIDDEN + 1), (ROWS, SEQ + 1, HIDDEN), (5, SEQ, HIDDEN), (ROWS, SEQ * HIDDEN)])
def test_delta8_refuses_a_reference_of_the_wrong_shape(bad):
    ref, t = _stack(4, torch.float32)
    with pytest.raises(ValueError, match="reference"):
        C.encode(t, "delta8", torch.zeros(bad))
    parts = C.encode(t, "delta8", ref)
    with pytest.raises(ValueError, match="reference"):
        C.decode(parts, "delta8", torch.zeros(bad))


def test_other_refusals():
    _, t = _stack(1, torch.float32)
    with pytest.raises(ValueError, match="65504"):
        C.encode(t * 1e5, "float16")
    with pytest.raises(ValueError, match="floating-point"):
        C.encode(torch.arange(6), "delta8")
    with pytest.raises(ValueError, match="2 part"):
        C.decode(C.encode(t, "bfloat16"), "delta8")
    with pytest.raises(ValueError, match="expected a torch.float16"):
        C.decode(C.encode(t, "bfloat16"), "float16")
    assert torch.equal(C.decode(C.encode(torch.arange(6), "native"), "native"), torch.arange(6))


def test_delta8_keeps_a_non_finite_row_non_finite():
    """A row holding inf or nan decodes to all-nan (the receiver's loss stays non-finite, as with
    native); the other rows are untouched."""
    ref, t = _stack(2, torch.float32)
    t[0, 0, 3] = math.inf
    t[1, 2, 0] = math.nan
    out = C.decode(C.encode(t, "delta8", ref), "delta8", ref)
    assert bool(out[0, 0].isnan().all()) and bool(out[1, 2].isnan().all())
    finite = torch.ones(t.shape[:-1], dtype=torch.bool)
    finite[0, 0] = finite[1, 2] = False
    assert bool(torch.isfinite(out[finite]).all())
    assert bool(((out[finite] - t[finite]).abs() <= 0.05 * 4 / 127).all())


def test_small_differences_bf16_loses_them_delta8_keeps_them():
    """Perturbed copies h+- = h + 1e-3 noise with |h| ~ 10: bfloat16's step at 10 is 0.0625, so the
    cast erases h+ - h- (what a central difference measures); delta8 sends the difference itself."""
    g = torch.Generator().manual_seed(7)
    clean = 10 + torch.randn(ROWS, SEQ, HIDDEN, generator=g)
    plus = clean + 1e-3 * torch.randn(clean.shape, generator=g)
    minus = clean + 1e-3 * torch.randn(clean.shape, generator=g)
    t = torch.cat([plus, minus])
    true = (plus - minus).double()

    def rel_err_of_difference(codec, reference=None):
        out = C.decode(C.encode(t, codec, reference), codec, reference, dtype=torch.float32).double()
        return float((out[:ROWS] - out[ROWS:] - true).norm() / true.norm())

    assert rel_err_of_difference("bfloat16") > 0.5
    assert rel_err_of_difference("float16") > 0.1  # float16's step at 10 is 2^-7: still far too coarse
    assert rel_err_of_difference("delta8", clean) < 0.02
    assert rel_err_of_difference("float32") == 0.0
