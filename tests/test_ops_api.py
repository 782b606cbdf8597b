"""The public ops surface: semantics, backend selection and argument checking."""

import math

import numpy as np
import pytest
import torch

import hosl.ops as ops
from hosl.directions.spec import randn_reference

BACKENDS_HERE = [b for b in ops.available_backends() if b != "reference"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _weights(dtype=torch.float32, sizes=(5, 33, 1, 130)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def _snapshot(tensors):
    return [t.clone() for t in tensors]


def _unchanged(before, after):
    return all(torch.equal(_bits(a), _bits(b)) for a, b in zip(before, after))


# ---------------------------------------------------------------------------- semantics
def test_list_coordinates_are_consecutive_from_offset():
    ws = _weights()
    out = [torch.empty_like(w) for w in ws]
    ops.perturb_(ws, seed=9, scale=1.0, out=out, offset=17, backend="reference")
    z = randn_reference(9, sum(w.numel() for w in ws), 17)
    expected = torch.cat([w.reshape(-1) for w in ws]) + z
    assert torch.equal(torch.cat([o.reshape(-1) for o in out]), expected)


def test_perturb_into_out_leaves_weights_untouched():
    ws = _weights(torch.bfloat16)
    before = _snapshot(ws)
    out = [torch.empty_like(w) for w in ws]
    returned = ops.perturb_(ws, 1, 1e-3, out=out)
    assert all(r is o for r, o in zip(returned, out))
    assert _unchanged(before, ws)
    assert not _unchanged(before, out)


def test_zo_update_formula_float32():
    w = torch.linspace(-1, 1, 101)
    seeds, coeffs, lr, wd = [3, 2**64 - 1, 0], [0.5, -2.0, 1.25], 1e-2, 0.1
    expected = w - torch.tensor(np.float32(lr * wd)) * w
    for s, c in zip(seeds, coeffs):
        expected = expected - torch.tensor(np.float32(lr * c)) * randn_reference(s, 101)
    ops.zo_update_([w], seeds, coeffs, lr=lr, weight_decay=wd)
    assert torch.equal(w, expected)


def test_zo_update_with_lr_zero_changes_nothing():
    ws = _weights(torch.float16)
    before = _snapshot(ws)
    ops.zo_update_(ws, [1, 2], [3.0, 4.0], lr=0.0, weight_decay=0.5)
    assert _unchanged(before, ws)


def test_randn_matches_spec():
    assert torch.equal(ops.randn(2**64 - 1, 77, 2**33 + 1), randn_reference(2**64 - 1, 77, 2**33 + 1))


def test_reference_is_always_available():
    assert "reference" in ops.available_backends()
    assert set(ops.available_backends()) <= set(ops.BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_backend_matches_reference_through_public_api(backend, dtype):
    ws = _weights(dtype)
    ref = _snapshot(ws)
    ops.perturb_(ws, 2**64 - 1, 0.5, offset=2**32 + 3, backend=backend)
    ops.perturb_(ref, 2**64 - 1, 0.5, offset=2**32 + 3, backend="reference")
    assert _unchanged(ref, ws)
    ops.zo_update_(ws, [0, 5], [1.0, -0.5], lr=0.1, weight_decay=0.01, backend=backend)
    ops.zo_update_(ref, [0, 5], [1.0, -0.5], lr=0.1, weight_decay=0.01, backend="reference")
    assert _unchanged(ref, ws)
    assert torch.equal(ops.randn(4, 1001, 7, backend=backend), ops.randn(4, 1001, 7, backend="reference"))


# ---------------------------------------------------------------------------- bad input
def _expect_error(exc, match, call, tensors):
    before = _snapshot(tensors)
    with pytest.raises(exc, match=match):
        call()
    assert _unchanged(before, tensors), "a rejected call changed a tensor"


def test_integer_tensor_rejected():
    ws = [torch.zeros(4), torch.arange(4)]
    _expect_error(TypeError, r"tensors\[1\] has dtype torch.int64", lambda: ops.perturb_(ws, 0, 1.0), ws)


def test_strided_tensor_rejected():
    base = torch.randn(8, 8)
    ws = [torch.randn(3), base.t()]
    _expect_error(ValueError, r"tensors\[1\] is not contiguous", lambda: ops.zo_update_(ws, [1], [1.0], lr=1.0), ws)


def test_overlapping_tensors_rejected():
    base = torch.randn(10)
    ws = [base[:6], base[4:]]
    _expect_error(ValueError, "share memory", lambda: ops.perturb_(ws, 0, 1.0), ws)
    same = [base, base]
    _expect_error(ValueError, "share memory", lambda: ops.zo_update_(same, [0], [1.0], lr=1.0), same)


def test_out_overlapping_another_input_rejected():
    ws = [torch.randn(4), torch.randn(4)]
    _expect_error(ValueError, r"out\[0\] overlaps tensors\[1\]", lambda: ops.perturb_(ws, 0, 1.0, out=[ws[1], torch.empty(4)]), ws)


def test_out_shape_and_length_checked():
    ws = [torch.randn(4), torch.randn(5)]
    _expect_error(ValueError, "out has 1 tensors", lambda: ops.perturb_(ws, 0, 1.0, out=[torch.empty(4)]), ws)
    _expect_error(ValueError, r"out\[1\] is torch.float32\[6\]", lambda: ops.perturb_(ws, 0, 1.0, out=[torch.empty(4), torch.empty(6)]), ws)


def test_mixed_devices_rejected():
    ws = [torch.randn(4), torch.randn(4, device="meta")]
    with pytest.raises(ValueError, match="one device"):
        ops.perturb_(ws, 0, 1.0)


@pytest.mark.parametrize("seed,exc", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)])
def test_seed_out_of_range_rejected(seed, exc):
    ws = _weights()
    _expect_error(exc, "seed", lambda: ops.perturb_(ws, seed, 1.0), ws)
    _expect_error(exc, r"seeds\[1\]", lambda: ops.zo_update_(ws, [0, seed], [1.0, 1.0], lr=1.0), ws)
    with pytest.raises(exc, match="seed"):
        ops.randn(seed, 4)


def test_seed_and_coeff_lengths_must_agree():
    ws = _weights()
    _expect_error(ValueError, "seeds has 2 entries but coeffs has 1", lambda: ops.zo_update_(ws, [1, 2], [1.0], lr=1.0), ws)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39])
