"""The conversation between the client half and the server half, for the split modes.

One training step, as the client's modes (``hosl/training/modes.py``) drive it:

==========  =====================================  ==========================================
phase       up (client -> server)                  down (server -> client)
==========  =====================================  ==========================================
begin-step  attention mask + the batch's labels    (ack)
            [+ zo-sl: the client's coordinate
            count]
clean-loss  h (hosl: the clean activation)         loss; the server back-propagates it
losses      h (copies stacked) [+ zo-sl: seed,     one loss per copy, no grad
            scale of the point]
backprop    h (fo-sl)                              loss and dL/dh
end-step    [zo-sl: seeds, projected grads]        the count of skipped server steps; the
                                                   server's optimizer steps (unless the clean
                                                   loss or its gradient is not finite)
eval        h, mask, the batch's scoring tensors   option scores / class logits, loss sum
save        step                                   (ack) once the server's checkpoint is on disk
resume      step (0: fresh start)                  (ack) once the server has loaded that step
linear-     (hosl linear, --linear-on client)      dL/dh at the clean point (once per step)
grad
linear-     h+ - h- per direction (copies          <dL/dh, difference> per copy
dots        stacked; hosl linear, on the server)
==========  =====================================  ==========================================

HOSL's linear estimate (``--server-estimate linear``): the clean-loss request asks the server to
keep dL/dh (ints ``[1]``); the client then asks for the Q scalars (``linear-dots``, Q activation
differences up) or, only when the server was started with ``--linear-on client``, for dL/dh itself
(``linear-grad``, once). No ``losses`` phase runs.

ZO-SL numbers the coordinates of the whole model once, as the unsplit ``zo`` mode does: the server
half's first coordinate is the client's coordinate count, which the client sends with every
``begin-step`` (the server builds its ZO optimizer from the first one and refuses a different count
later). The two halves' perturbations are therefore independent parts of one direction, and ZO-SL
is MeZO on the whole model.

Labels travel up with the batch (``begin-step``), once per step: the client owns the data, and the
server never reads a dataset, so the two can never disagree on the data order. The server
sees labels, the attention mask and (for evaluation) the answer tokens, never the prompts.

:class:`ServerHalf` answers these phases (it runs in-process behind ``InProcessLink`` or in the
server process behind ``serve``); :class:`ServerProxy` is what the client's modes call.
"""

from __future__ import annotations

import contextlib
import enum
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hosl.optim import ZerothOrderOptimizer
from hosl.optim import functional as F
from hosl.optim.hygiene import ServerGrads
from hosl.tasks.evaluation import eval_outputs
from hosl.training.schedule import make_server_optimizer, schedule_step
from hosl.transport import Link, Message
from hosl.transport.wire import Kind, from_int64, to_int64


class Phase(enum.IntEnum):
    BEGIN_STEP = 1
    CLEAN_LOSS = 2
    LOSSES = 3
    BACKPROP = 4
    END_STEP = 5
    EVAL = 6
    SAVE = 7
    RESUME = 8
    LINEAR_GRAD = 9
    LINEAR_DOTS = 10


PHASE_NAMES = {int(p): p.name.lower().replace("_", "-") for p in Phase}
SPLIT_MODES = ("hosl", "fo-sl", "zo-sl")

# What of a batch the server needs, by model kind (training / evaluation), in wire order.
_TRAIN_KEYS = ("labels",)
_EVAL_KEYS = {"causal_lm": ("labels", "answer_mask", "answer_ids"), "classifier": ("labels",)}


def server_side_of(batch: dict, model_kind: str, for_eval: bool) -> list[torch.Tensor]:
    """The tensors of ``batch`` the server needs (after the attention mask)."""
    keys = _EVAL_KEYS[model_kind] if for_eval else _TRAIN_KEYS
    if "answer_ids" in keys:
        # option scores read the input ids only at answer positions: send just those
        batch = dict(batch, answer_ids=batch["input_ids"].masked_fill(~batch["answer_mask"], 0))
    return [batch[k] for k in keys]


def batch_from_server_side(tensors: list[torch.Tensor], model_kind: str, for_eval: bool) -> dict:
    keys = _EVAL_KEYS[model_kind] if for_eval else _TRAIN_KEYS
    batch = dict(zip(keys, tensors))
    if "answer_ids" in batch:
        batch["input_ids"] = batch.pop("answer_ids")
    return batch


