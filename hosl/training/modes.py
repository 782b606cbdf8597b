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
from dataclasses import dataclass, field

import torch
from torch import nn

from hosl.optim import HybridOrderOptimizer, ZerothOrderOptimizer
from hosl.optim.config import ZOConfig
from hosl.optim.micro_batch import MicroBatchedClient, check_micro_batch
from hosl.optim.rules import rule_state_nbytes
from hosl.optim.zo_base import ZerothOrderBase
from hosl.tasks.evaluation import eval_outputs
from hosl.training.lean_fo_client import LeanFOClient
from hosl.training.memory import ClientMemory, plan_micro_batch, probe_row_cost, runtime_reserve
from hosl.training.server_proxy import ServerPerturbationPeer, ServerProxy

# loss_of(logits, batch, copies) -> scalar (copies == 1) or [copies] losses
LossFn = Callable[[torch.Tensor, dict, int], torch.Tensor]


@dataclass
class Hyper:
    """A run's optimizer settings: the ZO options (``zo``, one :class:`~hosl.optim.config.ZOConfig`
    for every ZO-trained half; its ``lr`` is also the FO client's rate in fo-sl) and the FO side's.

    The two ZO options the FO side reads too are declared below as properties under their training
    names (``hp.lr_client`` is ``hp.zo.lr``); every other ZO option is ``hp.zo.<field>``."""

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

    @property
    def lr_client(self) -> float:
        """The client's learning rate (``zo.lr``): the ZO rule's, or fo-sl's FO client's."""
        return self.zo.lr

    @property
    def weight_decay(self) -> float:
        """``zo.weight_decay``: the FO optimizers use the run's weight decay too."""
        return self.zo.weight_decay


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"]


class Mode:
    """A training mode. The class attributes say what kind it is; the mode lists below (``MODES``,
    ``SPLIT_MODES``, ...) are derived from them, so a new mode is one class added to ``MODE_CLASSES``."""

    name: str
    split = False  # split modes talk to their server half through a ServerProxy
    server_fo = False  # split modes: the server half trains first-order (its own optimizer)
    zo_client = False  # the client half trains by the ZO estimate (the _ZOClientMode classes)
    fo_client = False  # the client half trains first-order (it back-propagates: its memory holds the graph)
    query_batch = False  # takes --query-batch (its optimizer batches the perturbed points)
    proxy: ServerProxy  # split modes: their server half (SplitMode sets it)

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

    # rows per slice of the client's passes (--client-micro-batch; None: the whole batch at once). The
    # ZO client modes hold it in one place each: HOSL's optimizer (it slices its own passes), zo-sl's mode.
    client_micro_batch: int | None = None

    # 1-based number of the step being run; the loop sets it, split modes label their messages with it
    step_number = 0

    def step(self, batch) -> float:
        """One training step on ``batch``."""
        raise NotImplementedError

    def eval_outputs(self, batch, model_kind: str):
        """(option scores or class logits, summed loss) of ``batch`` at the current weights."""
        with torch.no_grad():
            return eval_outputs(self.server(self.client(*_inputs(batch)), batch["attention_mask"]), batch, model_kind)  # type: ignore[misc]  # split modes override this

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
    return torch.optim.SGD(
        [p for p in params if p.requires_grad], lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay
    )


class _ZOClientMode:
    """What the modes whose client runs a ZO optimizer (``self.opt``) report."""

    zo_client = True
    client: nn.Module  # the mode's (this is a mixin of Mode)
    opt: ZerothOrderBase  # each mode declares which
    memory: ClientMemory

    def client_optimizer_state_bytes(self):
        return self.opt.state_nbytes()

    def scratch_bytes(self):
        return self.opt.scratch_nbytes() + self.opt.estimate_nbytes()

    @property
    def skipped_updates(self):
        return self.opt.skipped_updates

    def set_client_micro_batch(self, rows: int | None) -> None:
        self.client_micro_batch = check_micro_batch(rows, "--client-micro-batch")

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
        plan = plan_micro_batch(
            budget,
            weights=weights,
            scratch=self.scratch_bytes() + state,
            output=out_row * batch_size,
            fixed_transient=fixed,
            per_row_transient=per_row,
            batch_size=batch_size,
            reserve=runtime_reserve(device),
        )
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
    opt: HybridOrderOptimizer
    server_fo = True
    query_batch = True

    def __init__(self, client, proxy, hp, loss_of):
        super().__init__(client, proxy, hp, loss_of)
        self.opt = HybridOrderOptimizer(client, None, config=hp.zo_config("hybrid"))
        # a fleet's client (hosl/training/fleet_client.py: FleetSync): sets the step's seeds and
        # applies the updates the server relays instead of its own
        self.sync = None

    @property  # the optimizer's setting, read and set through the mode
    def client_micro_batch(self) -> int | None:
        return self.opt.client_micro_batch

    @client_micro_batch.setter
    def client_micro_batch(self, rows: int | None) -> None:
        self.opt.client_micro_batch = rows

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        if self.sync is not None:
            self.sync.before_step(self.opt, self.step_number)
        self.proxy.begin_step(self.step_number, batch)
        server_loss = self.proxy.hosl_loss_fn(
            linear=self.hp.zo.server_estimate == "linear", server_grad=self.hp.zo.server_grad
        )
        perturbed = self.proxy.losses  # an explicit call per perturbed activation (the clean one backprops)
        if self.client_micro_batch is None:
            loss = float(self.opt.step(lambda: self.run_client(ids, mask), server_loss, perturbed_loss_fn=perturbed))
        else:  # the optimizer runs every pass in slices of client_micro_batch rows
            loss = float(
                self.opt.step(
                    self.client_rows_fn(ids, mask), server_loss, batch_size=ids.shape[0], perturbed_loss_fn=perturbed
                )
            )
        if self.sync is None:
            self.proxy.end_step()  # the server's optimizer steps (if the clean loss was finite)
        else:
            self.sync.end_step(self.opt, self.proxy)
        return loss

    def optimizers(self):
        return {"hybrid": self.opt}