def test_non_finite_scalars_rejected(bad):
    ws = _weights()
    _expect_error(ValueError, "scale", lambda: ops.perturb_(ws, 0, bad), ws)
    _expect_error(ValueError, "lr", lambda: ops.zo_update_(ws, [0], [1.0], lr=bad), ws)
    _expect_error(ValueError, r"coeffs\[0\]", lambda: ops.zo_update_(ws, [0], [bad], lr=1.0), ws)
    _expect_error(ValueError, "weight_decay", lambda: ops.zo_update_(ws, [0], [1.0], lr=1.0, weight_decay=bad), ws)


def test_update_overflowing_float32_rejected():
    ws = _weights()
    _expect_error(ValueError, r"lr\*coeffs\[0\]", lambda: ops.zo_update_(ws, [0], [1e30], lr=1e30), ws)


def test_unknown_backend_and_coordinate_overflow():
    ws = _weights()
    _expect_error(ValueError, "backend must be one of", lambda: ops.perturb_(ws, 0, 1.0, backend="tpu"), ws)
    _expect_error(ValueError, "exceed 2\\*\\*63", lambda: ops.perturb_(ws, 0, 1.0, offset=2**63 - 10), ws)
    _expect_error(ValueError, "offset must be >= 0", lambda: ops.perturb_(ws, 0, 1.0, offset=-1), ws)


def test_non_tensor_arguments_rejected():
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a torch.Tensor"):
        ops.perturb_([np.zeros(3)], 0, 1.0)
    with pytest.raises(TypeError, match="tensors must be a tensor or a list"):
        ops.perturb_({"a": torch.zeros(3)}, 0, 1.0)


def test_explicit_offsets_place_tensors_anywhere():
    ws = _weights(sizes=(3, 4))
    out = [torch.empty_like(w) for w in ws]
    ops.perturb_(ws, 2, 1.0, out=out, offsets=[100, 7])
    assert torch.equal(out[0], ws[0] + randn_reference(2, 3, 100))
    assert torch.equal(out[1], ws[1] + randn_reference(2, 4, 7))
    _expect_error(ValueError, "offsets has 1 entries", lambda: ops.perturb_(ws, 0, 1.0, offsets=[0]), ws)
    _expect_error(ValueError, "either offset or offsets", lambda: ops.perturb_(ws, 0, 1.0, offset=3, offsets=[0, 5]), ws)
