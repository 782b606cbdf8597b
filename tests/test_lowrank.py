"""The ``"lowrank"`` direction family: spec, backends, fast forwards, update, optimizer options.

* spec: ``lowrank_reference`` equals an independent loop (``U``/``V`` from the Gaussian spec, the
  sum over ``r`` in order with numpy float32 scalars) and the example values in docs/directions.md;
* every backend (cpu, triton interpreted, cuda on a GPU) gives the reference's bits for ``randn``,
  ``perturb_`` and ``zo_update_``; vectors get the Gaussian z; a rank too large is refused;
* the fused forwards (``x W^T + s c_R (x V) U^T``, the embedding's rank-R rows), sequential and
  batched, equal the scratch path's forward at the materialised ``W + s z`` (tolerance);
* the optimizer's rank-``Q*R`` GEMM update equals the reference update (tolerance), and the finite
  guard still refuses an update that would write inf;
* ``resample_every``: U's seeds follow the K-step windows.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hosl import ops
from hosl.directions import families
from hosl.directions.spec import lowrank_factor, lowrank_reference, randn_reference
from hosl.forward.layout import LowRankSeeds, ParameterLayout
from hosl.optim import rules
from hosl.optim.lowrank_update import lowrank_sgd

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

SHAPES_RANKS = [((8, 6), 1), ((8, 6), 3), ((5, 17), 2), ((33, 9), 4), ((2, 2), 1)]


def _loop_lowrank(seed: int, m: int, n: int, offset: int, rank: int) -> np.ndarray:
    """z of an m x n tensor by the spec's words, one scalar at a time in numpy float32."""
    u = randn_reference(seed, m * rank, offset).numpy().reshape(m, rank)
    v = randn_reference(seed, n * rank, offset + m * rank).numpy().reshape(n, rank)
    c = np.float32(1.0 / np.sqrt(np.float64(rank)))
    z = np.empty((m, n), dtype=np.float32)
    for i in range(m):
        for j in range(n):
            acc = np.float32(u[i, 0] * v[j, 0])
            for r in range(1, rank):
                acc = np.float32(acc + np.float32(u[i, r] * v[j, r]))
            z[i, j] = np.float32(acc * c)
    return z


