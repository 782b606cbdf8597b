"""The authors' step as options of HOSL (docs/paper_settings.md): ``server_grad="perturbed"`` (the
server's gradient at each direction's +eps activation, averaged over Q, instead of at the clean
point) and ``client_update="per-direction"`` (a ZO-SGD step of lr/Q times each direction's estimate
right after its two passes). Checked bit for bit against a slow loop written the authors' way: an
explicit perturbed copy of the client per pass (``hosl.ops.perturb_`` into a copy of each weight),
the server's autograd, ``hosl.ops.zo_update_`` per direction; then through the split protocol."""

import copy

import pytest
import torch
from torch import nn

import hosl
from hosl import ops
from hosl.models import load_model, split
from hosl.optim.config import ZOConfig
from hosl.training.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")


def _seeds(generator: torch.Generator, count: int) -> list[int]:
    words = torch.randint(0, 2**32, (count, 2), generator=generator, dtype=torch.int64).tolist()
    return [lo + (hi << 32) for lo, hi in words]


def _layout(client: nn.Module):
    """(name, param, offset) of the client's trainable parameters, in name order, consecutive."""
    out, start = [], 0
    for name, p in sorted((n, p) for n, p in client.named_parameters() if p.requires_grad):
        out.append((name, p, start))
        start += p.numel()
    return out


def _at(client: nn.Module, seed: int, scale: float) -> nn.Module:
    """A copy of the client whose weights are w + scale * z(seed)."""
    moved = copy.deepcopy(client)
    params = dict(moved.named_parameters())
    with torch.no_grad():
        for name, p, offset in _layout(client):
            ops.perturb_([p.detach()], seed, scale, out=[params[name].data], offset=offset)
    return moved


def _authors_loop(client, server_step, seeds, lr, eps, perturbed_server, per_direction):
    """One step of the authors' loop as the issue describes it; returns the clean loss."""
    q = len(seeds)
    with torch.no_grad():
        clean = server_step(client(*_inputs()), backward_weight=None if perturbed_server else 1.0)
    grads = []
    for seed in seeds:
        plus = server_step(_at(client, seed, eps)(*_inputs()).detach(),
                           backward_weight=1.0 / q if perturbed_server else None)
        minus = server_step(_at(client, seed, -eps)(*_inputs()).detach(), backward_weight=None)
        g = (plus - minus) / (2.0 * eps)
        grads.append(g)
        if per_direction:
            layout = _layout(client)
            ops.zo_update_([p.data for _, p, _ in layout], [seed], [g / q], lr=lr, weight_decay=0.0,
                           offsets=[o for _, _, o in layout])
    if not per_direction:
        layout = _layout(client)
        ops.zo_update_([p.data for _, p, _ in layout], seeds, [g / q for g in grads], lr=lr, weight_decay=0.0,
                       offsets=[o for _, _, o in layout])
    server_step.step()
    return clean


class _Server:
    """The server half and its SGD: ``loss(h)``, back-propagated with ``backward_weight`` unless None."""

    def __init__(self, server, lr):
        self.server, self.opt = server, torch.optim.SGD(server.parameters(), lr=lr)

    def __call__(self, h, backward_weight):
        with torch.enable_grad() if backward_weight is not None else torch.no_grad():
            loss = _loss(self.server(h, _inputs()[1]))
            if backward_weight is not None:
                (loss * backward_weight).backward()
        return float(loss.detach())

    def step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


_BATCH = {}


def _inputs():
    if not _BATCH:
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(3, 200, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[2, 7:] = 0
        _BATCH.update(ids=ids, mask=mask, labels=torch.tensor([1, 0, 0, 1]))
    return _BATCH["ids"], _BATCH["mask"]


def _loss(logits):
    return nn.functional.cross_entropy(logits.float(), _BATCH["labels"])


@pytest.mark.parametrize("server_grad,client_update", [
    ("perturbed", "per-direction"), ("perturbed", "joint"), ("clean", "per-direction")])
def test_the_authors_step_matches_their_loop_bit_for_bit(server_grad, client_update):
    model, _ = load_model("tiny-opt", "sequence_classification", num_labels=2, seed=0)
    client, server = split(model, cut=2)
    client.eval()
    server.eval()
    ref_client, ref_server = copy.deepcopy(client), _Server(copy.deepcopy(server), lr=5e-2)
    start = copy.deepcopy(client)
    lr, eps, q, seed = 5e-2, 1e-2, 3, 11
    opt = hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=5e-2), lr=lr, eps=eps,
                                    num_queries=q, seed=seed, server_grad=server_grad, client_update=client_update)
    generator = torch.Generator().manual_seed(seed)
    ids, mask = _inputs()
    for _ in range(2):
        loss = opt.step(lambda: client(ids, mask), lambda h: _loss(server(h, mask)))
        seeds = _seeds(generator, q)
        ref_loss = _authors_loop(ref_client, ref_server, seeds, lr, eps, server_grad == "perturbed",
                                 client_update == "per-direction")
        assert opt.last_seeds == seeds and float(loss) == ref_loss
        for (n, p), r in zip(client.named_parameters(), ref_client.parameters()):
            assert torch.equal(p, r), n
        for (n, p), r in zip(server.named_parameters(), ref_server.server.parameters()):
            assert torch.equal(p, r), n
    assert max(float((p - s).detach().abs().max()) for p, s in zip(client.parameters(), start.parameters())) > 1e-4


