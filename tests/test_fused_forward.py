"""Perturbed client forwards through the fused ops (FusedPerturber) against the scratch path.

Tiny OPT and tiny Llama clients (cut 2) under the Triton interpreter: same activations within
float32 matmul tolerance, weights bit-exact afterwards, and the optimizer's choice of path is
selectable and logged.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
pytest.importorskip("transformers")

import hosl  # noqa: E402
from hosl.models import load_model, split  # noqa: E402
from hosl.ops.backends import triton as tb  # noqa: E402
from hosl.forward import FusedPerturber, make_perturber  # noqa: E402
from hosl.forward.fused import EMBEDDING_INTERCEPT, LINEAR  # noqa: E402
from hosl.forward.layout import ParameterLayout  # noqa: E402
from hosl.forward.scratch import ModuleScratchPerturber  # noqa: E402

pytestmark = [pytest.mark.skipif(not tb.is_available(), reason=f"triton backend: {tb.unavailable_reason()}"),
              pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")]


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _client(name):
    model, _ = load_model(name, "causal_lm")
    return split(model, cut=2)


def _batch():
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_fused_client_forward_equals_scratch_path(name):
    client, _ = _client(name)
    layout = ParameterLayout(client)
    fused = FusedPerturber(client, layout)
    scratch = ModuleScratchPerturber(client, layout)
    kinds = [k for _, k, _ in fused.fused]
    assert kinds.count(LINEAR) == 2 * (4 + 2 + (1 if name == "tiny-llama" else 0))  # q k v o + mlp per block
    if name == "tiny-opt":
        assert EMBEDDING_INTERCEPT in kinds  # OPT's learned positions go through the fused lookup too
    # the scratch left to the fused path is for the norms only
    assert 0 < fused.scratch_nbytes() < scratch.scratch_nbytes() / 10
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    ids, mask = _batch()
    clean = client(ids, mask)
    for seed, scale in ((11, 1e-2), (2**64 - 5, -1e-2)):
        with fused.perturbed(seed, scale):
            got = client(ids, mask)
        with scratch.perturbed(seed, scale):
            want = client(ids, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - clean).abs().max() > 1e-3  # the perturbation was applied
    assert all(torch.equal(_bits(before[n]), _bits(p.detach())) for n, p in client.named_parameters())
    # outside the block the layers run their own forwards again
    assert all("forward" not in m.__dict__ for m, _, _ in fused.fused)
    torch.testing.assert_close(client(ids, mask), clean, rtol=0, atol=0)


def test_optimizer_fused_step_matches_scratch_step_and_keeps_weights():
    client, server = _client("tiny-llama")
    ids, mask = _batch()
    target = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))

    def server_loss(h):
        logits = server(h, mask)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    grads = {}
    for mode in ("fused", "scratch"):
        opt = hosl.HybridOrderOptimizer(client, None, lr=0.0, eps=1e-2, num_queries=2, seed=3,
                                        perturbed_forward=mode)
        assert isinstance(opt.perturbers[0], FusedPerturber) == (mode == "fused")
        opt.step(lambda: client(ids, mask), server_loss)
        grads[mode] = opt.last_projected_grads
    assert all(torch.equal(_bits(before[n]), _bits(p.detach())) for n, p in client.named_parameters())
    torch.testing.assert_close(torch.tensor(grads["fused"]), torch.tensor(grads["scratch"]), rtol=1e-3, atol=1e-3)
    assert any(abs(g) > 1e-3 for g in grads["fused"])


def test_auto_on_cpu_materialises_layer_by_layer_and_says_so(caplog):
    client = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    with caplog.at_level(logging.INFO, logger="hosl.optim"):
        opt = hosl.HybridOrderOptimizer(client, None, num_queries=1)
    assert isinstance(opt.perturbers[0], FusedPerturber) and opt.perturbers[0].fused_backend is None
    assert "default backend" in caplog.text and "CUDA" in caplog.text and "materialising" in caplog.text
    with caplog.at_level(logging.INFO, logger="hosl.optim"):
        opt = hosl.HybridOrderOptimizer(client, None, num_queries=1, perturbed_forward="scratch")
    assert type(opt.perturbers[0]) is ModuleScratchPerturber
    with caplog.at_level(logging.INFO, logger="hosl.optim"):
        opt = hosl.ZerothOrderOptimizer(client, num_queries=1, perturbed_forward="fused")
    assert isinstance(opt.perturbers[0], FusedPerturber) and "fused (triton): 1 linear, 1 embedding" in caplog.text
    with pytest.raises(ValueError, match="perturbed_forward"):
        hosl.HybridOrderOptimizer(client, None, perturbed_forward="fast")


def test_modules_the_fused_path_cannot_serve():
    class ScaledLinear(nn.Linear):  # overrides forward: falls back to scratch
        def forward(self, x):
            return 2 * super().forward(x)

    class RawEmbedding(nn.Embedding):  # indexes its weight without F.embedding: the fused path must refuse
        def forward(self, ids):
            return self.weight[ids]

    model = nn.Sequential(RawEmbedding(6, 4), ScaledLinear(4, 4), nn.Embedding(3, 4, max_norm=1.0))
    perturber, line = make_perturber(model, ParameterLayout(model), None, "fused")
    assert [type(m) for m, _, _ in perturber.fused] == [RawEmbedding]
    assert {type(m) for m, _ in perturber.owners} == {ScaledLinear, nn.Embedding}
    with pytest.raises(RuntimeError, match="did not call F.embedding"):
        with perturber.perturbed(1, 0.1):
            model[0](torch.tensor([1, 2]))
    assert "forward" not in model[0].__dict__


def test_fused_wiring_with_a_materialising_backend():
    """perturbed_forward='fused' with backend='reference': same wiring, ops materialise (no Triton)."""
    torch.manual_seed(0)
    client = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))
    layout = ParameterLayout(client)
    fused, _ = make_perturber(client, layout, "reference", "fused")
    scratch = ModuleScratchPerturber(client, layout, "reference")
    ids = torch.tensor([[1, 11, 4]])
    with fused.perturbed(5, 0.1):
        got = client(ids)
    with scratch.perturbed(5, 0.1):
        want = client(ids)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fused_and_batched_describe_the_layers_they_fuse():
    """Both fused paths' describe() count the client's linear and embedding layers (describe_fused)."""
    from hosl.forward.batched import BatchedPerturber

    client, _ = _client("tiny-opt")
    linear = sum(isinstance(m, nn.Linear) for m in client.modules())
    embedding = sum(isinstance(m, nn.Embedding) for m in client.modules())
    assert linear > 0 and embedding > 0
    counts = f"(default backend): {linear} linear, {embedding} embedding layers"
    fused = FusedPerturber(client, ParameterLayout(client), fused_backend=None).describe()
    assert fused.startswith(f"fused {counts}; scratch: "), fused
    batched = BatchedPerturber(client, ParameterLayout(client), fused_backend=None).describe()
    assert batched.startswith(f"batched {counts} with D directions per call; "), batched
