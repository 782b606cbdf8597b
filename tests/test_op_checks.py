"""The registered ops check their own arguments: ``torch.ops.hosl.*`` called directly, bypassing
the Python API, refuses bad arguments with an error naming the argument and writes nothing; a good
direct call gives the API's result."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hosl.ops as ops
from hosl.directions.spec import split_seed, sphere_scale

hosl_ops = torch.ops.hosl
CPU = torch.device("cpu")
SEED, SEED2 = 0x0123456789ABCDEF, 77
LO, HI = split_seed(SEED)
LO2, HI2 = split_seed(SEED2)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _weights(dtype=torch.float32, sizes=(5, 33)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def _refused(exc, match, call, tensors=()):
    """``call()`` raises ``exc`` matching ``match`` and leaves every tensor of ``tensors`` bit for bit."""
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        call()
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(before, tensors)), "a refused call wrote"


# ---------------------------------------------------------------------------- randn, direction_sq_norms
@pytest.mark.parametrize("args,exc,match", [
    ((2**32, HI, 4, 0, CPU), ValueError, "key_lo"),
    ((LO, -1, 4, 0, CPU), ValueError, "key_hi"),
    ((LO, HI, -1, 0, CPU), ValueError, "numel"),
    ((LO, HI, 4, -3, CPU), ValueError, "offset"),
    ((LO, HI, 20, 2**63 - 10, CPU), ValueError, r"offset.*exceed 2\*\*63"),
    ((LO, HI, 4, 0, CPU, "uniform"), ValueError, "family"),
    ((LO, HI, 4, 0, CPU, "sphere", math.nan), ValueError, "scale"),
    ((LO, HI, 4, 0, CPU, "sphere", 1e39), ValueError, "scale"),
])
def test_randn_refuses(args, exc, match):
    _refused(exc, match, lambda: hosl_ops.randn(*args))


def test_randn_equals_api():
    for family in ("gaussian", "rademacher"):
        assert torch.equal(hosl_ops.randn(LO, HI, 77, 2**33 + 1, CPU, family),
                           ops.randn(SEED, 77, 2**33 + 1, family=family))
    norm = hosl_ops.direction_sq_norms([77], [5], LO, HI, CPU).item()
    assert torch.equal(hosl_ops.randn(LO, HI, 77, 5, CPU, "sphere", sphere_scale(77, norm)),
                       ops.randn(SEED, 77, 5, family="sphere"))


@pytest.mark.parametrize("args,match", [
    (([4, 5], [0], LO, HI, CPU), "offsets has 1 entries but tensors has 2"),
    (([-4], [0], LO, HI, CPU), r"numels\[0\]"),
    (([2**34], [0], LO, HI, CPU), r"numels\[0\].*2\*\*33"),
    (([4], [-1], LO, HI, CPU), r"offsets\[0\]"),
    (([4], [0], LO, 2**32, CPU), "key_hi"),
])
def test_direction_sq_norms_refuses(args, match):
    _refused(ValueError, match, lambda: hosl_ops.direction_sq_norms(*args))


def test_direction_sq_norms_equals_api():
    ws = _weights()
    norms = hosl_ops.direction_sq_norms([w.numel() for w in ws], [3, 40], LO, HI, CPU).tolist()
    assert [sphere_scale(w.numel(), n) for w, n in zip(ws, norms)] == ops.sphere_scales(ws, SEED, offsets=[3, 40])


# ---------------------------------------------------------------------------- perturb
def _perturb_cases():
    ws = _weights()
    out = [torch.zeros_like(w) for w in ws]
    same = _weights(sizes=(4, 4))
    base = torch.randn(10)
    good = (ws, out, [0, 5], LO, HI, 0.5)
    return ws + out + same + [base], [
        ((ws[:1] + [torch.arange(4)], out, [0, 5], LO, HI, 0.5), TypeError, r"tensors\[1\] has dtype torch.int64"),
        (([ws[0], torch.randn(6, 6).t()], out, [0, 5], LO, HI, 0.5), ValueError, r"tensors\[1\] is not contiguous"),
        (([base[:6], base[4:]], out, [0, 6], LO, HI, 0.5), ValueError, r"tensors\[0\] and tensors\[1\] share memory"),
        ((ws, out[:1], [0, 5], LO, HI, 0.5), ValueError, "out has 1 tensors but tensors has 2"),
        ((ws, [out[0], torch.zeros(4)], [0, 5], LO, HI, 0.5), ValueError, r"out\[1\] is torch.float32\[4\]"),
        ((same, [same[1], torch.zeros(4)], [0, 4], LO, HI, 0.5), ValueError, r"out\[0\] overlaps tensors\[1\]"),
        ((ws, out, [0], LO, HI, 0.5), ValueError, "offsets has 1 entries but tensors has 2"),
        ((ws, out, [0, -5], LO, HI, 0.5), ValueError, r"offsets\[1\] must be >= 0"),
        ((ws, out, [0, 2**63 - 10], LO, HI, 0.5), ValueError, r"offsets\[1\].*exceed 2\*\*63"),
        ((ws, out, [0, 5], 2**32, HI, 0.5), ValueError, "key_lo"),
        ((ws, out, [0, 5], LO, HI, math.inf), ValueError, "scale"),
        ((*good, "uniform"), ValueError, "family"),
        ((*good, "sphere"), ValueError, "dir_scales is None; family='sphere' needs 2"),
        ((*good, "sphere", [1.0]), ValueError, "dir_scales is 1 entries"),
        ((*good, "sphere", [1.0, math.nan]), ValueError, r"dir_scales\[1\]"),
        ((*good, "gaussian", [1.0, 1.0]), ValueError, "dir_scales is only for a family with a per-tensor factor"),
        (([], [], [], LO, HI, 0.5), ValueError, "tensors is empty"),
    ]


@pytest.mark.parametrize("case", range(len(_perturb_cases()[1])))
def test_perturb_refuses_and_writes_nothing(case):
    tensors, cases = _perturb_cases()
    args, exc, match = cases[case]
    _refused(exc, match, lambda: hosl_ops.perturb(*args), tensors)


@pytest.mark.parametrize("family", ["gaussian", "rademacher", "sphere"])
def test_perturb_equals_api(family):
    ws = _weights(torch.bfloat16)
    out = [torch.empty_like(w) for w in ws]
    scales = ops.sphere_scales(ws, SEED, offset=9) if family == "sphere" else None
    hosl_ops.perturb(ws, out, [9, 14], LO, HI, 0.5, family, scales)
    want = ops.perturb_([w.clone() for w in ws], SEED, 0.5, offset=9, family=family)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(out, want))


# ---------------------------------------------------------------------------- zo_update_
def _zo_cases():
    ws = _weights()
    keys = ([LO, LO2], [HI, HI2])
    return ws, [
        (([ws[0], torch.arange(4)], [0, 5], *keys, [1.0, 2.0], 0.0), TypeError, r"tensors\[1\] has dtype"),
        (([ws[0], ws[0]], [0, 5], *keys, [1.0, 2.0], 0.0), ValueError, "share memory"),
        ((ws, [0], *keys, [1.0, 2.0], 0.0), ValueError, "offsets has 1 entries"),
        ((ws, [0, 5], [LO], [HI, HI2], [1.0, 2.0], 0.0), ValueError, "keys_lo has 1 entries but coeffs has 2"),
        ((ws, [0, 5], [LO, LO2], [HI, 2**32], [1.0, 2.0], 0.0), ValueError, r"keys_hi\[1\]"),
        ((ws, [0, 5], *keys, [1.0, math.inf], 0.0), ValueError, r"coeffs\[1\]"),
        ((ws, [0, 5], *keys, [1.0, 2.0], math.nan), ValueError, "decay"),
        ((ws, [0, 5], *keys, [1e38, 1e38], 0.0), ValueError, "the update would write inf"),
        ((ws, [0, 5], *keys, [1.0, 2.0], 0.0, "sphere", [1.0, 1.0]), ValueError, "needs 4 factors"),
        ((ws, [0, 5], *keys, [1.0, 2.0], 0.0, "rademacher", [1.0] * 4), ValueError, "dir_scales is only for"),
    ]


@pytest.mark.parametrize("case", range(len(_zo_cases()[1])))
def test_zo_update_refuses_and_writes_nothing(case):
    tensors, cases = _zo_cases()
    args, exc, match = cases[case]
    _refused(exc, match, lambda: hosl_ops.zo_update_(*args), tensors)


def test_zo_update_refuses_a_step_that_overflows_fp16():
    """fp16 tops out at 65504: a coefficient of 2e4 times the Gaussian |z| bound (5.8) cannot fit,
    through the op or the API; Rademacher's bound (1) lets the same coefficient through."""
    ws = _weights(torch.float16)
    _refused(ValueError, r"torch.float16's largest value .* tensors\[0\]",
             lambda: hosl_ops.zo_update_(ws, [0, 5], [LO], [HI], [2e4], 0.0), ws)
    _refused(ValueError, "the update would write inf", lambda: ops.zo_update_(ws, [SEED], [2e4], lr=1.0), ws)
    hosl_ops.zo_update_(ws, [0, 5], [LO], [HI], [2e4], 0.0, "rademacher")
    assert all(torch.isfinite(w).all() for w in ws)


