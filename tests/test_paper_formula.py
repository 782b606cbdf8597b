"""One HOSL step against an independent slow implementation written from the paper's formula.

Nothing here comes from the optimizer's own helpers: the seeds follow the documented rule (two
32-bit draws per seed from a ``torch.Generator`` seeded with ``seed``), each direction is drawn with
``hosl.directions.spec.randn_reference`` over the client's trainable parameters in name order,
the perturbed clients are explicit copies of the weights, and then

    g_q = (L(w + eps z_q) - L(w - eps z_q)) / (2 eps),    w <- w - lr * (1/Q) sum_q g_q z_q

on the client, and plain autograd + SGD on the server at the clean point.
"""

import copy

import pytest
import torch
from torch import nn

import hosl
from hosl.directions.spec import randn_reference
from hosl.models import load_model, split

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")


def _seeds(seed: int, count: int, generator: torch.Generator | None = None) -> tuple[list[int], torch.Generator]:
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    words = torch.randint(0, 2**32, (count, 2), generator=g, dtype=torch.int64).tolist()
    return [lo + (hi << 32) for lo, hi in words], g


def _direction(client: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """z(seed) laid over the client's trainable parameters, sorted by name, as float64."""
    named = sorted((n, p) for n, p in client.named_parameters() if p.requires_grad)
    z = randn_reference(seed, sum(p.numel() for _, p in named)).double()
    out, start = {}, 0
    for n, p in named:
        out[n] = z[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return out


def _moved(client: nn.Module, z: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """A copy of the client with w + scale * z written into its weights."""
    copy_ = copy.deepcopy(client)
    with torch.no_grad():
        for n, p in copy_.named_parameters():
            if n in z:
                p.copy_((p.double() + scale * z[n]).to(p.dtype))
    return copy_


def _paper_step(client, server, loss_of, seeds, lr, eps, server_lr):
    clean = loss_of(server(client(*_inputs()).detach()))
    server.zero_grad()
    clean.backward()  # the server's gradient at the clean point
    directions = [_direction(client, s) for s in seeds]
    grads = []
    with torch.no_grad():
        for z in directions:
            plus = float(loss_of(server(_moved(client, z, eps)(*_inputs()))))
            minus = float(loss_of(server(_moved(client, z, -eps)(*_inputs()))))
            grads.append((plus - minus) / (2 * eps))
        for n, p in client.named_parameters():
            estimate = sum(g * z[n] for g, z in zip(grads, directions)) / len(seeds)
            p.copy_((p.double() - lr * estimate).to(p.dtype))
        for p in server.parameters():
            if p.grad is not None:
                p -= server_lr * p.grad
    return float(clean.detach()), grads


_BATCH = {}


def _inputs():
    if not _BATCH:
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(3, 200, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[2, 7:] = 0
        _BATCH.update(ids=ids, mask=mask, labels=torch.tensor([1, 0, 0, 1]))
    return _BATCH["ids"], _BATCH["mask"]


def test_two_hosl_steps_follow_the_papers_formula():
    model, _ = load_model("tiny-opt", "sequence_classification", num_labels=2, seed=0)
    client, server = split(model, cut=2)
    client.train(False)
    server.train(False)
    ref_client, ref_server = copy.deepcopy(client), copy.deepcopy(server)
    start_client = copy.deepcopy(client)
    ids, mask = _inputs()
    labels = _BATCH["labels"]

    def loss_of(logits):
        return nn.functional.cross_entropy(logits.float(), labels)

    lr, eps, server_lr, q, seed = 5e-2, 1e-2, 5e-2, 3, 11
    opt = hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=server_lr), lr=lr, eps=eps,
                                    num_queries=q, seed=seed)
    generator = None
    for _ in range(2):  # the second step checks the seed stream continues as documented
        loss = opt.step(lambda: client(ids, mask), lambda h: loss_of(server(h, mask)))
        seeds, generator = _seeds(seed, q, generator)
        ref_loss, ref_grads = _paper_step(ref_client, _ServerCall(ref_server, mask), loss_of, seeds, lr, eps,
                                          server_lr)
        assert opt.last_seeds == seeds
        assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
        assert opt.last_projected_grads == pytest.approx(ref_grads, rel=1e-3, abs=1e-4)
        for (n, p), (_, r) in zip(client.named_parameters(), ref_client.named_parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=n)
        for (n, p), (_, r) in zip(server.named_parameters(), ref_server.named_parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=n)
    # the comparison is not vacuous: the client really moved, by more than the tolerance
    assert max(float((p - s).abs().max()) for p, s in zip(client.parameters(), start_client.parameters())) > 1e-3


class _ServerCall(nn.Module):
    """The server half with the batch's mask bound: ``server(h)``."""

    def __init__(self, server, mask):
        super().__init__()
        self.server, self.mask = server, mask

    def forward(self, h):
        return self.server(h, self.mask)
