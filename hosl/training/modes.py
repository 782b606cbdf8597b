"""The six training modes on one split model, each a small ``step(batch) -> loss`` object.

* ``hosl``  — client ZO (HybridOrderOptimizer), server FO.
* ``fo-sl`` — client FO with the activation gradient the server returns; server FO.
* ``zo-sl`` — client and server both ZO.
* ``frozen-client`` — the client never trains (one clean forward per step, no perturbed passes, no
  backward); server FO. The control every split mode is measured against: what training the
  client adds.
* ``fo``    — the unsplit model, FO (the halves run back to back, one backward).
* ``zo``    — the unsplit model, MeZO (ZO over one coordinate numbering of the whole model).

All see the same batches and call the same loss; only who computes which gradient differs.
The split modes hold only the client; their server half (``server_handler.ServerHandler``) answers
through a ``ServerProxy`` (``server_proxy.py``), in this process or in another one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from hosl.optim import HybridOrderOptimizer, ZerothOrderOptimizer
from hosl.optim.config import ZOConfig, train_fields, train_name
from hosl.optim.micro_batch import MicroBatchedClient, check_micro_batch
from hosl.optim.rules import rule_state_nbytes
from hosl.tasks.evaluation import eval_outputs
from hosl.training.lean_fo_client import LeanFOClient
from hosl.training.memory import ClientMemory, plan_micro_batch, probe_row_cost, runtime_reserve
from hosl.training.protocol import SPLIT_MODES
from hosl.training.server_proxy import ServerPerturbationPeer, ServerProxy

MODES = ("hosl", "fo-sl", "zo-sl", "frozen-client", "fo", "zo")
ZO_CLIENT_MODES = ("hosl", "zo-sl", "zo")

# loss_of(logits, batch, copies) -> scalar (copies == 1) or [copies] losses
LossFn = Callable[[torch.Tensor, dict, int], torch.Tensor]


@dataclass
class Hyper:
    """A run's optimizer settings: the ZO options (``zo``, one :class:`~hosl.optim.config.ZOConfig`
    for every ZO-trained half; its ``lr`` is also the FO client's rate in fo-sl) and the FO side's.

    The ZO options read under their training names too (``hp.lr_client``, ``hp.zo_optimizer``,
    ``hp.client_micro_batch``: TrainConfig's, declared in ZOConfig's field metadata)."""

    zo: ZOConfig = field(default_factory=ZOConfig)
    lr_server: float = 1e-3
    momentum: float = 0.9  # SGD momentum of the FO optimizers (the ZO rule's is zo.momentum)
    server_optimizer: str = "sgd"  # sgd | adamw (the server half of hosl and fo-sl; hosl/training/schedule.py)
    lr_schedule: str = "constant"  # constant | linear | cosine, over total_steps
    warmup_steps: int = 0
    total_steps: int = 0
    client_checkpointing: bool = False  # fo-sl: each client block under torch.utils.checkpoint
    client_fused_step: bool = False  # fo-sl: the client's SGD step inside backward, gradients freed at once

    def zo_config(self, optimizer: str) -> ZOConfig:
        """The options of the ZO optimizer ``optimizer`` builds (``"zo"`` or ``"hybrid"``)."""
        return self.zo.for_optimizer(optimizer)

    def __getattr__(self, name: str):
        field_name = _ZO_TRAIN_NAMES.get(name)
        if field_name is None or name.startswith("_") or "zo" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self.zo, field_name)


# training name -> ZOConfig field (lr_client -> lr, zo_optimizer -> variant, eps -> eps, ...)
_ZO_TRAIN_NAMES = {train_name(f): f.name for f in train_fields()}


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"]


class Mode:
    name: str
    split = False  # split modes talk to their server half through a ServerProxy

    def __init__(self, client: nn.Module, server: nn.Module | None, hp: Hyper, loss_of: LossFn):
        self.client, self.server, self.hp, self.loss_of = client, server, hp, loss_of
        self.memory = ClientMemory()

    def run_client(self, ids, mask):
        h = self.client(ids, mask)
        self.memory.note_output(h)
        return h

    def client_rows_fn(self, ids, mask):
        """``client_fn(rows)`` of a micro-batched client pass (:mod:`hosl.optim.micro_batch`)."""
        def run(rows: slice):
            h = self.client(ids[rows], mask[rows])
            self.memory.note_output_rows(h, ids.shape[0])  # the assembled activation is what is sent
            return h
        return run

    # 1-based number of the step being run; the loop sets it, split modes label their messages with it
    step_number = 0

    def step(self, batch) -> float:
        """One training step on ``batch``."""
        raise NotImplementedError

    def eval_outputs(self, batch, model_kind: str):
        """(option scores or class logits, summed loss) of ``batch`` at the current weights."""
        with torch.no_grad():
            return eval_outputs(self.server(self.client(*_inputs(batch)), batch["attention_mask"]), batch, model_kind)

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
        """The ZO client's working buffers: perturbed-pass scratch and a non-SGD rule's transient estimate."""
        return 0

    @property
    def skipped_updates(self) -> int:
        return 0

    @property
    def skipped_server_steps(self) -> int:
        """Server updates skipped for a non-finite loss or gradient (split modes: as the server reports)."""
        return self.proxy.skipped_server_steps if self.split else 0


def _sgd(params, lr, hp: Hyper):
    """The FO optimizers: SGD with momentum over the trainable parameters (LoRA: the adapters)."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=hp.momentum,
                           weight_decay=hp.weight_decay)


