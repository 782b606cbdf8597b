"""``query_batch``: D perturbed points in one client forward equal D sequential perturbed forwards.

Tiny OPT / Llama clients (cut 2). The batched path (``BatchedPerturber``) through the fused Triton
ops (interpreted) and through the CPU materialising ops, against the scratch path one point at a
time: activations within matmul tolerance for every direction family, dtype and D in {1, 2, 3, 2Q};
the weights bit-identical afterwards; a whole optimizer step batched vs sequential.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import hosl  # noqa: E402
from hosl.models import load_model, split  # noqa: E402
from hosl.forward.batched import BatchedPerturber, repeat_batch  # noqa: E402
from hosl.forward.layout import ParameterLayout, SphereScales  # noqa: E402
from hosl.forward.scratch import ModuleScratchPerturber  # noqa: E402
from hosl.ops import available_backends  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

Q = 2
POINTS = [(11, 1e-2), (11, -1e-2), (2**64 - 5, 1e-2), (2**64 - 5, -1e-2)]  # 2Q points, central differences
# relative error of a copy's activation: summation order only (fp32), plus roundings of intermediate
# results into the half types
REL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
TRITON = "triton" in available_backends()


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _client(name="tiny-opt", dtype=torch.float32):
    model, _ = load_model(name, "causal_lm")
    client, server = split(model, cut=2)
    return client.to(dtype).eval(), server.to(dtype).eval()


def _batch():
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def _sequential(client, layout, family, points, ids, mask):
    scratch = ModuleScratchPerturber(client, layout, direction=family)
    outs = []
    for seed, scale in points:
        with scratch.perturbed(seed, scale):
            outs.append(client(ids, mask))
    return torch.cat(outs)


def _assert_copies_close(got, want, copies, dtype):
    for d, (g, w) in enumerate(zip(got.float().chunk(copies), want.float().chunk(copies))):
        rel = float((g - w).norm() / w.norm())
        assert rel < REL[dtype], f"copy {d}: relative error {rel:.2e}"


CASES = [("cpu", "gaussian", torch.float32, d) for d in (1, 2, 3, 2 * Q)]
CASES += [("cpu", f, dt, 3) for f in ("rademacher", "sphere") for dt in REL]
CASES += [("cpu", "gaussian", dt, 2) for dt in (torch.bfloat16, torch.float16)]
CASES += [("triton", f, dt, 3) for f in ("gaussian", "rademacher", "sphere") for dt in REL]
CASES += [("triton", "gaussian", torch.float32, d) for d in (1, 2 * Q)]


@pytest.mark.parametrize("fused_backend,family,dtype,d", CASES)
def test_batched_activations_equal_sequential(fused_backend, family, dtype, d):
    if fused_backend == "triton" and not TRITON:
        pytest.skip("no triton backend")
    client, _ = _client(dtype=dtype)
    layout = ParameterLayout(client)
    ids, mask = _batch()
    points = POINTS[:d] if d <= len(POINTS) else POINTS
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    want = _sequential(client, layout, family, points, ids, mask)
    batched = BatchedPerturber(client, layout, fused_backend=fused_backend, direction=family,
                               sphere_scales=SphereScales(layout, None) if family == "sphere" else None)
    assert batched.fused and batched.looped  # linear/embedding batched, the LayerNorms looped
    with batched.perturbed(points):
        got = client(ids, mask)
    assert got.shape == (len(points) * ids.shape[0], *want.shape[1:])
    _assert_copies_close(got, want, len(points), dtype)
    assert all(torch.equal(_bits(before[n]), _bits(p.detach())) for n, p in client.named_parameters())
    assert all("forward" not in m.__dict__ for m, _, _ in batched.fused)  # forwards restored
    torch.testing.assert_close(client(ids, mask), _client(dtype=dtype)[0](ids, mask), rtol=0, atol=0)


def test_llama_client_batched():
    client, _ = _client("tiny-llama")
    layout = ParameterLayout(client)
    ids, mask = _batch()
    want = _sequential(client, layout, "gaussian", POINTS[:3], ids, mask)
    batched = BatchedPerturber(client, layout, fused_backend=None)
    with batched.perturbed(POINTS[:3]):
        got = client(ids, mask)
    _assert_copies_close(got, want, 3, torch.float32)


def test_repeat_batch_repeats_only_batch_shaped_tensors():
    ids, mask, shared = torch.arange(6).view(2, 3), torch.ones(2, 3), torch.zeros(1, 3)
    args, kwargs, rows = repeat_batch((ids, shared), {"mask": mask, "flag": True}, 3)
    assert rows == 2 and args[0].shape == (6, 3) and torch.equal(args[0][4:], ids)
    assert args[1] is shared and kwargs["mask"].shape == (6, 3) and kwargs["flag"] is True


def _server_loss(server, mask, target):
    def loss(h):
        copies = h.shape[0] // mask.shape[0]
        logits = server(h, mask.repeat(copies, 1)).float()
        per = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.repeat(copies, 1).reshape(-1),
                                          reduction="none")
        return hosl.per_copy_mean(per, copies) if copies > 1 else per.mean()
    return loss


@pytest.mark.parametrize("family", ["gaussian", "rademacher"])
@pytest.mark.parametrize("query_batch", [2, 3, 2 * Q, "auto"])
def test_optimizer_step_batched_equals_sequential(family, query_batch):
    ids, mask = _batch()
    target = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    results = {}
    for qb in (1, query_batch):
        client, server = _client()
        opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, eps=1e-2, num_queries=Q, seed=3, direction=family,
                                        query_batch=qb, query_memory_budget=10**9 if qb == "auto" else None)
        loss = opt.step(lambda: client(ids, mask), _server_loss(server, mask, target))
        weights = {n: p.detach().clone() for n, p in client.named_parameters()}
        results[qb] = (float(loss), opt.last_projected_grads, weights)
        if qb == "auto":
            assert opt.last_query_batch == 2 * Q  # a large budget: every point in one forward
    (l1, g1, w1), (l2, g2, w2) = results[1], results[query_batch]
    assert l1 == l2
    torch.testing.assert_close(torch.tensor(g2), torch.tensor(g1), rtol=1e-3, atol=2e-4)
    assert any(abs(g) > 1e-2 for g in g1)
    for n in w1:  # the update: lr * mean_q g_q z_q, so the same up to lr * (the grads' difference)
        torch.testing.assert_close(w2[n], w1[n], rtol=0, atol=1e-5)


def test_zeroth_order_optimizer_batched_equals_sequential():
    ids, mask = _batch()
    target = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = {}
    for qb in (1, 3):
        client, server = _client()
        opt = hosl.ZerothOrderOptimizer(client, lr=0.0, eps=1e-2, num_queries=Q, seed=5, query_batch=qb)
        loss = _server_loss(server, mask, target)
        opt.step(lambda: loss(client(ids, mask)))
        grads[qb] = opt.last_projected_grads
    torch.testing.assert_close(torch.tensor(grads[3]), torch.tensor(grads[1]), rtol=1e-3, atol=2e-4)


def test_auto_follows_the_budget_and_a_d_that_cannot_fit_is_refused_before_any_weight_changes():
    ids, mask = _batch()
    target = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    client, server = _client()
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, num_queries=Q, query_batch="auto", query_memory_budget=0)
    opt.step(lambda: client(ids, mask), _server_loss(server, mask, target))
    assert opt.last_query_batch == 1  # no budget for a second copy: sequential
    client, server = _client()
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, num_queries=Q, query_batch=3, query_memory_budget=1)
    with pytest.raises(ValueError, match="query_batch=3 needs about .* query_memory_budget=1"):
        opt.step(lambda: client(ids, mask), _server_loss(server, mask, target))
    assert all(torch.equal(before[n], p.detach()) for n, p in client.named_parameters())
    assert opt.steps_taken == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_batch=0), "query_batch must be an integer >= 1 or 'auto'"),
    (dict(query_batch="max"), "query_batch must be"),
    (dict(query_batch=2, server_batch=2), "server_batch > 1"),
    (dict(query_batch=2, query_memory_budget=-1), "query_memory_budget must be"),
])
def test_bad_query_batch_options(kwargs, match):
    client = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=match):
        hosl.HybridOrderOptimizer(client, None, **kwargs)


def test_client_fn_that_bypasses_the_module_is_refused():
    client = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    ids = torch.tensor([[1, 2, 3]])
    opt = hosl.HybridOrderOptimizer(client, None, num_queries=1, query_batch=2)
    # client_fn runs the submodules, not the client module: its inputs are never repeated
    with pytest.raises(RuntimeError, match="client_fn must run the client module"):
        opt.step(lambda: client[1](client[0](ids)), lambda h: h.float().pow(2).mean())


@pytest.mark.slow
def test_hosl_train_with_query_batch_sends_the_copies_stacked(tmp_path):
    """hosl train --query-batch: the D activations go to the server half in one losses message
    (same bytes as D messages of one copy), and the run follows the sequential one."""
    import json
    import os
    from pathlib import Path

    from hosl.cli import main

    data = Path(os.environ.get("HOSL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if not (data / "sst2" / "train.tsv").exists():
        pytest.skip(f"no task data at {data}")

    def run(out, qb):
        args = ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(data), "--mode", "hosl",
                "--cut", "1", "--steps", "2", "--batch-size", "4", "--train-size", "8", "--eval-size", "4",
                "--num-queries", "2", "--max-length", "32", "--lr-client", "1e-3", "--eps", "1e-2",
                "--query-batch", str(qb), "--out", str(out), "--no-progress"]
        assert main(args) == 0
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    seq, batched = run(tmp_path / "seq", 1), run(tmp_path / "qb", 4)
    assert [r["loss"] for r in batched] == pytest.approx([r["loss"] for r in seq], rel=1e-4)
    if "bytes_up" in seq[0]:
        # one message of 4 stacked copies instead of 4 messages: the same tensor bytes, fewer headers
        assert 0 < seq[0]["bytes_up"] - batched[0]["bytes_up"] < 1000