@pytest.mark.parametrize("shape,rank", SHAPES_RANKS)
def test_the_reference_is_the_loop_of_the_spec(shape, rank):
    want = _loop_lowrank(987654321, *shape, 41, rank)
    got = lowrank_reference(987654321, shape, 41, rank).numpy()
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_the_documented_example_values():
    """docs/directions.md lists z of seed 1, a 3 x 4 tensor at offset 0, rank 2: the loop's values."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "directions.md").read_text()
    line = re.search(r"lowrank example: seed 1, shape \(3, 4\), offset 0, rank 2, first row: ([^\n]+)", text)
    assert line, "docs/directions.md lost its lowrank example line"
    documented = [float(v) for v in line.group(1).strip().strip("`").split(",")]
    want = _loop_lowrank(1, 3, 4, 0, 2)[0]
    assert documented == [float(f"{v:.7g}") for v in want]


def test_vectors_and_other_shapes_keep_the_gaussian_direction():
    for shape in [(7,), (2, 3, 4), ()]:
        numel = int(np.prod(shape))
        got = lowrank_reference(5, shape, 9, 2).reshape(-1)
        assert torch.equal(got, randn_reference(5, numel, 9))


def test_the_factor_is_float32_of_one_over_sqrt_r():
    assert [lowrank_factor(r) for r in (1, 4, 16)] == [1.0, 0.5, 0.25]
    assert lowrank_factor(2) == float(np.float32(2 ** -0.5))


# -- backends ---------------------------------------------------------------------------------------
def _cases() -> list[tuple[str, str]]:
    out = []
    for name in ("cpu", "triton", "cuda", "reference"):
        module = importlib.import_module(f"hosl.ops.backends.{name}")
        for device in module.DEVICE_TYPES:
            if name == "reference" and device == "cpu":
                continue
            out.append((name, device))
    return out


def _skip_unless_available(backend, device):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} not available here: {ops.unavailable_reasons().get(backend, '')}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _weights(dtype, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(*s, generator=g) * 0.05).to(dtype).to(device) for s in [(8, 6), (5,), (33, 9), (2, 3, 4)]]


OFFSETS = [0, 48, 2**40 + 3, 400]


@pytest.mark.parametrize("backend,device", _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_gives_the_reference_bits(backend, device, dtype):
    _skip_unless_available(backend, device)
    rank, seeds = 2, [7, 2**64 - 1, 12345]
    for shape, r in SHAPES_RANKS:
        numel = int(np.prod(shape))
        got = ops.randn(99, numel, 17, family="lowrank", rank=r, shape=shape, device=device, backend=backend)
        assert torch.equal(_bits(got), _bits(lowrank_reference(99, shape, 17, r).reshape(-1))), (shape, r)
    ref = _weights(dtype)
    ops.perturb_(ref, seeds[0], 1e-2, offsets=OFFSETS, family="lowrank", rank=rank, backend="reference")
    mine = _weights(dtype, device)
    ops.perturb_(mine, seeds[0], 1e-2, offsets=OFFSETS, family="lowrank", rank=rank, backend=backend)
    for a, b in zip(mine, ref):
        assert torch.equal(_bits(a), _bits(b))
    ref = _weights(dtype)
    ops.zo_update_(ref, seeds, [0.5, -2.0, 1.0], lr=1e-3, weight_decay=0.1, offsets=OFFSETS, family="lowrank",
                   rank=rank, u_seeds=[1, 2, 3], backend="reference")
    mine = _weights(dtype, device)
    ops.zo_update_(mine, seeds, [0.5, -2.0, 1.0], lr=1e-3, weight_decay=0.1, offsets=OFFSETS, family="lowrank",
                   rank=rank, u_seeds=[1, 2, 3], backend=backend)
    for a, b in zip(mine, ref):
        assert torch.equal(_bits(a), _bits(b))


def test_the_reference_update_is_the_materialised_directions():
    w = _weights(torch.float32)
    want = [t.clone() for t in w]
    ops.zo_update_(w, [4, 5], [1.0, -3.0], lr=0.1, offsets=OFFSETS, family="lowrank", rank=2, backend="cpu")
    for t, o in zip(want, OFFSETS):
        acc = t.reshape(-1)
        for seed, c in ((4, 1.0), (5, -3.0)):
            acc = acc - torch.tensor(0.1 * c, dtype=torch.float32) * lowrank_reference(seed, t.shape, o, 2).reshape(-1)
        t.copy_(acc.view_as(t))
    for a, b in zip(w, want):
        assert torch.equal(a, b)


def test_a_rank_too_large_is_refused_and_changes_nothing():
    w = _weights(torch.float32)
    before = [t.clone() for t in w]
    with pytest.raises(ValueError, match=r"rank=4 is too large for tensors\[0\] of shape \(8, 6\).*rank <= 3"):
        ops.perturb_(w, 1, 0.1, offsets=OFFSETS, family="lowrank", rank=4)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        ops.zo_update_(w, [1], [1.0], lr=0.1, offsets=OFFSETS, family="lowrank")
    with pytest.raises(ValueError, match="rank is only for family='lowrank'"):
        ops.perturb_(w, 1, 0.1, offsets=OFFSETS, rank=2)
    with pytest.raises(ValueError, match="u_seeds is only for family='lowrank'"):
        ops.perturbed_linear(torch.ones(2, 6), w[0], seeds=[1], scales=[0.1], weight_offset=0, u_seeds=[2])
    with pytest.raises(ValueError, match="rank=9 is too large for weight of shape \\(8, 6\\)"):
        ops.perturbed_linear(torch.ones(2, 6), w[0], seeds=[1], scales=[0.1], weight_offset=0, family="lowrank",
                             rank=9)
    assert all(torch.equal(a, b) for a, b in zip(w, before))
    assert families.FAMILIES["lowrank"].code is None and "lowrank" not in families.FAMILY_CODES


# -- forwards ---------------------------------------------------------------------------------------
def test_the_fused_linear_and_embedding_equal_the_materialised_weight():
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(12, 10, generator=g), torch.randn(12, generator=g), torch.randn(3, 5, 10, generator=g)
    seeds, scales = [11, 22, 33], [0.1, -0.2, 0.3]
    y = ops.perturbed_linear(x, w, b, seeds=seeds, scales=scales, weight_offset=100, bias_offset=7,
                             per_direction_input=True, family="lowrank", rank=3)
    shared = ops.perturbed_linear(x[0], w, b, seeds=seeds, scales=scales, weight_offset=100, bias_offset=7,
                                  family="lowrank", rank=3)
    table, ids = torch.randn(30, 8, generator=g), torch.randint(0, 30, (3, 6), generator=g)
    rows = ops.perturbed_embedding(ids, table, seeds=seeds, scales=scales, offset=3, per_direction_input=True,
                                   family="lowrank", rank=2)
    for d, (seed, scale) in enumerate(zip(seeds, scales)):
        wp, bp, tp = w.clone(), b.clone(), table.clone()
        ops.perturb_([wp, bp], seed, scale, offsets=[100, 7], family="lowrank", rank=3)
        torch.testing.assert_close(y[d], x[d] @ wp.T + bp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared[d], x[0] @ wp.T + bp, rtol=1e-5, atol=1e-5)
        ops.perturb_([tp], seed, scale, offsets=[3], family="lowrank", rank=2)
        torch.testing.assert_close(rows[d], tp[ids[d]], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_client():
    pytest.importorskip("transformers")
    from hosl.models import load_model, split

    model, _ = load_model("tiny-opt", "causal_lm")
    client, _ = split(model, cut=2)
    return client.eval()


def _batch():
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones(2, 7, dtype=torch.long)


def test_the_sequential_and_batched_forwards_equal_the_scratch_forward(tiny_client):
    from hosl.forward.batched import BatchedPerturber
    from hosl.forward.fused import FusedPerturber
    from hosl.forward.scratch import ModuleScratchPerturber

    layout = ParameterLayout(tiny_client)
    lowrank = LowRankSeeds(2)
    lowrank.u_seeds = {11: 5}  # one direction with a U of another seed
    points = [(11, 1e-2), (11, -1e-2), (2**64 - 5, 1e-2)]
    ids, mask = _batch()
    before = [p.detach().clone() for p in tiny_client.parameters()]
    scratch = ModuleScratchPerturber(tiny_client, layout, direction="lowrank", lowrank=lowrank)
    fused = FusedPerturber(tiny_client, layout, direction="lowrank", lowrank=lowrank, fused_backend=None)
    want, seq = [], []
    for seed, scale in points:
        with scratch.perturbed(seed, scale):
            want.append(tiny_client(ids, mask))
        with fused.perturbed(seed, scale):
            seq.append(tiny_client(ids, mask))
    batched = BatchedPerturber(tiny_client, layout, direction="lowrank", lowrank=lowrank)
    with batched.perturbed(points):
        got = tiny_client(ids, mask)
    with torch.no_grad():
        clean = tiny_client(ids, mask)
    for d, w in enumerate(want):
        assert float((w - clean).norm() / clean.norm()) > 1e-4  # the perturbation shows
        for name, g in (("sequential", seq[d]), ("batched", got[2 * d: 2 * d + 2])):
            rel = float((g - w).norm() / w.norm())
            assert rel < 2e-5, f"{name} copy {d}: relative error {rel:.2e}"
    assert all(torch.equal(a, b) for a, b in zip(tiny_client.parameters(), before))


# -- update -----------------------------------------------------------------------------------------
def test_the_gemm_update_equals_the_reference_update(tiny_client):
    import copy

    client = copy.deepcopy(tiny_client)
    layout = ParameterLayout(client)
    seeds, grads, u_seeds = [3, 4, 2**63 + 9], [0.7, -1.3, 2.0], [3, 8, 9]
    reference = [p.detach().clone() for p in layout.params()]
    decayed, plain = layout.groups()
    for slots, wd in ((decayed, 0.1), (plain, 0.0)):
        tensors = [reference[layout.index[id(s.param)]] for s in slots]
        ops.zo_update_(tensors, seeds, [g / 3 for g in grads], lr=1e-2, weight_decay=wd,
                       offsets=[s.offset for s in slots], family="lowrank", rank=2, u_seeds=u_seeds)
    start = [p.detach().clone() for p in layout.params()]
    lowrank_sgd(layout, seeds, grads, lr=1e-2, weight_decay=0.1, rank=2, u_seeds=u_seeds)
    for slot, want, w0 in zip(layout.slots, reference, start):
        got = slot.param.detach()
        step = (want - w0).abs().max()
        assert step > 0, slot.name
        # GEMM order against the reference's in-order sum: within a few float32 ulps of the weights
        torch.testing.assert_close(got, want, rtol=0, atol=float(w0.abs().max()) * 2**-21 + float(step) * 1e-5,
                                   msg=slot.name)


def test_the_finite_guard_refuses_an_update_that_would_write_inf():
    layer = torch.nn.Linear(16, 16).half()
    layout = ParameterLayout(layer)
    hyper = dict(lr=1.0, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.999), adam_eps=1e-8)
    # |z| can reach sqrt(R) * 5.8**2 ~ 67 at rank 4: a step of 1000 * 67 is beyond fp16's 65504
    assert not rules.update_is_safe("sgd", layout, [1000.0], {}, direction="lowrank", rank=4, **hyper)
    assert rules.update_is_safe("sgd", layout, [1.0], {}, direction="lowrank", rank=4, **hyper)
    with pytest.raises(ValueError, match="would write inf"):
        ops.zo_update_([layer.weight.data], [1], [1000.0], lr=1.0, family="lowrank", rank=4)


# -- the optimizer ----------------------------------------------------------------------------------
def test_the_optimizer_names_the_tensor_whose_shape_refuses_the_rank(tiny_client):
    import hosl

    with pytest.raises(ValueError, match=r"rank=99 is too large for parameter .* of shape"):
        hosl.ZerothOrderOptimizer(tiny_client, direction="lowrank", rank=99)
    with pytest.raises(ValueError, match="rank must be > 0"):
        hosl.optim.config.ZOConfig(direction="lowrank", rank=0)


def test_resample_every_keeps_u_for_k_steps(tiny_client):
    import copy

    import hosl

    client = copy.deepcopy(tiny_client)
    ids, mask = _batch()
    opt = hosl.ZerothOrderOptimizer(client, direction="lowrank", rank=2, resample_every=2, num_queries=2,
                                    lr=1e-3)
    seen, saved = [], None
    for _ in range(3):
        opt.step(lambda: client(ids, mask).float().pow(2).mean())
        seen.append((list(opt.last_seeds), dict(opt.lowrank.u_seeds)))
        saved = saved or copy.deepcopy(opt.state_dict())
    (s0, u0), (s1, u1), (s2, u2) = seen
    assert u0 == dict(zip(s0, s0)) and u1 == dict(zip(s1, s0)) and u2 == dict(zip(s2, s2))
    assert s1 != s0 and s2 != s1
    # a resumed optimizer keeps the window's U seeds
    resumed = hosl.ZerothOrderOptimizer(client, direction="lowrank", rank=2, resample_every=2, num_queries=2, lr=1e-3)
    resumed.load_state_dict(saved)
    resumed.step(lambda: client(ids, mask).float().pow(2).mean())
    assert resumed.last_seeds == s1 and resumed.lowrank.u_seeds == u1


@pytest.mark.slow
def test_hosl_train_with_lowrank_directions_trains_the_client(tmp_path):
    """``hosl train --direction lowrank --direction-rank 2 --query-batch 2``: finite losses, the client moved."""
    import json

    from safetensors.torch import load_file
    from test_cli import DATA, _args, _losses, _start_halves

    from hosl.cli import main

    if not (DATA / "sst2" / "train.tsv").exists():
        pytest.skip(f"no task data at {DATA}")
    run = tmp_path / "run"
    assert main(_args(run, "--direction", "lowrank", "--direction-rank", "2", "--query-batch", "2", steps=2)) == 0
    losses = _losses(run)
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert json.loads((run / "summary.json").read_text())["skipped_updates"] == 0
    start_client, _ = _start_halves()
    saved = load_file(str(run / "checkpoints" / "step-2" / "client.safetensors"))
    moved = [k for k in saved if not torch.equal(saved[k], start_client[k])]
    assert any(k.endswith("weight") and saved[k].ndim == 2 for k in moved) and any(k.endswith("bias") for k in moved)