class _ZOClientMode:
    """What the modes whose client runs a ZO optimizer (``self.opt``) report."""

    def client_optimizer_state_bytes(self):
        return self.opt.state_nbytes()

    def scratch_bytes(self):
        return self.opt.scratch_nbytes() + self.opt.estimate_nbytes()

    @property
    def skipped_updates(self):
        return self.opt.skipped_updates

    def set_client_micro_batch(self, rows: int | None) -> None:
        self.hp.zo = replace(self.hp.zo, client_micro_batch=check_micro_batch(rows, "--client-micro-batch"))
        if hasattr(self.opt, "client_micro_batch"):  # HOSL: the optimizer slices its own passes
            self.opt.client_micro_batch = rows

    def plan_client_memory(self, budget: int, batch_size: int, seq_len: int):
        """Set the rows per client slice from ``budget`` (bytes; see :func:`plan_micro_batch`) and
        return the plan. The probe runs the client on 1 and 2 full-length rows inside a perturbed pass
        (weights untouched); a budget too small raises before any training step."""
        weights = ClientMemory.weight_bytes(self.client)
        device = next(self.client.parameters()).device
        ids = torch.full((2, seq_len), 3, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        with self.opt.perturbed(0, 1.0):  # the + point of seed 0 (a peer only records it)
            fixed, per_row, out_row = probe_row_cost(lambda n: self.client(ids[:n], mask[:n]))
        state = rule_state_nbytes(self.opt.variant, sum(p.numel() for p in self.client.parameters() if p.requires_grad))
        plan = plan_micro_batch(budget, weights=weights, scratch=self.scratch_bytes() + state,
                                output=out_row * batch_size, fixed_transient=fixed, per_row_transient=per_row,
                                batch_size=batch_size, reserve=runtime_reserve(device))
        self.set_client_micro_batch(plan.micro_batch)
        return plan


class SplitMode(Mode):
    """The client's side of a split mode; the server half answers through ``proxy`` (in this
    process or another: the mode cannot tell). The server's optimizer lives with the server."""

    split = True

    def __init__(self, client, proxy: ServerProxy, hp, loss_of):
        super().__init__(client, None, hp, loss_of)
        self.proxy = proxy

    def eval_outputs(self, batch, model_kind: str):
        with torch.no_grad():
            h = self.client(*_inputs(batch))
        return self.proxy.eval_outputs(h, batch)


class HOSLMode(_ZOClientMode, SplitMode):
    name = "hosl"

    def __init__(self, client, proxy, hp, loss_of):
        super().__init__(client, proxy, hp, loss_of)
        self.opt = HybridOrderOptimizer(client, None, config=hp.zo_config("hybrid"))
        # a fleet's client (hosl/training/fleet_client.py: FleetSync): sets the step's seeds and
        # applies the updates the server relays instead of its own
        self.sync = None

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        if self.sync is not None:
            self.sync.before_step(self.opt, self.step_number)
        self.proxy.begin_step(self.step_number, batch)
        server_loss = self.proxy.hosl_loss_fn(linear=self.hp.server_estimate == "linear", server_grad=self.hp.server_grad)
        perturbed = self.proxy.losses  # an explicit call per perturbed activation (the clean one backprops)
        if self.opt.client_micro_batch is None:
            loss = float(self.opt.step(lambda: self.run_client(ids, mask), server_loss, perturbed_loss_fn=perturbed))
        else:  # the optimizer runs every pass in slices of client_micro_batch rows
            loss = float(self.opt.step(self.client_rows_fn(ids, mask), server_loss,
                                       batch_size=ids.shape[0], perturbed_loss_fn=perturbed))
        if self.sync is None:
            self.proxy.end_step()  # the server's optimizer steps (if the clean loss was finite)
        else:
            self.sync.end_step(self.opt, self.proxy)
        return loss

    def optimizers(self):
        return {"hybrid": self.opt}


class FOSLMode(SplitMode):
    """Split backprop: the server returns dL/dh, the client back-props it. ``hp.client_micro_batch``,
    ``hp.client_checkpointing`` and ``hp.client_fused_step`` make the client leaner
    (``hosl/training/lean_fo_client.py``)."""

    name = "fo-sl"

    def __init__(self, client, proxy, hp, loss_of):
        super().__init__(client, proxy, hp, loss_of)
        self.client_opt = _sgd(client.parameters(), hp.lr_client, hp)
        self.lean = LeanFOClient(client, self.client_opt, micro_batch=hp.client_micro_batch,
                                 checkpointing=hp.client_checkpointing, fused_step=hp.client_fused_step)

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        self.proxy.begin_step(self.step_number, batch)
        if self.lean.micro_batch is None:
            def run(rows):
                return self.run_client(ids, mask)
        else:
            run = self.client_rows_fn(ids, mask)
        loss = self.lean.step(run, ids.shape[0], self.proxy.backprop, measure=self.memory.measure_saved)
        self.proxy.end_step()
        return loss

    def optimizers(self):
        return {"client": self.client_opt}

    def client_optimizer_state_bytes(self):
        return sum(t.numel() * t.element_size() for s in self.client_opt.state.values()
                   for t in s.values() if isinstance(t, torch.Tensor))


class FrozenClientMode(SplitMode):
    """The server trains alone on the client's clean activation; the client is never updated. Its
    step is HOSL's clean pass and nothing else (same phases, same server optimizer), so the gap
    between the two is what the ZO client's 2Q perturbed forwards buy."""

    name = "frozen-client"

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        self.proxy.begin_step(self.step_number, batch)
        with torch.no_grad():
            h = self.run_client(ids, mask)
        loss = self.proxy.clean_loss(h)  # the server back-propagates on its side
        self.proxy.end_step()  # the server's optimizer steps (if the loss was finite)
        return loss

    def optimizers(self):
        return {}


class ZOSLMode(_ZOClientMode, SplitMode):
    """Both halves ZO with the same seeds: the server half is a peer of the client's optimizer, its
    coordinates numbered after the client's (one numbering of the whole model, as ``zo`` has)."""

    name = "zo-sl"

    def __init__(self, client, proxy, hp, loss_of):
        super().__init__(client, proxy, hp, loss_of)
        self.peer = ServerPerturbationPeer()
        self.opt = ZerothOrderOptimizer([client], peers=[self.peer], config=hp.zo_config("zo"))

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        self.proxy.begin_step(self.step_number, batch, client_coordinates=self.opt.layouts[0].numel)

        def loss():
            with torch.no_grad():
                if self.hp.client_micro_batch is None:
                    h = self.run_client(ids, mask)
                else:  # inside the optimizer's perturbed block: every slice at the same point
                    h = MicroBatchedClient(self.client_rows_fn(ids, mask), ids.shape[0], self.hp.client_micro_batch)()
            return self.proxy.losses(h, self.peer.point)

        value = float(self.opt.step(loss))
        self.proxy.end_step(*self.peer.take_update())  # empty when the update was skipped
        return value

    def optimizers(self):
        return {"zo": self.opt}


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


class ZOMode(_ZOClientMode, Mode):
    name = "zo"

    def __init__(self, client, server, hp, loss_of):
        super().__init__(client, server, hp, loss_of)
        self.whole = _Whole(client, server)
        self.opt = ZerothOrderOptimizer(self.whole, config=hp.zo_config("zo"))

    def step(self, batch) -> float:
        def loss():  # with query_batch, the output holds D copies of the batch: one loss per copy
            out = self.whole(*_inputs(batch))
            return self.loss_of(out, batch, out.shape[0] // batch["input_ids"].shape[0])
        return float(self.opt.step(loss))

    def optimizers(self):
        return {"zo": self.opt}


def make_mode(name: str, client, server, hp: Hyper, loss_of: LossFn, proxy: ServerProxy | None = None) -> Mode:
    """The mode ``name``. Split modes (hosl, fo-sl, zo-sl, frozen-client) need ``proxy`` (their server half);
    the unsplit baselines (fo, zo) need ``server``."""
    classes = {c.name: c for c in (HOSLMode, FOSLMode, ZOSLMode, FrozenClientMode, FOMode, ZOMode)}
    if name not in classes:
        raise ValueError(f"mode must be one of {list(MODES)}, got {name!r}")
    if name in SPLIT_MODES:
        if proxy is None:
            raise ValueError(f"mode {name!r} needs a ServerProxy to its server half")
        return classes[name](client, proxy, hp, loss_of)
    if server is None:
        raise ValueError(f"mode {name!r} runs the unsplit model and needs the server half in this process")
    return classes[name](client, server, hp, loss_of)
