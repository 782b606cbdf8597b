"""The server's side of a split mode: :class:`ServerHandler` answers the phases of
``hosl/training/protocol.py``, one method per phase.

It runs in-process behind an ``InProcessLink`` (``hosl train``) or in the server process behind
``serve`` (``hosl serve``, ``hosl/training/remote.py``). The server's layers themselves are the
``nn.Module`` of ``hosl/models/halves.py`` (``ServerHalf``); this class holds that module with
its optimizer, the loss, its random stream and the step's state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hosl.optim import ZerothOrderOptimizer
from hosl.optim.hygiene import ServerGrads
from hosl.tasks.evaluation import eval_outputs
from hosl.training import sharded_checkpoint
from hosl.training.modes import SERVER_FO_MODES, SPLIT_MODES
from hosl.training.protocol import (
    KEEP_ACTIVATION_GRAD,
    NO_BACKWARD,
    WEIGHTED_BACKWARD,
    ActivationWire,
    Phase,
    ZOPoint,
    ZOUpdate,
    batch_from_server_side,
)
from hosl.training.schedule import make_server_optimizer, schedule_step
from hosl.training.server_group import ServerGroup
from hosl.transport import Message
from hosl.transport.wire import Kind


class ServerHandler:
    """The server's side of one split mode: its module, its optimizer, the loss, its RNG.

    ``handle(request) -> reply`` is the whole interface. Which passes compute with grad is the
    phase's to say (``clean-loss``, ``backprop``: with grad, and back-propagated; ``losses``,
    ``eval``: without), whatever grad mode the caller is in. Dropout on the server draws from the
    server's own random stream (swapped in around every server computation), so a two-process run
    and an in-process run draw the same masks on both halves.
    """

    def __init__(
        self,
        server: nn.Module,
        mode: str,
        hp,
        loss_of: Callable,
        model_kind: str,
        *,
        train_dropout: bool,
        checkpoint_dir: Path | None = None,
        resume_allowed: bool = True,
        trainable_only_checkpoints: bool = False,
        wire: str = "native",
        group: ServerGroup | None = None,
    ):
        if mode not in SPLIT_MODES:
            raise ValueError(f"mode {mode!r} has no server half; split modes are {', '.join(SPLIT_MODES)}")
        self.group = group or ServerGroup()  # --server-procs: this rank of the server's processes
        if self.group.distributed and self.group.parallel == "fsdp" and mode == "zo-sl":
            raise ValueError(
                "--mode zo-sl perturbs whole server weights in place; with --server-procs > 1 use "
                "--server-parallel ddp (FSDP2 shards them)"
            )
        self.server, self.mode, self.hp, self.loss_of, self.model_kind = server, mode, hp, loss_of, model_kind
        self.forward_module = self.group.wrap(server)  # server itself, or its DDP / FSDP2 form
        self.train_dropout = train_dropout
        self.checkpoint_dir = checkpoint_dir
        # the run's one format of server checkpoints (hosl/training/sharded_checkpoint.py): sharded
        # (dcp) for a run begun with fsdp over several ranks, one process's (safetensors) otherwise
        self.checkpoint_format = sharded_checkpoint.choose_format(checkpoint_dir, self.group.sharded)
        self.resume_allowed = resume_allowed
        self.trainable_only_checkpoints = trainable_only_checkpoints  # LoRA: the adapters only
        self.rng_state = torch.Generator().manual_seed(hp.zo.seed + 1).get_state()
        self.optimizer: torch.optim.Optimizer | None = None
        # zo-sl: built once the client's coordinate count is known (the first begin-step)
        self.zo: ZerothOrderOptimizer | None = None
        self._pending_zo_state: dict | None = None  # a resumed zo state, loaded when self.zo is built
        self.skipped_optimizer_steps = (
            0  # hosl, fo-sl, frozen-client: server steps skipped for a non-finite loss or gradient
        )
        if mode in SERVER_FO_MODES:
            self.optimizer = make_server_optimizer(server.parameters(), hp)  # --server-optimizer
        self.batch: dict = {}
        self.mask: torch.Tensor | None = None
        self.clean_loss = math.nan
        self.activation_grad: torch.Tensor | None = None  # hosl linear: dL/dh at this step's clean point
        self.wire = ActivationWire(wire)  # --wire: how activations arrive (delta8 keeps the step's reference)
        self.forward_module.train(train_dropout)
        # phase -> (method(request, tensors) -> reply, runs on the server's random stream)
        self._phases = {
            Phase.BEGIN_STEP: (self._begin_step, True),
            Phase.CLEAN_LOSS: (self._clean_loss, True),
            Phase.LOSSES: (self._losses, True),
            Phase.BACKPROP: (self._backprop, True),
            Phase.END_STEP: (self._end_step, True),
            Phase.EVAL: (self._eval, True),
            Phase.LINEAR_GRAD: (self._linear_grad, True),
            Phase.LINEAR_DOTS: (self._linear_dots, True),
            Phase.SAVE: (self._save, False),
            Phase.RESUME: (self._resume, False),
        }

    def handle(self, request: Message) -> Message:
        if self.group.distributed:  # rank 0: the other server ranks answer every request too
            self.group.share(request)
        return self.answer(request)

    def answer(self, request: Message) -> Message:
        """This rank's part of ``request`` (the whole of it with one server process)."""
        method, on_own_rng = self._phases[Phase(request.phase)]  # an unknown phase is a ValueError
        dev = self._device()
        tensors = [t.to(dev) for t in request.tensors]
        with self.own_rng() if on_own_rng else contextlib.nullcontext():
            return method(request, tensors)

    # -- helpers ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def own_rng(self):
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)

    def zo_for(self, client_coordinates: int) -> ZerothOrderOptimizer:
        """ZO-SL: the server's ZO optimizer, its coordinates numbered after the client's
        ``client_coordinates`` (built on first use; a later different count is refused)."""
        if self.zo is None:
            # perturbed and updated with the client's seeds, direction family and update rule (its
            # generator is unused; a momentum/adam rule keeps its own state of the server's weights)
            self.zo = ZerothOrderOptimizer(
                self.server, config=self.hp.zo_config("zo"), coordinate_offset=client_coordinates
            )
            if self._pending_zo_state is not None:
                self.zo.load_state_dict(self._pending_zo_state)
                self._pending_zo_state = None
        elif self.zo.layouts[0].offset != client_coordinates:
            raise ValueError(
                f"the client now counts {client_coordinates} coordinates, but the server half's "
                f"numbering starts at {self.zo.layouts[0].offset}: the two halves do not belong to one model"
            )
        return self.zo

    def _device(self) -> torch.device:
        return next(self.server.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.server.parameters()).dtype

    def _loss(self, h: torch.Tensor) -> torch.Tensor:
        """The mean loss of the batch at ``h`` (copies stacked: one per copy); several server ranks
        each compute it on their rows and the group combines them."""
        assert self.mask is not None  # set by begin-step
        rows, group = self.mask.shape[0], self.group
        copies = h.shape[0] // rows
        mask, batch = group.rows_of(self.mask, rows), {k: group.rows_of(v, rows) for k, v in self.batch.items()}
        mask = mask.repeat(copies, 1) if copies > 1 else mask
        local = self.loss_of(self.forward_module(group.rows_of(h, rows), mask), batch, copies)
        return group.mean(local, self._loss_weight(batch) if group.has_rows(rows) else 0.0)

    def _loss_weight(self, batch: dict) -> float:
        """A rank's share of the batch's mean loss: its rows (classifier), or its answer tokens
        (causal LM: the labels predicted from the position before)."""
        labels = batch["labels"]
        return float(labels.shape[0] if self.model_kind == "classifier" else (labels[:, 1:] != -100).sum())

    @staticmethod
    def _reply(request: Message, **kw) -> Message:
        return Message(Kind.REPLY, request.phase, request.step, **kw)

    @property
    def skipped_server_steps(self) -> int:
        """Server updates skipped: a non-finite clean loss or gradient (hosl, fo-sl), or a ZO update
        that could make a server weight non-finite (zo-sl)."""
        return self.skipped_optimizer_steps + (self.zo.skipped_updates if self.zo is not None else 0)

    # -- a training step --------------------------------------------------------------------------
    def _begin_step(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        self.mask, *rest = tensors
        self.batch = batch_from_server_side(rest, self.model_kind, for_eval=False)
        self.wire.end_step()
        if self.optimizer is not None:  # gradients of a step the client abandoned never carry over
            self.optimizer.zero_grad(set_to_none=True)
        if self.mode == "zo-sl":
            if len(request.ints) != 1:
                raise ValueError("a zo-sl begin-step must carry the client's coordinate count")
            self.zo_for(request.ints[0])
        # --lr-schedule: this step's rates, from the step number the client sent
        schedule_step(self.hp, request.step, {self.optimizer: self.hp.lr_server, self.zo: self.hp.lr_client})
        return self._reply(request)

    def _clean_loss(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        """hosl, frozen-client: FO at the clean point, back-propagated into the server's weights (and
        dL/dh kept when the request asks for it: the linear estimate)."""
        flag = request.ints[0] if request.ints else None
        if flag == WEIGHTED_BACKWARD:  # --server-grad perturbed: a + point, back-propagated with weight 1/Q
            return self._weighted_backward(request, self.wire.unpack(tensors, "plain", self._dtype())[0])
        h, _ = self.wire.unpack(tensors, "clean", self._dtype())
        keep_grad = flag == KEEP_ACTIVATION_GRAD
        if flag == NO_BACKWARD:  # --server-grad perturbed: the clean point gives the loss only
            with torch.no_grad():
                self.clean_loss = float(self._loss(h))
            self.activation_grad = None
            return self._reply(request, floats=[self.clean_loss])
        if keep_grad:
            h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss(h)
            self.clean_loss = float(loss.detach())
            if loss.requires_grad and math.isfinite(self.clean_loss):  # no grad: a frozen server
                loss.backward()
        self.activation_grad = self.group.input_grad(h.grad) if keep_grad else None
        return self._reply(request, floats=[self.clean_loss])

    def _weighted_backward(self, request: Message, h: torch.Tensor) -> Message:
        if len(request.floats) != 1:
            raise ValueError("a weighted-backward clean-loss request must carry its weight")
        with torch.enable_grad():
            loss = self._loss(h)
            value = float(loss.detach())
            if loss.requires_grad and math.isfinite(value):
                (loss * request.floats[0]).backward()
        if not math.isfinite(value):
            self.clean_loss = math.nan  # a non-finite point: the server skips this step, as in-process
        return self._reply(request, floats=[value])

    def _losses(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        """Losses without grad, one per copy stacked in h: hosl's perturbed activations, or (zo-sl)
        the server half at the request's ZO point."""
        point = ZOPoint.from_fields(request.ints, request.floats)
        at_point = self.zo.at_point(*point) if point is not None else contextlib.nullcontext()  # type: ignore[union-attr]  # zo-sl: built at begin-step
        with torch.no_grad(), at_point:
            out = self._loss(self.wire.unpack(tensors, "copies", self._dtype())[0])
        losses = [float(out)] if out.dim() == 0 else out.float().tolist()
        return self._reply(request, floats=losses)

    def _backprop(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        """fo-sl: the loss back-propagated through the server; dL/dh goes back down."""
        h = self.wire.unpack(tensors, "plain", self._dtype())[0].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss(h)
            loss.backward()
        self.clean_loss = float(loss.detach())
        return self._reply(request, floats=[self.clean_loss], tensors=[self.group.input_grad(h.grad)])

    def _end_step(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        if self.optimizer is not None:
            if math.isfinite(self.clean_loss) and ServerGrads(self.optimizer).finite():
                self.optimizer.step()
            else:
                self.skipped_optimizer_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        elif request.ints:  # zo-sl: the client's update, with the same seeds and estimates
            self.zo.apply_update(*ZOUpdate.from_fields(request.ints, request.floats))  # type: ignore[union-attr]  # zo-sl: built at begin-step
        self.clean_loss = math.nan
        self.activation_grad = None
        self.wire.end_step()
        return self._reply(request, ints=[self.skipped_server_steps])

    # -- hosl's linear estimate -------------------------------------------------------------------
    def _kept_activation_grad(self) -> torch.Tensor:
        if self.activation_grad is None:
            raise ValueError(
                "no dL/dh at the clean point for this step (the clean-loss request did not ask to "
                "keep it, the clean loss was not finite, or the server half has no gradient)"
            )
        return self.activation_grad

    def _linear_grad(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        """dL/dh itself, only with linear_on='client'."""
        grad = self._kept_activation_grad()
        if self.hp.zo.linear_on != "client":
            raise ValueError(
                "the client asked for dL/dh but this server keeps it (linear_on='server'); "
                "start both sides with --linear-on client to send it down"
            )
        return self._reply(request, tensors=[grad])

    def _linear_dots(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        """<dL/dh, difference> for each activation difference stacked in the request."""
        from hosl.optim.linear_estimate import dot_per_copy

        deltas, _ = self.wire.unpack(tensors, "difference", self._dtype())
        return self._reply(request, floats=dot_per_copy(self._kept_activation_grad(), deltas))

    # -- evaluation -------------------------------------------------------------------------------
    def _eval(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        h, (mask, *rest) = self.wire.unpack(tensors, "plain", self._dtype())
        batch = batch_from_server_side(rest, self.model_kind, for_eval=True)
        rows, group = mask.shape[0], self.group
        batch = {k: group.rows_of(v, rows) for k, v in batch.items()}
        self.forward_module.train(False)
        try:
            with torch.no_grad():
                out, loss_sum = eval_outputs(
                    self.forward_module(group.rows_of(h, rows), group.rows_of(mask, rows)), batch, self.model_kind
                )
        finally:
            self.forward_module.train(self.train_dropout)
        out, loss_sum = group.gather_rows(out, rows), group.total(loss_sum, counts=group.has_rows(rows))
        return self._reply(request, floats=[loss_sum], tensors=[out])

    # -- checkpoints ------------------------------------------------------------------------------
    def _save(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        self.save(request.step)  # every rank: writes its shards (dcp), or gathers them to rank 0
        return self._reply(request)

    def _resume(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        self.resume(request.step)
        return self._reply(request)

    def state_dict(self, optimizer: bool = True) -> dict:
        """The server half's state beside its weights; ``optimizer=False``: without the optimizer's
        (a sharded checkpoint holds it with the weights)."""
        return {
            "skipped_optimizer_steps": self.skipped_optimizer_steps,
            "optimizer": (
                self.group.full_optimizer_state(self.server, self.optimizer)
                if self.optimizer is not None and optimizer
                else None
            ),
            "zo": self.zo.state_dict() if self.zo is not None else self._pending_zo_state,
            "rng_state": self.rng_state,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.group.load_full_optimizer_state(self.server, self.optimizer, state["optimizer"])
        if self.mode == "zo-sl" and state.get("zo") is not None:
            if self.zo is not None:
                self.zo.load_state_dict(state["zo"])
            else:
                self._pending_zo_state = state["zo"]
        self.rng_state = state["rng_state"]
        self.skipped_optimizer_steps = state.get("skipped_optimizer_steps", 0)

    def save(self, step: int) -> None:
        """Server-process checkpoints (in-process runs save the server with the client instead):
        in the run's format (``self.checkpoint_format``): each rank its shards (dcp), or one server
        process's (fsdp gathers the shards to rank 0). Every rank calls it; rank 0 commits."""
        from hosl.training import checkpoint as ckpt

        if self.checkpoint_format == sharded_checkpoint.SHARDED:
            if self.checkpoint_dir is None:
                raise RuntimeError("this server half has no checkpoint folder")
            sharded_checkpoint.save_sharded(
                self.checkpoint_dir,
                step,
                self.server,
                self.optimizer,
                {"step": step, "server_half": self.state_dict(optimizer=False)},
                self.group,
                keep=2,
                trainable_only=self.trainable_only_checkpoints,
            )
            return
        weights, state = self.group.full_state(self.server), self.state_dict()
        if self.group.rank != 0:
            return
        if self.checkpoint_dir is None:
            raise RuntimeError("this server half has no checkpoint folder")
        if self.trainable_only_checkpoints:
            trainable = {k for k, p in self.server.named_parameters() if p.requires_grad}
            weights = {k: v for k, v in weights.items() if k in trainable}
        # keep two: the client saves after the server, so it may die holding only the previous one
        ckpt.save_checkpoint(
            self.checkpoint_dir,
            step,
            {"server": weights},
            {"step": step, "server_half": state},
            keep=2,
            trainable_only=self.trainable_only_checkpoints,
        )

    def resume(self, step: int) -> None:
        from hosl.training import checkpoint as ckpt

        if step == 0:
            return
        if not self.resume_allowed:
            raise ValueError(f"the client resumes at step {step} but the server was not started with --resume")
        if self.checkpoint_dir is None:
            raise RuntimeError("this server half has no checkpoint folder")
        path = ckpt.checkpoint_at(self.checkpoint_dir, step)
        if path is None:
            have = ", ".join(p.name for p in ckpt.list_checkpoints(self.checkpoint_dir)) or "none"
            raise FileNotFoundError(
                f"the client resumes at step {step} but the server has no checkpoint for it "
                f"in {self.checkpoint_dir} (has: {have})"
            )
        if self.checkpoint_format == sharded_checkpoint.SHARDED:  # the optimizer's state comes with the shards
            state = sharded_checkpoint.load_sharded(path, self.server, self.optimizer, self.group)
        else:
            state = ckpt.load_checkpoint(path, {"server": self.server}, load_state=self.group.load_full_state)
        # the learning rates come from this process's settings (checked against the run's on start,
        # so they differ only under --override), not from the checkpoint
        half = dict(state["server_half"])
        if self.optimizer is not None and half.get("optimizer") is not None:
            half["optimizer"] = ckpt.with_current_lr(self.optimizer, half["optimizer"])
        if half.get("zo") is not None:
            half["zo"] = ckpt.with_lr(half["zo"], self.hp.lr_client)
        self.load_state_dict(half)
