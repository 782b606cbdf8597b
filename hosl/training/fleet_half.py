"""The server half as a fleet drives it (``hosl serve --clients N``, docs/fleet.md): one
:class:`~hosl.training.server_handler.ServerHandler` answering N clients, each with its own step
state, and the end of a round (the accumulated gradient divided by the number of clean losses, one
optimizer step).

Every operation is a :class:`~hosl.transport.wire.Message`, so the same object answers in the
serving process (one server process) or on every rank of ``--server-procs P``: there the serving
process relays each operation to rank 0 (``hosl/training/server_ranks.py``), which shares it with
the other ranks as :meth:`ServerHandler.handle` shares a request, and every rank answers it. The
operations:

* a client's request: the request itself with ``code`` set to the client's rank (1..N);
* ``FINISH_ROUND`` (``step``; ints: the number of clean losses back-propagated this round, then
  the member ranks in rank order); the reply is the end-step reply (ints: the server's skipped
  steps);
* ``FORGET`` (``code``: a rank): that client left; its state goes;
* ``save`` and ``resume`` with ``code`` 0: the server half's checkpoint (``resume`` replies with
  the skipped steps it restored).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch

from hosl.training.protocol import ActivationWire, Phase
from hosl.training.server_handler import ServerHandler
from hosl.transport.wire import Kind, Message

FINISH_ROUND = -1  # operations of the fleet's own (negative: never a protocol phase)
FORGET = -2


def client_request(rank: int, request: Message) -> Message:
    """Client ``rank``'s request as an operation."""
    return replace(request, code=rank)


def finish_round(step: int, clean_count: int, members: list[int]) -> Message:
    return Message(Kind.REQUEST, FINISH_ROUND, step, [clean_count, *members])


def forget(rank: int) -> Message:
    return Message(Kind.REQUEST, FORGET, code=rank)


def half_request(phase: Phase, step: int) -> Message:
    """``save`` or ``resume`` of the server half at ``step``."""
    return Message(Kind.REQUEST, phase, step)


@dataclass
class ClientState:
    """The handler's per-step state of one client."""

    mask: torch.Tensor | None = None
    batch: dict = field(default_factory=dict)
    clean_loss: float = math.nan
    activation_grad: torch.Tensor | None = None
    wire: ActivationWire | None = None  # this client's --wire state (delta8: its step's clean activation)


class FleetHalf:
    def __init__(self, half: ServerHandler):
        self.half = half
        self.clients: dict[int, ClientState] = {}

    def handle(self, op: Message) -> Message:
        """Rank 0 (or the one server process): the other server ranks answer ``op`` too."""
        if self.half.group.distributed:
            self.half.group.share(op)
        return self.answer(op)

    def answer(self, op: Message) -> Message:
        """This rank's part of ``op``."""
        if op.phase == FINISH_ROUND:
            return self._finish_round(op.step, op.ints[0], op.ints[1:])
        if op.phase == FORGET:
            self.clients.pop(op.code, None)
            return Message(Kind.REPLY, op.phase, op.step)
        if op.code == 0:  # the server half's own: save, resume
            reply = self.half.answer(op)
            if op.phase == Phase.RESUME:
                reply.ints = [self.half.skipped_server_steps]
            return reply
        with self._as(op.code):
            return self.half.answer(replace(op, code=0))

    @contextlib.contextmanager
    def _as(self, rank: int):
        """The handler's per-step state is client ``rank``'s while it answers."""
        h, state = self.half, self.clients.setdefault(rank, ClientState())
        if state.wire is None:
            state.wire = ActivationWire(h.wire.codec)
        h.mask, h.batch, h.clean_loss, h.activation_grad, h.wire = (
            state.mask,
            state.batch,
            state.clean_loss,
            state.activation_grad,
            state.wire,
        )
        try:
            yield
        finally:
            state.mask, state.batch, state.clean_loss, state.activation_grad, state.wire = (
                h.mask,
                h.batch,
                h.clean_loss,
                h.activation_grad,
                h.wire,
            )

    def _finish_round(self, step: int, clean_count: int, members: list[int]) -> Message:
        """The accumulated gradient divided by the number of clean losses (the mean over clients),
        then one optimizer step (skipped, and counted, when a member's clean loss is not finite)."""
        h = self.half
        if clean_count > 1:
            for p in h.server.parameters():
                if p.grad is not None:
                    p.grad.div_(clean_count)
        losses = [self.clients.get(r, ClientState()).clean_loss for r in members]
        h.clean_loss = sum(losses) if losses and all(math.isfinite(v) for v in losses) else math.nan
        if clean_count == 0:
            h.clean_loss = math.nan  # nothing to step on
        reply = h.answer(Message(Kind.REQUEST, Phase.END_STEP, step))
        for r in members:
            state = self.clients.get(r)
            if state is not None:
                state.clean_loss, state.activation_grad = math.nan, None
                if state.wire is not None:
                    state.wire.end_step()
        return reply