class ServerHalf:
    """The server's side of one split mode: its module, its optimizer, the loss, its RNG.

    ``handle(request) -> reply`` is the whole interface. Dropout on the server draws from the
    server's own random stream (swapped in around every server computation), so a two-process run
    and an in-process run draw the same masks on both halves.
    """

    def __init__(self, server: nn.Module, mode: str, hp, loss_of: Callable, model_kind: str, *,
                 train_dropout: bool, checkpoint_dir: Path | None = None, resume_allowed: bool = True,
                 trainable_only_checkpoints: bool = False):
        if mode not in SPLIT_MODES:
            raise ValueError(f"mode {mode!r} has no server half; split modes are {', '.join(SPLIT_MODES)}")
        self.server, self.mode, self.hp, self.loss_of, self.model_kind = server, mode, hp, loss_of, model_kind
        self.train_dropout = train_dropout
        self.checkpoint_dir = checkpoint_dir
        self.resume_allowed = resume_allowed
        self.trainable_only_checkpoints = trainable_only_checkpoints  # LoRA: the adapters only
        self.rng_state = torch.Generator().manual_seed(hp.seed + 1).get_state()
        self.optimizer: torch.optim.Optimizer | None = None
        # zo-sl: built once the client's coordinate count is known (the first begin-step)
        self.zo: ZerothOrderOptimizer | None = None
        self._pending_zo_state: dict | None = None  # a resumed zo state, loaded when self.zo is built
        self.skipped_optimizer_steps = 0  # hosl, fo-sl: server steps skipped for a non-finite loss or gradient
        if mode in ("hosl", "fo-sl"):
            self.optimizer = make_server_optimizer(server.parameters(), hp)  # --server-optimizer
        self.batch: dict = {}
        self.mask: torch.Tensor | None = None
        self.clean_loss = math.nan
        self.activation_grad: torch.Tensor | None = None  # hosl linear: dL/dh at this step's clean point
        self.server.train(train_dropout)

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
            self.zo = ZerothOrderOptimizer(self.server, config=self.hp.zo_config("zo"), coordinate_offset=client_coordinates)
            if self._pending_zo_state is not None:
                self.zo.load_state_dict(self._pending_zo_state)
                self._pending_zo_state = None
        elif self.zo.layouts[0].offset != client_coordinates:
            raise ValueError(f"the client now counts {client_coordinates} coordinates, but the server half's "
                             f"numbering starts at {self.zo.layouts[0].offset}: the two halves do not belong to one model")
        return self.zo

    def _device(self) -> torch.device:
        return next(self.server.parameters()).device

    def _loss(self, h: torch.Tensor) -> torch.Tensor:
        rows = self.mask.shape[0]
        copies = h.shape[0] // rows
        mask = self.mask.repeat(copies, 1) if copies > 1 else self.mask
        return self.loss_of(self.server(h, mask), self.batch, copies)

    @staticmethod
    def _reply(request: Message, **kw) -> Message:
        return Message(Kind.REPLY, request.phase, request.step, **kw)

    # -- phases -----------------------------------------------------------------------------------
    def handle(self, request: Message) -> Message:
        dev = self._device()
        tensors = [t.to(dev) for t in request.tensors]
        phase = Phase(request.phase)
        with self.own_rng():
            if phase == Phase.BEGIN_STEP:
                self.mask, *rest = tensors
                self.batch = batch_from_server_side(rest, self.model_kind, for_eval=False)
                if self.optimizer is not None:  # gradients of a step the client abandoned never carry over
                    self.optimizer.zero_grad(set_to_none=True)
                if self.mode == "zo-sl":
                    if len(request.ints) != 1:
                        raise ValueError("a zo-sl begin-step must carry the client's coordinate count")
                    self.zo_for(request.ints[0])
                # --lr-schedule: this step's rates, from the step number the client sent
                schedule_step(self.hp, request.step, {self.optimizer: self.hp.lr_server, self.zo: self.hp.lr_client})
                return self._reply(request)
            if phase == Phase.CLEAN_LOSS:  # hosl: FO at the clean point
                h = tensors[0]
                keep_grad = bool(request.ints) and request.ints[0] == 1  # hosl linear: keep dL/dh
                if keep_grad:
                    h = h.detach().requires_grad_(True)
                loss = self._loss(h)
                self.clean_loss = float(loss.detach())
                if loss.requires_grad and math.isfinite(self.clean_loss):
                    loss.backward()
                self.activation_grad = h.grad if keep_grad else None
                return self._reply(request, floats=[self.clean_loss])
            if phase in (Phase.LINEAR_GRAD, Phase.LINEAR_DOTS):
                return self._linear_reply(request, phase, tensors)
            if phase == Phase.LOSSES:
                point = self.zo.at_point(from_int64(request.ints[0]), request.floats[0]) \
                    if request.ints else contextlib.nullcontext()
                with torch.no_grad(), point:
                    out = self._loss(tensors[0])
                losses = [float(out)] if out.dim() == 0 else out.float().tolist()
                return self._reply(request, floats=losses)
            if phase == Phase.BACKPROP:  # fo-sl: dL/dh goes back down
                h = tensors[0].detach().requires_grad_(True)
                loss = self._loss(h)
                loss.backward()
                self.clean_loss = float(loss.detach())
                return self._reply(request, floats=[self.clean_loss], tensors=[h.grad])
            if phase == Phase.END_STEP:
                self._end_step(request)
                return self._reply(request, ints=[self.skipped_server_steps])
            if phase == Phase.EVAL:
                return self._eval(request, tensors)
        if phase == Phase.SAVE:
            self.save(request.step)
            return self._reply(request)
        if phase == Phase.RESUME:
            self.resume(request.step)
            return self._reply(request)
        raise ValueError(f"unknown phase {request.phase}")

    def _linear_reply(self, request: Message, phase: Phase, tensors: list[torch.Tensor]) -> Message:
        """hosl's linear estimate: dL/dh itself (only with linear_on='client') or its dot products."""
        if self.activation_grad is None:
            raise ValueError("no dL/dh at the clean point for this step (the clean-loss request did not ask to "
                             "keep it, the clean loss was not finite, or the server half has no gradient)")
        if phase == Phase.LINEAR_GRAD:
            if getattr(self.hp, "linear_on", "server") != "client":
                raise ValueError("the client asked for dL/dh but this server keeps it (linear_on='server'); "
                                 "start both sides with --linear-on client to send it down")
            return self._reply(request, tensors=[self.activation_grad])
        from hosl.optim.linear_estimate import dot_per_copy

        return self._reply(request, floats=dot_per_copy(self.activation_grad, tensors[0]))

    @property
    def skipped_server_steps(self) -> int:
        """Server updates skipped: a non-finite clean loss or gradient (hosl, fo-sl), or a ZO update
        that could make a server weight non-finite (zo-sl)."""
        return self.skipped_optimizer_steps + (self.zo.skipped_updates if self.zo is not None else 0)

    def _end_step(self, request: Message) -> None:
        if self.optimizer is not None:
            if math.isfinite(self.clean_loss) and ServerGrads(self.optimizer).finite():
                self.optimizer.step()
            else:
                self.skipped_optimizer_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        elif request.ints:  # zo-sl: the client's update, with the same seeds and estimates
            self.zo.apply_update([from_int64(s) for s in request.ints], request.floats)
        self.clean_loss = math.nan
        self.activation_grad = None

    def _eval(self, request: Message, tensors: list[torch.Tensor]) -> Message:
        h, mask, *rest = tensors
        batch = batch_from_server_side(rest, self.model_kind, for_eval=True)
        self.server.train(False)
        try:
            with torch.no_grad():
                out, loss_sum = eval_outputs(self.server(h, mask), batch, self.model_kind)
        finally:
            self.server.train(self.train_dropout)
        return self._reply(request, floats=[loss_sum], tensors=[out])

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped_optimizer_steps": self.skipped_optimizer_steps,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "zo": self.zo.state_dict() if self.zo is not None else self._pending_zo_state,
                "rng_state": self.rng_state}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.mode == "zo-sl" and state.get("zo") is not None:
            if self.zo is not None:
                self.zo.load_state_dict(state["zo"])
            else:
                self._pending_zo_state = state["zo"]
        self.rng_state = state["rng_state"]
        self.skipped_optimizer_steps = state.get("skipped_optimizer_steps", 0)

    def save(self, step: int) -> None:
        """Server-process checkpoints (in-process runs save the server with the client instead)."""
        from hosl.training import checkpoint as ckpt

        if self.checkpoint_dir is None:
            raise RuntimeError("this server half has no checkpoint folder")
        # keep two: the client saves after the server, so it may die holding only the previous one
        ckpt.save_checkpoint(self.checkpoint_dir, step, {"server": self.server},
                             {"step": step, "server_half": self.state_dict()}, keep=2,
                             trainable_only=self.trainable_only_checkpoints)

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
            raise FileNotFoundError(f"the client resumes at step {step} but the server has no checkpoint for it "
                                    f"in {self.checkpoint_dir} (has: {have})")
        state = ckpt.load_checkpoint(path, {"server": self.server})
        # the learning rates come from this process's settings (checked against the run's on start,
        # so they differ only under --override), not from the checkpoint
        half = dict(state["server_half"])
        if self.optimizer is not None and half.get("optimizer") is not None:
            half["optimizer"] = ckpt.with_current_lr(self.optimizer, half["optimizer"])
        if half.get("zo") is not None:
            half["zo"] = ckpt.with_lr(half["zo"], self.hp.lr_client)
        self.load_state_dict(half)