@pytest.mark.parametrize("family", ["gaussian", "rademacher", "sphere"])
def test_zo_update_equals_api(family):
    ws = _weights(torch.float16)
    want = [w.clone() for w in ws]
    lr, coeffs, wd = 0.1, [1.0, -0.5], 0.01
    scales = [ops.sphere_scales(ws, s, offset=3) for s in (SEED, SEED2)] if family == "sphere" else None
    flat = None if scales is None else [f for row in scales for f in row]
    scaled = [float(torch.tensor(lr * c, dtype=torch.float32)) for c in coeffs]
    decay = float(torch.tensor(lr * wd, dtype=torch.float32))
    hosl_ops.zo_update_(ws, [3, 8], [LO, LO2], [HI, HI2], scaled, decay, family, flat)
    ops.zo_update_(want, [SEED, SEED2], coeffs, lr=lr, weight_decay=wd, offset=3, family=family)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ws, want))


# ---------------------------------------------------------------------------- perturbed_linear / _embedding
def _linear_args(**changes):
    """The op's arguments for x [3, 4], W [5, 4], b [5], two directions; ``changes`` replaces some."""
    g = torch.Generator().manual_seed(1)
    args = dict(x=torch.randn(3, 4, generator=g), weight=torch.randn(5, 4, generator=g),
                bias=torch.randn(5, generator=g), w_offset=7, b_offset=27, keys_lo=[LO, LO2], keys_hi=[HI, HI2],
                scales=[0.5, -0.25], shared_x=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,exc,match", [
    (dict(x=torch.randn(3, 4, dtype=torch.float16)), TypeError, "share a dtype"),
    (dict(weight=torch.randn(4, 5).t()), ValueError, r"weight/bias\[0\] is not contiguous"),
    (dict(weight=torch.randn(20)), ValueError, r"weight must be \[out, in\]"),
    (dict(x=torch.randn(3, 6)), ValueError, "in_features=4"),
    (dict(x=torch.randn(2, 3, 4)), ValueError, "x must have 2 dimensions"),
    (dict(x=torch.randn(3, 3, 4), shared_x=False), ValueError, "first D=2"),
    (dict(x=torch.randn(4, 3).t()), ValueError, "x is not contiguous"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must be \[5\]"),
    (dict(bias=None), ValueError, "b_offset is given but bias is None"),
    (dict(w_offset=-1), ValueError, "w_offset"),
    (dict(b_offset=2**63 - 2), ValueError, r"b_offset.*exceed 2\*\*63"),
    (dict(keys_hi=[HI]), ValueError, "keys_hi has 1 entries but scales has 2"),
    (dict(scales=[0.5, math.nan]), ValueError, r"scales\[1\]"),
    (dict(family="uniform"), ValueError, "family"),
    (dict(family="sphere"), ValueError, "factors is None; family='sphere' needs 4"),
    (dict(factors=[1.0] * 4), ValueError, "factors is only for"),
])
def test_perturbed_linear_refuses(changes, exc, match):
    args = _linear_args(**changes)
    tensors = [t for t in (args["x"], args["weight"], args["bias"]) if t is not None]
    _refused(exc, match, lambda: hosl_ops.perturbed_linear(**args), tensors)


