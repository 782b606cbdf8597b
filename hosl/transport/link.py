"""The one small interface the training code talks through: ``Link.call(phase, ...) -> reply``.

The client side holds a ``Link``; the server side is a handler ``handle(request) -> reply``. Two
implementations:

* :class:`InProcessLink` calls the handler directly (one process; nothing is copied);
* :class:`hosl.transport.distributed.DistributedLink` sends the request to another process with
  ``torch.distributed`` point-to-point and waits for the reply; the server process runs
  :func:`hosl.transport.distributed.serve` around the same handler.

Both count the bytes a message occupies on the wire (``wire.message_nbytes``), so an in-process run
reports exactly the traffic the two-process run has. ``bytes_up`` is client -> server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from hosl.transport.wire import Kind, Message, ShutdownCode, message_nbytes

Handler = Callable[[Message], Message]


class PeerError(RuntimeError):
    """The other side failed us; the message names the peer, the phase and the step."""


class PeerLostError(PeerError):
    """The peer died (connection closed) or did not answer within the timeout."""


class PeerShutdownError(PeerError):
    """The peer said goodbye (Ctrl-C or an error on its side) before the conversation was over."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class RemoteError(PeerError):
    """The peer's handler raised; the text is the peer's error message."""


class PeerProtocolError(PeerError):
    """The peer sent a malformed message, or a reply without the fields the phase needs."""


class HandlerError(RuntimeError):
    """This side's handler failed to answer a request (the peer was told; the cause is chained)."""


class ConfigMismatchError(ValueError):
    """The two sides were started with configurations that cannot work together."""


class Link:
    """Client end of a request/reply conversation. Subclasses implement :meth:`_exchange`."""

    peer_label = "server"  # how messages name the other side; DistributedLink adds its rank

    def __init__(self, phase_names: Mapping[int, str] | None = None):
        self.phase_names = dict(phase_names or {})
        self.bytes_up = 0
        self.bytes_down = 0

    def phase_name(self, phase: int) -> str:
        return self.phase_names.get(phase, f"phase {phase}")

    def call(
        self,
        phase: int,
        step: int = 0,
        *,
        ints: Sequence[int] = (),
        floats: Sequence[float] = (),
        tensors: Sequence[torch.Tensor] = (),
        expect_floats: int = 0,
        expect_tensors: int = 0,
    ) -> Message:
        """Send a request, return the reply. A reply with fewer than ``expect_floats`` floats or
        ``expect_tensors`` tensors raises :class:`PeerProtocolError` naming the peer and the phase
        (instead of an ``IndexError`` further up)."""
        request = Message(Kind.REQUEST, phase, step, list(ints), list(floats), list(tensors))
        self.bytes_up += message_nbytes(request)
        reply = self._exchange(request)
        self.bytes_down += message_nbytes(reply)
        if len(reply.floats) < expect_floats or len(reply.tensors) < expect_tensors:
            raise PeerProtocolError(
                f"the {self.peer_label} answered phase '{self.phase_name(phase)}' of step {step} with "
                f"{len(reply.floats)} floats and {len(reply.tensors)} tensors; expected at least {expect_floats} and "
                f"{expect_tensors} (a different hosl version?)"
            )
        return reply

    def _exchange(self, request: Message) -> Message:
        raise NotImplementedError

    def close(self, code: ShutdownCode = ShutdownCode.DONE) -> None:
        """Tell the server the conversation is over (``code`` says why)."""


class InProcessLink(Link):
    """Direct calls: the handler runs in this process, on the caller's tensors."""

    def __init__(self, handler: Handler, phase_names: Mapping[int, str] | None = None):
        super().__init__(phase_names)
        self.handler = handler

    def _exchange(self, request: Message) -> Message:
        return self.handler(request)
