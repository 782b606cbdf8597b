"""The five training modes on one split model, each a small ``step(batch) -> loss`` object.

* ``hosl``  — client ZO (HybridOrderOptimizer), server FO.
* ``fo-sl`` — client FO with the activation gradient the server returns; server FO.
* ``zo-sl`` — client and server both ZO.
* ``fo``    — the unsplit model, FO (the halves run back to back, one backward).
* ``zo``    — the unsplit model, MeZO (ZO over one coordinate numbering of the whole model).

All see the same batches and call the same loss; only who computes which gradient differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hosl.optim import HybridOrderOptimizer, ZerothOrderOptimizer
from hosl.training.memory import ClientMemory

MODES = ("hosl", "fo-sl", "zo-sl", "fo", "zo")
ZO_CLIENT_MODES = ("hosl", "zo-sl", "zo")

# loss_of(logits, batch, copies) -> scalar (copies == 1) or [copies] losses
LossFn = Callable[[torch.Tensor, dict, int], torch.Tensor]


@dataclass
class Hyper:
    lr_client: float
    lr_server: float
    eps: float
    num_queries: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    server_batch: int = 1
    difference: str = "central"
    seed: int = 0
    backend: str | None = None


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"]


def _server_loss(server, batch, loss_of: LossFn):
    ids, mask = _inputs(batch)

    def loss(h):
        copies = h.shape[0] // ids.shape[0]
        return loss_of(server(h, mask.repeat(copies, 1) if copies > 1 else mask), batch, copies)

    return loss


class Mode:
    name: str

    def __init__(self, client: nn.Module, server: nn.Module, hp: Hyper, loss_of: LossFn):
        self.client, self.server, self.hp, self.loss_of = client, server, hp, loss_of
        self.memory = ClientMemory()

    def run_client(self, ids, mask):
        h = self.client(ids, mask)
        self.memory.note_output(h)
        return h

    def step(self, batch) -> float:
        raise NotImplementedError

    def optimizer_state(self) -> dict:
        return {k: opt.state_dict() for k, opt in self.optimizers().items()}

    def load_optimizer_state(self, state: dict) -> None:
        for k, opt in self.optimizers().items():
            opt.load_state_dict(state[k])

    def optimizers(self) -> dict:
        raise NotImplementedError

    def client_optimizer_state_bytes(self) -> int:
        return 0

    def scratch_bytes(self) -> int:
        return 0

    @property
    def skipped_updates(self) -> int:
        return 0


def _sgd(params, lr, hp: Hyper):
    return torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


class HOSLMode(Mode):
    name = "hosl"

    def __init__(self, client, server, hp, loss_of):
        super().__init__(client, server, hp, loss_of)
        self.server_opt = _sgd(server.parameters(), hp.lr_server, hp)
        self.opt = HybridOrderOptimizer(
            client, self.server_opt, lr=hp.lr_client, eps=hp.eps, num_queries=hp.num_queries,
            weight_decay=hp.weight_decay, difference=hp.difference, server_batch=hp.server_batch,
            seed=hp.seed, backend=hp.backend,
        )

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        return float(self.opt.step(lambda: self.run_client(ids, mask), _server_loss(self.server, batch, self.loss_of)))

    def optimizers(self):
        return {"hybrid": self.opt}  # holds the server optimizer's state too

    def scratch_bytes(self):
        return self.opt.scratch_nbytes()

    @property
    def skipped_updates(self):
        return self.opt.skipped_updates


class FOSLMode(Mode):
    """Split backprop: the server returns dL/dh, the client back-props it."""

    name = "fo-sl"

    def __init__(self, client, server, hp, loss_of):
        super().__init__(client, server, hp, loss_of)
        self.client_opt = _sgd(client.parameters(), hp.lr_client, hp)
        self.server_opt = _sgd(server.parameters(), hp.lr_server, hp)

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        with self.memory.measure_saved():
            h = self.run_client(ids, mask)
        h_server = h.detach().requires_grad_(True)  # what crosses the cut
        loss = self.loss_of(self.server(h_server, mask), batch, 1)
        loss.backward()
        h.backward(h_server.grad)  # the activation gradient travels back down
        if torch.isfinite(loss):
            self.client_opt.step()
            self.server_opt.step()
        self.client_opt.zero_grad(set_to_none=True)
        self.server_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def optimizers(self):
        return {"client": self.client_opt, "server": self.server_opt}

    def client_optimizer_state_bytes(self):
        return sum(t.numel() * t.element_size() for s in self.client_opt.state.values()
                   for t in s.values() if isinstance(t, torch.Tensor))


class ZOSLMode(Mode):
    name = "zo-sl"

    def __init__(self, client, server, hp, loss_of):
        super().__init__(client, server, hp, loss_of)
        self.opt = ZerothOrderOptimizer(
            [client, server], lr=hp.lr_client, eps=hp.eps, num_queries=hp.num_queries,
            weight_decay=hp.weight_decay, difference=hp.difference, seed=hp.seed, backend=hp.backend,
        )

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        loss = _server_loss(self.server, batch, self.loss_of)
        return float(self.opt.step(lambda: loss(self.run_client(ids, mask))))

    def optimizers(self):
        return {"zo": self.opt}

    def scratch_bytes(self):
        return self.opt.perturbers[0].scratch_nbytes()

    @property
    def skipped_updates(self):
        return self.opt.skipped_updates


class _Whole(nn.Module):
    """client then server as one module: the unsplit model for the fo/zo baselines."""

    def __init__(self, client, server):
        super().__init__()
        self.client, self.server = client, server

    def forward(self, ids, mask):
        return self.server(self.client(ids, mask), mask)


class FOMode(Mode):
    name = "fo"

    def __init__(self, client, server, hp, loss_of):
        super().__init__(client, server, hp, loss_of)
        self.whole = _Whole(client, server)
        self.opt = _sgd(self.whole.parameters(), hp.lr_server, hp)

    def step(self, batch) -> float:
        loss = self.loss_of(self.whole(*_inputs(batch)), batch, 1)
        loss.backward()
        if torch.isfinite(loss):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def optimizers(self):
        return {"fo": self.opt}


class ZOMode(Mode):
    name = "zo"

    def __init__(self, client, server, hp, loss_of):
        super().__init__(client, server, hp, loss_of)
        self.whole = _Whole(client, server)
        self.opt = ZerothOrderOptimizer(
            self.whole, lr=hp.lr_client, eps=hp.eps, num_queries=hp.num_queries,
            weight_decay=hp.weight_decay, difference=hp.difference, seed=hp.seed, backend=hp.backend,
        )

    def step(self, batch) -> float:
        return float(self.opt.step(lambda: self.loss_of(self.whole(*_inputs(batch)), batch, 1)))

    def optimizers(self):
        return {"zo": self.opt}

    def scratch_bytes(self):
        return self.opt.scratch_nbytes()

    @property
    def skipped_updates(self):
        return self.opt.skipped_updates


def make_mode(name: str, client, server, hp: Hyper, loss_of: LossFn) -> Mode:
    classes = {c.name: c for c in (HOSLMode, FOSLMode, ZOSLMode, FOMode, ZOMode)}
    if name not in classes:
        raise ValueError(f"mode must be one of {list(MODES)}, got {name!r}")
    return classes[name](client, server, hp, loss_of)