@pytest.mark.parametrize("family", ["gaussian", "sphere"])
def test_perturbed_linear_equals_api(family):
    a = _linear_args(family=family)
    seeds = [SEED, SEED2]
    factors = None
    if family == "sphere":
        rows = [ops.sphere_scales([a["weight"], a["bias"]], s, offsets=[7, 27]) for s in seeds]
        factors = [f for row in rows for f in row]
    got = hosl_ops.perturbed_linear(**a, factors=factors)
    want = ops.perturbed_linear(a["x"], a["weight"], a["bias"], seeds=seeds, scales=a["scales"], weight_offset=7,
                                bias_offset=27, family=family)
    assert torch.equal(got, want)


def _embedding_args(**changes):
    g = torch.Generator().manual_seed(2)
    args = dict(ids=torch.tensor([0, 4, 2, 4]), weight=torch.randn(6, 3, generator=g), w_offset=11,
                keys_lo=[LO, LO2], keys_hi=[HI, HI2], scales=[0.5, -0.25], shared_ids=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,exc,match", [
    (dict(ids=torch.tensor([0, 4], dtype=torch.int32)), TypeError, "ids must be int64"),
    (dict(ids=torch.tensor([[0, 4]])), ValueError, "ids must have 1 dimensions"),
    (dict(ids=torch.tensor([[0, 4]] * 3), shared_ids=False), ValueError, "first D=2"),
    (dict(weight=torch.randn(18)), ValueError, "weight must be"),
    (dict(weight=torch.randn(6, 3, dtype=torch.float64)), TypeError, r"weight\[0\] has dtype torch.float64"),
    (dict(w_offset=2**63 - 5), ValueError, r"w_offset.*exceed 2\*\*63"),
    (dict(keys_lo=[LO, 2**33]), ValueError, r"keys_lo\[1\]"),
    (dict(scales=[0.5]), ValueError, "keys_lo has 2 entries but scales has 1"),
    (dict(family="sphere", factors=[1.0]), ValueError, "needs 2 factors"),
])
def test_perturbed_embedding_refuses(changes, exc, match):
    args = _embedding_args(**changes)
    _refused(exc, match, lambda: hosl_ops.perturbed_embedding(**args), [args["ids"], args["weight"]])