def test_the_options_change_the_step():
    """Not vacuous: each option gives other weights than the default step."""
    model, _ = load_model("tiny-opt", "sequence_classification", num_labels=2, seed=0)
    ids, mask = _inputs()
    finals = {}
    for options in (dict(), dict(server_grad="perturbed"), dict(client_update="per-direction")):
        client, server = split(copy.deepcopy(model), cut=2)
        client.eval()
        server.eval()
        opt = hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=5e-2), lr=5e-2, eps=1e-2,
                                        num_queries=3, seed=11, **options)
        opt.step(lambda c=client: c(ids, mask), lambda h, s=server: _loss(s(h, mask)))
        finals[tuple(options.items())] = torch.cat([p.flatten() for p in (*client.parameters(),
                                                                          *server.parameters())])
    values = list(finals.values())
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[0], values[2])


@pytest.mark.parametrize("options,match", [
    (dict(server_grad="sideways"), "server_grad must be one of"),
    (dict(client_update="per-direction", variant="momentum"), "per-direction steps plain ZO-SGD"),
    (dict(client_update="per-direction", difference="forward"), "needs difference=central"),
    (dict(server_grad="perturbed", server_estimate="linear"), "needs server_estimate=exact"),
    (dict(server_grad="perturbed", server_batch=2), "one perturbed point at a time"),
])
def test_refusals(options, match):
    with pytest.raises(ValueError, match=match):
        ZOConfig(**options)


def test_train_config_takes_the_options_for_hosl_only():
    TrainConfig(mode="hosl", server_grad="perturbed", client_update="per-direction").validate()
    with pytest.raises(ValueError, match="--server-grad perturbed applies to --mode hosl"):
        TrainConfig(mode="zo-sl", server_grad="perturbed").validate()
    with pytest.raises(ValueError, match="--client-update per-direction applies to --mode hosl"):
        TrainConfig(mode="fo-sl", client_update="per-direction").validate()
    with pytest.raises(ValueError, match="a fleet's clients send one clean activation"):
        TrainConfig(mode="hosl", clients=2, server_grad="perturbed").validate()


@pytest.mark.parametrize("server_grad,client_update", [("perturbed", "per-direction"), ("perturbed", "joint")])
def test_the_split_protocol_gives_the_in_process_weights(server_grad, client_update):
    """--mode hosl through the split protocol (ServerHandler behind an in-process link, as hosl train
    runs it) against HybridOrderOptimizer with the server in-process: the same weights, bit for bit."""
    from hosl.training.modes import Hyper, make_mode
    from hosl.training.protocol import PHASE_NAMES
    from hosl.training.server_handler import ServerHandler
    from hosl.training.server_proxy import ServerProxy
    from hosl.transport import InProcessLink

    model, _ = load_model("tiny-opt", "sequence_classification", num_labels=2, seed=0)
    client, server = split(model, cut=2)
    client.eval()
    server.eval()
    ref_client, ref_server = copy.deepcopy(client), copy.deepcopy(server)
    zo = ZOConfig(lr=5e-2, eps=1e-2, num_queries=3, seed=11, server_grad=server_grad, client_update=client_update)
    hp = Hyper(zo=zo, lr_server=5e-2, momentum=0.9)

    def loss_of(logits, batch, copies):
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    half = ServerHandler(server, "hosl", hp, loss_of, "classifier", train_dropout=False)
    proxy = ServerProxy(InProcessLink(half.handle, PHASE_NAMES), "classifier")
    mode = make_mode("hosl", client, None, hp, loss_of, proxy=proxy)
    ref_opt = hosl.HybridOrderOptimizer(ref_client, torch.optim.SGD(ref_server.parameters(), lr=5e-2, momentum=0.9),
                                        config=zo.for_optimizer("hybrid"))
    ids, mask = _inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": _BATCH["labels"]}
    for step in (1, 2):
        mode.step_number = step
        loss = mode.step(batch)
        ref = ref_opt.step(lambda: ref_client(ids, mask), lambda h: _loss(ref_server(h, mask)))
        assert loss == float(ref)
    for (n, p), r in zip([*client.named_parameters(), *server.named_parameters()],
                         [*ref_client.parameters(), *ref_server.parameters()]):
        assert torch.equal(p, r), n