class ServerProxy:
    """The server half as the client's modes see it: one method per phase, over any ``Link``."""

    def __init__(self, link: Link, model_kind: str):
        self.link, self.model_kind = link, model_kind
        self.step = 0
        self.rows = 0
        self.skipped_server_steps = 0  # as the server half last reported it (end-step)

    def begin_step(self, step: int, batch: dict, client_coordinates: int | None = None) -> None:
        """``client_coordinates`` (zo-sl): where the server half's coordinate numbering starts."""
        self.step, self.rows = step, batch["attention_mask"].shape[0]
        self.link.call(Phase.BEGIN_STEP, step, ints=[] if client_coordinates is None else [client_coordinates],
                       tensors=[batch["attention_mask"], *server_side_of(batch, self.model_kind, for_eval=False)])

    def clean_loss(self, h: torch.Tensor, keep_grad: bool = False) -> float:
        """The server's loss at the clean point, back-propagated there (``keep_grad``: and dL/dh kept
        for the linear estimate)."""
        ints = [1] if keep_grad else []
        return self.link.call(Phase.CLEAN_LOSS, self.step, ints=ints, tensors=[h.detach()], expect_floats=1).floats[0]

    def losses(self, h: torch.Tensor, point: tuple[int, float] | None = None) -> torch.Tensor:
        """Losses without grad: a scalar for one copy of the batch, ``[copies]`` for several."""
        ints, floats = ([to_int64(point[0])], [point[1]]) if point is not None else ([], [])
        values = self.link.call(Phase.LOSSES, self.step, ints=ints, floats=floats, tensors=[h.detach()],
                                expect_floats=max(1, h.shape[0] // max(self.rows, 1))).floats
        return torch.tensor(values[0] if h.shape[0] == self.rows else values, dtype=torch.float64)

    def backprop(self, h: torch.Tensor) -> tuple[float, torch.Tensor]:
        reply = self.link.call(Phase.BACKPROP, self.step, tensors=[h.detach()], expect_floats=1, expect_tensors=1)
        return reply.floats[0], reply.tensors[0]

    def end_step(self, seeds=(), grads=()) -> None:
        reply = self.link.call(Phase.END_STEP, self.step, ints=[to_int64(s) for s in seeds], floats=list(grads))
        if reply.ints:
            self.skipped_server_steps = reply.ints[0]

    def eval_outputs(self, h: torch.Tensor, batch: dict) -> tuple[torch.Tensor, float]:
        reply = self.link.call(Phase.EVAL, self.step, tensors=[
            h.detach(), batch["attention_mask"], *server_side_of(batch, self.model_kind, for_eval=True)],
            expect_floats=1, expect_tensors=1)
        return reply.tensors[0], reply.floats[0]

    def save(self, step: int) -> None:
        self.link.call(Phase.SAVE, step)

    def resume(self, step: int) -> None:
        self.link.call(Phase.RESUME, step)

    def hosl_loss_fn(self, linear: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """``server_loss_fn`` for ``HybridOrderOptimizer.step``: the clean point (the server
        back-propagates on its side and the returned loss carries no graph). The perturbed
        activations go to :meth:`losses`, passed as ``perturbed_loss_fn``: each call says which
        it is. ``linear``: the server keeps dL/dh and ``server_loss.linear_server()`` reaches it
        (``server_estimate="linear"``)."""

        def server_loss(h: torch.Tensor) -> torch.Tensor:
            return torch.tensor(self.clean_loss(h, keep_grad=linear), dtype=torch.float64)

        server_loss.linear_server = lambda: RemoteLinearServer(self)  # hosl's linear estimate
        return server_loss


class RemoteLinearServer:
    """:class:`hosl.optim.linear_estimate.LinearServer` over the link: dL/dh stays on the server
    (``directional``: the differences go up, one scalar per copy comes down) unless the server
    allows ``activation_grad`` (``--linear-on client``)."""

    def __init__(self, proxy: ServerProxy):
        self.proxy = proxy

    def activation_grad(self) -> torch.Tensor:
        return self.proxy.link.call(Phase.LINEAR_GRAD, self.proxy.step).tensors[0]

    def directional(self, deltas: torch.Tensor) -> list[float]:
        return list(self.proxy.link.call(Phase.LINEAR_DOTS, self.proxy.step, tensors=[deltas.detach()]).floats)


class ServerPerturbationPeer:
    """ZO-SL: the server's half as a peer of the client's ``ZerothOrderOptimizer``. It records the
    point being evaluated (sent with the activation) and the step's update (sent at step end)."""

    def __init__(self):
        self.point: tuple[int, float] | None = None
        self.pending_update: tuple[list[int], list[float]] = ([], [])

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float):
        self.point = (seed, scale)
        try:
            yield
        finally:
            self.point = None

    def update(self, seeds, grads) -> None:
        self.pending_update = (list(seeds), list(grads))

    def take_update(self) -> tuple[list[int], list[float]]:
        update, self.pending_update = self.pending_update, ([], [])
        return update