@pytest.mark.parametrize("family", ["gaussian", "sphere"])
def test_perturbed_embedding_equals_api(family):
    a = _embedding_args(family=family)
    seeds = [SEED, SEED2]
    factors = [ops.sphere_scales(a["weight"], s, offset=11)[0] for s in seeds] if family == "sphere" else None
    got = hosl_ops.perturbed_embedding(**a, factors=factors)
    want = ops.perturbed_embedding(a["ids"], a["weight"], seeds=seeds, scales=a["scales"], offset=11, family=family)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- every kernel, and the fakes
def test_every_backend_kernel_checks():
    """The checks run in the kernel whichever backend it dispatches to."""
    for backend in ops.available_backends():
        with ops.use_backend(backend):
            ws = _weights()
            _refused(ValueError, "offsets has 1 entries", lambda: hosl_ops.perturb(ws, ws, [0], LO, HI, 0.5), ws)


def test_fakes_check_shapes_and_lists():
    """Fake tensors (torch.compile's tracing) meet the same checks, all but the memory ones."""
    with FakeTensorMode():
        x, w = torch.empty(3, 6), torch.empty(5, 4)
        with pytest.raises(ValueError, match="in_features=4"):
            hosl_ops.perturbed_linear(x, w, None, 0, None, [LO], [HI], [0.5], True)
        with pytest.raises(ValueError, match="keys_lo has 1 entries but coeffs has 2"):
            hosl_ops.zo_update_([w], [0], [LO], [HI, HI2], [1.0, 2.0], 0.0)
        with pytest.raises(ValueError, match="out has 0 tensors"):
            hosl_ops.perturb([w], [], [0], LO, HI, 0.5)
        assert hosl_ops.perturbed_embedding(torch.empty(4, dtype=torch.int64), w, 0, [LO], [HI], [0.5],
                                            True).shape == (1, 4, 4)


def test_mixed_devices_refused():
    ws = [torch.randn(4), torch.randn(4, device="meta")]
    _refused(ValueError, "one device", lambda: hosl_ops.perturb(ws, ws, [0, 4], LO, HI, 0.5), ws[:1])