class FOSLMode(SplitMode):
    """Split backprop: the server returns dL/dh, the client back-props it. ``hp.zo.client_micro_batch``,
    ``hp.client_checkpointing`` and ``hp.client_fused_step`` make the client leaner
    (``hosl/training/lean_fo_client.py``)."""

    name = "fo-sl"
    server_fo = True
    fo_client = True

    def __init__(self, client, proxy, hp, loss_of):
        super().__init__(client, proxy, hp, loss_of)
        self.client_opt = _sgd(client.parameters(), hp.lr_client, hp)
        self.lean = LeanFOClient(
            client,
            self.client_opt,
            micro_batch=hp.zo.client_micro_batch,
            checkpointing=hp.client_checkpointing,
            fused_step=hp.client_fused_step,
        )

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
        return sum(
            t.numel() * t.element_size()
            for s in self.client_opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )


class FrozenClientMode(SplitMode):
    """The server trains alone on the client's clean activation; the client is never updated. Its
    step is HOSL's clean pass and nothing else (same phases, same server optimizer), so the gap
    between the two is what the ZO client's 2Q perturbed forwards buy."""

    name = "frozen-client"
    server_fo = True

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
    opt: ZerothOrderOptimizer

    def __init__(self, client, proxy, hp, loss_of):
        super().__init__(client, proxy, hp, loss_of)
        self.peer = ServerPerturbationPeer()
        self.opt = ZerothOrderOptimizer([client], peers=[self.peer], config=hp.zo_config("zo"))
        self.client_micro_batch = hp.zo.client_micro_batch  # the ZO optimizer does not slice: the mode does

    def step(self, batch) -> float:
        ids, mask = _inputs(batch)
        self.proxy.begin_step(self.step_number, batch, client_coordinates=self.opt.layouts[0].numel)

        def loss():
            with torch.no_grad():
                if self.client_micro_batch is None:
                    h = self.run_client(ids, mask)
                else:  # inside the optimizer's perturbed block: every slice at the same point
                    h = MicroBatchedClient(self.client_rows_fn(ids, mask), ids.shape[0], self.client_micro_batch)()
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
    fo_client = True

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
    opt: ZerothOrderOptimizer
    query_batch = True

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


# Every mode, in the order of --mode's choices; the lists every other module reads are derived here.
MODE_CLASSES: tuple[type[Mode], ...] = (HOSLMode, FOSLMode, ZOSLMode, FrozenClientMode, FOMode, ZOMode)
MODES = tuple(c.name for c in MODE_CLASSES)
SPLIT_MODES = tuple(c.name for c in MODE_CLASSES if c.split)  # a client half and a server half (the protocol)
ZO_CLIENT_MODES = tuple(c.name for c in MODE_CLASSES if c.zo_client)
FO_CLIENT_MODES = tuple(c.name for c in MODE_CLASSES if c.fo_client)
SERVER_FO_MODES = tuple(c.name for c in MODE_CLASSES if c.split and c.server_fo)
# --client-micro-batch / --client-memory-budget: a ZO client that sends its activation
CLIENT_SLICING_MODES = tuple(m for m in SPLIT_MODES if m in ZO_CLIENT_MODES)
QUERY_BATCH_MODES = tuple(c.name for c in MODE_CLASSES if c.query_batch)


def make_mode(name: str, client, server, hp: Hyper, loss_of: LossFn, proxy: ServerProxy | None = None) -> Mode:
    """The mode ``name``. Split modes (``SPLIT_MODES``) need ``proxy`` (their server half);
    the unsplit baselines (fo, zo) need ``server``."""
    classes = {c.name: c for c in MODE_CLASSES}
    if name not in classes:
        raise ValueError(f"mode must be one of {list(MODES)}, got {name!r}")
    if name in SPLIT_MODES:
        if proxy is None:
            raise ValueError(f"mode {name!r} needs a ServerProxy to its server half")
        return classes[name](client, proxy, hp, loss_of)  # type: ignore[arg-type]  # a split mode's 2nd argument
    if server is None:
        raise ValueError(f"mode {name!r} runs the unsplit model and needs the server half in this process")
    return classes[name](client, server, hp, loss_of)
