"""The client's side of a split mode's conversation (``hosl/training/protocol.py``):
:class:`ServerProxy` is the server half as the client's modes see it, one method per phase, over
any ``Link`` (in-process or to the server process; the modes cannot tell)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from hosl.training.protocol import (
    KEEP_ACTIVATION_GRAD,
    NO_BACKWARD,
    WEIGHTED_BACKWARD,
    ActivationWire,
    CatchUp,
    Phase,
    Relay,
    ZOPoint,
    ZOUpdate,
    server_side_of,
)
from hosl.transport import Link


class ServerProxy:
    """The server half as the client's modes see it: one method per phase, over any ``Link``."""

    def __init__(self, link: Link, model_kind: str, wire: str = "native"):
        self.link, self.model_kind = link, model_kind
        self.wire = ActivationWire(wire)  # --wire: how activations travel up
        self.step = 0
        self.rows = 0
        self.skipped_server_steps = 0  # as the server half last reported it (end-step)

    def begin_step(self, step: int, batch: dict, client_coordinates: int | None = None) -> None:
        """``client_coordinates`` (zo-sl): where the server half's coordinate numbering starts."""
        self.step, self.rows = step, batch["attention_mask"].shape[0]
        self.wire.end_step()
        self.link.call(
            Phase.BEGIN_STEP,
            step,
            ints=[] if client_coordinates is None else [client_coordinates],
            tensors=[batch["attention_mask"], *server_side_of(batch, self.model_kind, for_eval=False)],
        )

    def clean_loss(self, h: torch.Tensor, keep_grad: bool = False, backward: bool = True) -> float:
        """The server's loss at the clean point, back-propagated there (``keep_grad``: and dL/dh kept
        for the linear estimate; ``backward=False``: the loss only, ``--server-grad perturbed``)."""
        ints = [KEEP_ACTIVATION_GRAD] if keep_grad else [] if backward else [NO_BACKWARD]
        return self.link.call(
            Phase.CLEAN_LOSS, self.step, ints=ints, tensors=self.wire.pack(h, "clean"), expect_floats=1
        ).floats[0]

    def weighted_backward(self, h: torch.Tensor, weight: float) -> float:
        """``--server-grad perturbed``: the server's loss at a perturbed activation, back-propagated
        into its weights with ``weight`` (its gradients accumulate over the step's directions)."""
        return self.link.call(
            Phase.CLEAN_LOSS,
            self.step,
            ints=[WEIGHTED_BACKWARD],
            floats=[weight],
            tensors=self.wire.pack(h, "plain"),
            expect_floats=1,
        ).floats[0]

    def losses(self, h: torch.Tensor, point: tuple[int, float] | None = None) -> torch.Tensor:
        """Losses without grad: a scalar for one copy of the batch, ``[copies]`` for several;
        ``point`` (zo-sl): the (seed, scale) the server half is evaluated at."""
        ints, floats = ZOPoint(*point).to_fields() if point is not None else ([], [])
        values = self.link.call(
            Phase.LOSSES,
            self.step,
            ints=ints,
            floats=floats,
            tensors=self.wire.pack(h, "copies"),
            expect_floats=max(1, h.shape[0] // max(self.rows, 1)),
        ).floats
        return torch.tensor(values[0] if h.shape[0] == self.rows else values, dtype=torch.float64)

    def backprop(self, h: torch.Tensor) -> tuple[float, torch.Tensor]:
        reply = self.link.call(
            Phase.BACKPROP, self.step, tensors=self.wire.pack(h, "plain"), expect_floats=1, expect_tensors=1
        )
        return reply.floats[0], reply.tensors[0]

    def end_step(self, seeds=(), grads=()) -> list:
        """Ends the step (zo-sl, fleets: sending this client's update); returns the updates a
        fleet's server relays back ([(rank, seeds, grads), ...]; empty outside a fleet)."""
        self.wire.end_step()
        ints, floats = ZOUpdate(list(seeds), list(grads)).to_fields()
        reply = self.link.call(Phase.END_STEP, self.step, ints=ints, floats=floats)
        if reply.ints:
            self.skipped_server_steps = reply.ints[0]
        return list(Relay.from_fields(reply.ints, reply.floats).updates) if len(reply.ints) > 1 else []

    def join(self, checkpoint_steps) -> CatchUp:
        """A fleet client's catch-up: (restart step, fleet step, the updates of each step between)."""
        reply = self.link.call(Phase.JOIN, self.step, ints=list(checkpoint_steps))
        return CatchUp.from_fields(reply.ints, reply.floats)

    def eval_outputs(self, h: torch.Tensor, batch: dict) -> tuple[torch.Tensor, float]:
        reply = self.link.call(
            Phase.EVAL,
            self.step,
            tensors=[
                *self.wire.pack(h, "plain"),
                batch["attention_mask"],
                *server_side_of(batch, self.model_kind, for_eval=True),
            ],
            expect_floats=1,
            expect_tensors=1,
        )
        return reply.tensors[0], reply.floats[0]

    def save(self, step: int) -> None:
        self.link.call(Phase.SAVE, step)

    def resume(self, step: int) -> None:
        self.link.call(Phase.RESUME, step)

    def hosl_loss_fn(self, linear: bool = False, server_grad: str = "clean") -> Callable[[torch.Tensor], torch.Tensor]:
        """``server_loss_fn`` for ``HybridOrderOptimizer.step``: the clean point (the server
        back-propagates on its side and the returned loss carries no graph). The perturbed
        activations go to :meth:`losses`, passed as ``perturbed_loss_fn``: each call says which
        it is. ``linear``: the server keeps dL/dh and ``server_loss.linear_server()`` reaches it
        (``server_estimate="linear"``). ``server_grad="perturbed"``: the clean point gives the loss
        only and ``server_loss.weighted_backward(h, w)`` sends a ``+`` activation to back-propagate."""
        backward = server_grad == "clean"

        def server_loss(h: torch.Tensor) -> torch.Tensor:
            return torch.tensor(self.clean_loss(h, keep_grad=linear, backward=backward), dtype=torch.float64)

        server_loss.linear_server = lambda: RemoteLinearServer(self)  # type: ignore[attr-defined]  # the optimizer looks for it; hosl's linear estimate
        if not backward:
            server_loss.weighted_backward = self.weighted_backward  # type: ignore[attr-defined]  # the authors' step looks for it
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
        return list(
            self.proxy.link.call(
                Phase.LINEAR_DOTS, self.proxy.step, tensors=self.proxy.wire.pack(deltas, "difference")
            ).floats
        )


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
