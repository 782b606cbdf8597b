"""``torch.distributed`` point-to-point transport: gloo between CPUs, NCCL between GPUs.

:func:`connect` joins a two-process group; :class:`Endpoint` sends and receives
:class:`~hosl.transport.wire.Message` s to the one peer; :class:`DistributedLink` is the client's
:class:`~hosl.transport.link.Link`; :func:`serve` is the server's loop around a handler;
:func:`handshake` compares the two sides' configurations before anything else is said.

Every wait is bounded. gloo closes the connection for good when a wait times out, and a peer that
dies shows up as "connection closed" on the next wait; both become :class:`PeerLostError` naming the
peer, the phase and the step. A blocking wait runs in a helper thread so the main thread stays
responsive to signals.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import math
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from hosl.transport.auth import ConnectError, authenticate_over_store
from hosl.transport.link import (
    ConfigMismatchError,
    Handler,
    HandlerError,
    Link,
    PeerLostError,
    PeerProtocolError,
    PeerShutdownError,
    RemoteError,
)
from hosl.transport.session import TAG_HEADER_TRAILER, TAG_TRAILER, Session, TamperedMessageError
from hosl.transport.waiting import call_bounded
from hosl.transport.wire import (
    HEADER_LEN,
    PROTOCOL_VERSION,
    TENSOR_HEADER_LEN,
    Kind,
    Message,
    ShutdownCode,
    as_bytes,
    check_header,
    parse_tensor_header,
    tensor_header,
    tensor_text,
    text_tensor,
)

TAG_HEADER, TAG_INTS, TAG_FLOATS, TAG_TENSOR_HEADERS, TAG_FIRST_TENSOR = 0, 1, 2, 3, 4


def connect(
    *,
    secret: bytes,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: float = 300.0,
    backend: str | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> str:
    """Join the two-process group, after both sides proved they hold ``secret``; returns the run id.

    Anything not given comes from the environment that ``torchrun`` sets (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). Rank 0 hosts the rendezvous store (under torchrun, the agent does).
    Everything (opening the store, the proof of the secret, forming the group) ends within
    ``timeout_s`` (the other side may still be loading its model) with :class:`ConnectError` naming
    the port and the cause, or :class:`AuthError`; ``stop_requested()`` turning true (Ctrl-C) raises
    ``KeyboardInterrupt``. The caller confirms the secret over the new connection
    (:func:`hosl.transport.auth.confirm_channel`) before sending anything else.
    """
    env = os.environ
    rank = int(env["RANK"]) if rank is None and "RANK" in env else rank
    world_size = int(env.get("WORLD_SIZE", 2)) if world_size is None else world_size
    master_addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    master_port = master_port or (int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    if rank is None or master_port is None:
        raise ValueError("need --rank and --master-port (or RANK and MASTER_PORT in the environment, as torchrun sets)")
    if world_size != 2:
        raise ValueError(f"a split run has exactly two processes (client and server), got world size {world_size}")
    if rank not in (0, 1):
        raise ValueError(f"rank must be 0 or 1, got {rank}")
    if not 0 < master_port < 65536:
        raise ValueError(f"--master-port must be between 1 and 65535, got {master_port}")
    if not secret:
        raise ValueError("a two-process run needs a shared secret (--secret-file or HOSL_SECRET)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deadline = time.monotonic() + timeout_s
    where = f"{master_addr}:{master_port}"
    store = open_store(master_addr, master_port, rank, deadline, timeout_s, stop_requested)
    run_id = authenticate_over_store(
        store,
        is_host=rank == 0,
        secret=secret,
        deadline=deadline,
        where=where,
        stop_requested=stop_requested,
        timeout_s=timeout_s,
    )
    group_store = dist.PrefixStore(f"hosl/run/{run_id}/", store)
    call_bounded(
        lambda: dist.init_process_group(
            backend, store=group_store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        ),
        deadline + 1.0,
        lambda: ConnectError(
            f"the {backend} process group on {where} did not form within {timeout_s:g} s "
            f"after both sides proved the secret (did the other side die?)"
        ),
        stop_requested,
    )
    return run_id


def open_store(
    addr: str, port: int, rank: int, deadline: float, timeout_s: float, stop_requested: Callable[[], bool] | None = None
):
    """The rendezvous store: rank 0 listens on ``port`` (unless torchrun's agent already does),
    rank 1 connects to ``addr:port``. A taken port, nobody listening, or a port held by a program
    that does not answer as a store all end by ``deadline`` with a :class:`ConnectError` naming
    the port and the cause."""
    where = f"{addr}:{port}"
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    host = rank == 0 and not agent
    store_timeout = datetime.timedelta(seconds=max(timeout_s, 1.0))

    def make():
        return dist.TCPStore(addr, port, 2, host, store_timeout, wait_for_workers=False, multi_tenant=True)

    if not host:  # wait for the port here: TCPStore's own retries print C++ stack frames to stderr
        _wait_for_listener(addr, port, deadline, stop_requested)
        if time.monotonic() >= deadline:
            raise ConnectError(
                f"could not reach the rendezvous on {where} within {timeout_s:g} s: {_port_cause(addr, port)}"
            )

    def on_timeout():
        return ConnectError(
            f"could not reach the rendezvous on {where} within {timeout_s:g} s: {_port_cause(addr, port)}"
        )

    try:
        return call_bounded(make, deadline, on_timeout, stop_requested)
    except ConnectError:
        raise
    except RuntimeError as exc:
        text = str(exc)
        if host and ("EADDRINUSE" in text or "address already in use" in text.lower()):
            raise ConnectError(
                f"cannot host the rendezvous on port {port}: the port is already in use (another run "
                f"or program holds it); choose another --master-port"
            ) from None
        if host:
            raise ConnectError(f"cannot host the rendezvous on port {port}: {_first_line(exc)}") from None
        raise ConnectError(
            f"could not reach the rendezvous on {where}: {_port_cause(addr, port)} [{_first_line(exc)}]"
        ) from None


def _wait_for_listener(addr: str, port: int, deadline: float, stop_requested: Callable[[], bool] | None) -> None:
    """Return once something accepts connections on ``addr:port``, or at ``deadline``."""
    while time.monotonic() < deadline:
        if stop_requested is not None and stop_requested():
            raise KeyboardInterrupt
        try:
            with socket.create_connection((addr, port), timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
                return
        except OSError:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _port_cause(addr: str, port: int) -> str:
    """Why a connection to ``addr:port`` did not turn into a rendezvous, as far as a probe can tell."""
    try:
        with socket.create_connection((addr, port), timeout=2.0):
            return (
                f"something listens on port {port} but does not answer as a torch.distributed store (the port "
                f"is taken by another program? check --master-port)"
            )
    except ConnectionRefusedError:
        return (
            f"nothing listens on port {port} (is rank 0 started: the client of a two-process run, the server "
            f"of a fleet? check --master-addr/--master-port)"
        )
    except OSError as exc:
        return f"cannot connect to {addr}:{port} ({exc.strerror or exc})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def disconnect() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def message_parts(msg: Message) -> list[tuple[int, torch.Tensor]]:
    """``(tag, tensor)`` of each part ``msg`` travels as: header, ints, floats, tensor headers, tensors."""
    parts = [(TAG_HEADER, msg.header())]
    if msg.ints:
        parts.append((TAG_INTS, torch.tensor(msg.ints, dtype=torch.int64)))
    if msg.floats:
        parts.append((TAG_FLOATS, torch.tensor(msg.floats, dtype=torch.float64)))
    if msg.tensors:
        parts.append((TAG_TENSOR_HEADERS, torch.stack([tensor_header(t) for t in msg.tensors])))
        parts += [(TAG_FIRST_TENSOR + i, as_bytes(t)) for i, t in enumerate(msg.tensors) if t.numel()]
    return parts


class Endpoint:
    """Messages to and from the single peer of this process (the other rank).

    By default over the default process group (a two-process run); ``group`` instead: a two-rank
    process group of its own (a fleet's pair, ``hosl/transport/fleet.py``), where this side is
    ``rank`` (0 or 1) and ``peer_rank`` names the peer in messages."""

    store: object = None  # a fleet's endpoint keeps its TCPStore alive here (hosl/transport/fleet.py)
    # set by the channel check (hosl/transport/auth.py): from then on every message is sealed and checked
    session: Session | None = None

    def __init__(
        self,
        peer_name: str,
        timeout_s: float,
        device: torch.device | str | None = None,
        *,
        group=None,
        rank: int | None = None,
        peer_rank: int | None = None,
    ):
        self.group = group
        if group is None:
            self.rank: int = dist.get_rank()
        elif rank is None:
            raise TypeError("Endpoint: a group needs this side's rank in it (rank=0 or 1)")
        else:
            self.rank = rank
        self.peer = 1 - self.rank
        self.peer_name = f"{peer_name} (rank {self.peer if peer_rank is None else peer_rank})"
        self.timeout_s = timeout_s
        if device is None:
            nccl = (dist.get_backend() if group is None else group.name()) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        self.device = torch.device(device)

    def _isend(self, t: torch.Tensor, tag: int):
        if self.group is None:
            return dist.isend(t, self.peer, tag=tag)
        return self.group.send([t], self.peer, tag)

    def _irecv(self, t: torch.Tensor, tag: int):
        if self.group is None:
            return dist.irecv(t, self.peer, tag=tag)
        return self.group.recv([t], self.peer, tag)

    # -- waiting ----------------------------------------------------------------------------------
    def _post(self, ops, what: str) -> list:
        """Start point-to-point ops. gloo raises right here, not only in ``wait``, when the
        connection is already closed (the peer died between two messages)."""
        try:
            return [op() for op in ops]
        except RuntimeError as exc:
            raise self._lost(exc, what) from None

    def _lost(self, exc: BaseException, what: str) -> PeerLostError:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:120]  # gloo: "[file:line] What. Hint."
        return PeerLostError(f"lost the {self.peer_name} while {what}: the connection closed (did it die?) [{detail}]")

    def _wait(self, works, what: str, timeout_s: float, stop_requested: Callable[[], bool] | None = None) -> None:
        """Wait for ``works``; ``stop_requested()`` turning true meanwhile raises ``KeyboardInterrupt``
        (only for waits where stopping loses nothing: the server idle between requests)."""
        deadline = time.monotonic() + timeout_s
        done, failure = threading.Event(), []

        def wait_all():
            try:
                for work in works:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("Timed out")
                    work.wait(datetime.timedelta(seconds=left))
            except BaseException as exc:  # handed to the main thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=wait_all, name="hosl-wire-wait", daemon=True).start()
        while not done.wait(0.2):
            if stop_requested is not None and stop_requested():
                raise KeyboardInterrupt
        if failure:
            exc = failure[0]
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "timed out" in text.lower() or isinstance(exc, TimeoutError):
                raise PeerLostError(
                    f"no answer from the {self.peer_name} within {timeout_s:g} s while {what}"
                ) from None
            raise self._lost(exc, what) from None

    # -- messages ---------------------------------------------------------------------------------
    def send(self, msg: Message, what: str, timeout_s: float | None = None) -> None:
        dev = self.device
        parts = message_parts(msg)
        if self.session is not None:
            parts = self.session.seal(parts)
        what = f"sending {what}"
        works = self._post([lambda t=t, tag=tag: self._isend(t.to(dev), tag) for tag, t in parts], what)
        self._wait(works, what, timeout_s or self.timeout_s)

    def recv(
        self,
        what: str,
        timeout_s: float | None = None,
        stop_requested: Callable[[], bool] | None = None,
        *,
        max_tensor_bytes: int | None = None,
    ) -> Message:
        """The next message. ``stop_requested`` applies while waiting for it to begin;
        ``max_tensor_bytes`` refuses a message whose tensors claim more bytes in all, before any is
        allocated (for messages received before the session exists: the channel check's)."""
        timeout_s = timeout_s or self.timeout_s
        header, work = self.post_header(what)
        self._wait([work], what, timeout_s, stop_requested)
        return self.recv_rest(header, what, timeout_s, max_tensor_bytes=max_tensor_bytes)

    def post_header(self, what: str) -> tuple[torch.Tensor, object]:
        """Start receiving the next message's header: ``(header, work)``. A host serving several
        peers posts one per peer and reads the rest (:meth:`recv_rest`) of whichever completes."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        return header, self._post([lambda: self._irecv(header, TAG_HEADER)], what)[0]

    def recv_rest(
        self, header: torch.Tensor, what: str, timeout_s: float | None = None, *, max_tensor_bytes: int | None = None
    ) -> Message:
        """The message whose header (:meth:`post_header`) has arrived. With a session, its small parts
        are checked against the header trailer before any tensor is allocated by their sizes."""
        timeout_s = timeout_s or self.timeout_s
        dev = self.device
        values = header.tolist()
        problem = check_header(values)
        if problem is not None and self.session is not None:  # an authenticated peer never sends one
            self.session.broken = "an earlier message was malformed"
            raise TamperedMessageError(
                f"refused a message from the {self.peer_name} while {what}: it has {problem} (altered on the way, "
                f"or not sent by the {self.peer_name}); nothing of it was used"
            )
        if problem is not None:
            raise PeerProtocolError(f"the {self.peer_name} sent {problem} while {what}")
        _magic, kind, phase, step, n_ints, n_floats, n_tensors, code = values
        ints = torch.empty(n_ints, dtype=torch.int64, device=dev)
        floats = torch.empty(n_floats, dtype=torch.float64, device=dev)
        theaders = torch.empty((n_tensors, TENSOR_HEADER_LEN), dtype=torch.int64, device=dev)
        small = [(TAG_INTS, ints), (TAG_FLOATS, floats), (TAG_TENSOR_HEADERS, theaders)]
        small_posts = [functools.partial(self._irecv, t, tag) for tag, t in small if t.numel()]
        if self.session is not None:  # its size is fixed: received with the small parts, one wait
            header_trailer = torch.empty(self.session.header_trailer_len, dtype=torch.uint8, device=dev)
            small_posts.append(functools.partial(self._irecv, header_trailer, TAG_HEADER_TRAILER))
        self._wait(self._post(small_posts, what), what, timeout_s)
        header_parts = [(TAG_HEADER, header), *[(tag, t) for tag, t in small if t.numel()]]
        if self.session is not None:
            self.session.check_headers(header_parts, header_trailer, what)
        try:
            specs = [parse_tensor_header(h) for h in theaders.cpu()]
        except ValueError as exc:
            raise PeerProtocolError(f"the {self.peer_name} sent a {exc} while {what}") from None
        if max_tensor_bytes is not None:
            claimed = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs)
            if claimed > max_tensor_bytes:
                raise PeerProtocolError(
                    f"the {self.peer_name} sent a message whose tensors claim {claimed} bytes while {what}, where "
                    f"at most {max_tensor_bytes} are expected; nothing of it was allocated"
                )
        tensors = [torch.empty(shape, dtype=dtype, device=dev) for dtype, shape in specs]
        posts = [
            functools.partial(self._irecv, as_bytes(t), TAG_FIRST_TENSOR + i)
            for i, t in enumerate(tensors)
            if t.numel()
        ]
        if self.session is not None:  # the trailer too: one wait for the rest of the message
            trailer = torch.empty(self.session.trailer_len, dtype=torch.uint8, device=dev)
            posts.append(functools.partial(self._irecv, trailer, TAG_TRAILER))
        self._wait(self._post(posts, what), what, timeout_s)
        if self.session is not None:  # checked (and with --encrypt decrypted in place) before any use
            parts = header_parts + [(TAG_FIRST_TENSOR + i, as_bytes(t)) for i, t in enumerate(tensors) if t.numel()]
            self.session.open(parts, trailer, what)
        return Message(Kind(kind), phase, step, ints.tolist(), floats.tolist(), tensors, code)


class DistributedLink(Link):
    """The client's link to a server process. ``stop_requested()``, checked before each request,
    turns a pending Ctrl-C into ``KeyboardInterrupt`` between exchanges, never inside one."""

    def __init__(
        self,
        endpoint: Endpoint,
        phase_names: Mapping[int, str] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        reply_timeouts: Mapping[int, float] | None = None,
    ):
        super().__init__(phase_names)
        self.endpoint = endpoint
        # phase -> seconds to wait for its answer, where that is not the endpoint's timeout (a
        # fleet's barriers: the server answers once every client got there)
        self.reply_timeouts = dict(reply_timeouts or {})
        self.peer_label = endpoint.peer_name
        self.stop_requested = stop_requested or (lambda: False)
        self.closed = False

    def _exchange(self, request: Message) -> Message:
        if self.stop_requested():
            raise KeyboardInterrupt
        what = f"phase '{self.phase_name(request.phase)}' of step {request.step}"
        self.endpoint.send(request, f"the request for {what}")
        try:
            reply = self.endpoint.recv(f"waiting for the answer to {what}", self.reply_timeouts.get(request.phase))
        except TamperedMessageError as exc:
            self.closed = True
            refuse_to_peer(self.endpoint, exc, request.phase, request.step)
            raise
        if reply.kind == Kind.REPLY:
            return reply
        peer = self.endpoint.peer_name
        if reply.kind == Kind.ERROR:
            self.closed = True
            raise RemoteError(f"the {peer} failed in {what}: {tensor_text(reply.tensors[0]) if reply.tensors else '?'}")
        if reply.kind == Kind.SHUTDOWN:
            self.closed = True
            why = {int(c): c.name.lower() for c in ShutdownCode}.get(reply.code, f"code {reply.code}")
            raise PeerShutdownError(f"the {peer} shut down ({why}) instead of answering {what}", reply.code)
        raise PeerProtocolError(f"the {peer} answered {what} with an unexpected {reply.kind.name} message")

    def close(self, code: ShutdownCode = ShutdownCode.DONE) -> None:
        """Say goodbye and wait (briefly) for the server's acknowledgement; never raises."""
        if self.closed:
            return
        self.closed = True
        grace = min(self.endpoint.timeout_s, 10.0)
        try:
            self.endpoint.send(Message(Kind.SHUTDOWN, code=int(code)), "the shutdown notice", grace)
            self.endpoint.recv("waiting for the shutdown acknowledgement", grace)
        except Exception:
            pass


IDLE_STOP_GRACE_S = 2.0  # after a Ctrl-C, how long the server waits for a request to answer with the notice


def _send_if_listening(endpoint: Endpoint, msg: Message, what: str, timeout_cap_s: float = 10.0) -> None:
    """Send the server's last word (a shutdown notice or acknowledgement, an error report) within
    ``timeout_cap_s`` at most. A peer that is already gone cannot read it, and that is no error of
    its own: the caller goes on to return or raise what it was going to."""
    try:
        endpoint.send(msg, what, min(endpoint.timeout_s, timeout_cap_s))
    except PeerLostError:
        pass


def refuse_to_peer(endpoint: Endpoint, exc: TamperedMessageError, phase: int = 0, step: int = 0) -> None:
    """Tell the peer (in an authenticated ERROR message, best effort) that this side refused one of its
    messages, so both sides stop with the same reason."""
    text = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(PeerLostError):
        _send_if_listening(endpoint, Message(Kind.ERROR, phase, step, tensors=[text_tensor(text)]), "a refusal")


def serve(
    endpoint: Endpoint,
    handler: Handler,
    *,
    phase_names: Mapping[int, str] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    first_timeout_s: float | None = None,
) -> int:
    """Answer requests with ``handler`` until the client says goodbye; returns its shutdown code.

    A handler exception is reported to the client (an ERROR message) and re-raised here as a
    :class:`HandlerError`. When ``stop_requested()`` turns true (Ctrl-C), the next request is
    answered with a SHUTDOWN notice and ``KeyboardInterrupt`` is raised; if no request comes
    within ``IDLE_STOP_GRACE_S``, the notice is sent unasked (the client reads it as the answer to
    its next request) and ``KeyboardInterrupt`` is raised all the same.
    """
    names = dict(phase_names or {})
    stop_requested = stop_requested or (lambda: False)
    first_seen: list[float] = []

    def stop_while_idle() -> bool:
        if not stop_requested():
            return False
        first_seen[:] = first_seen or [time.monotonic()]
        return time.monotonic() - first_seen[0] >= IDLE_STOP_GRACE_S

    last = "the start of the run"
    timeout = first_timeout_s
    while True:
        try:
            msg = endpoint.recv(
                f"waiting for the next request from the client (last: {last})", timeout, stop_while_idle
            )
        except TamperedMessageError as exc:
            refuse_to_peer(endpoint, exc)
            raise
        except KeyboardInterrupt:  # Ctrl-C while idle: the client reads the notice as its next answer
            _send_if_listening(
                endpoint, Message(Kind.SHUTDOWN, code=int(ShutdownCode.INTERRUPTED)), "the shutdown notice", 5.0
            )
            raise
        timeout = None
        if msg.kind == Kind.SHUTDOWN:
            _send_if_listening(
                endpoint, Message(Kind.SHUTDOWN, code=int(ShutdownCode.DONE)), "the shutdown acknowledgement"
            )
            return msg.code
        if msg.kind == Kind.ERROR:  # the client refused the last answer (e.g. it failed its authentication check)
            raise RemoteError(
                f"the {endpoint.peer_name} gave up after {last}: {tensor_text(msg.tensors[0]) if msg.tensors else '?'}"
            )
        if msg.kind != Kind.REQUEST:
            raise PeerProtocolError(
                f"the {endpoint.peer_name} sent an unexpected {msg.kind.name} message (last: {last})"
            )
        last = f"phase '{names.get(msg.phase, msg.phase)}' of step {msg.step}"
        if stop_requested():
            _send_if_listening(
                endpoint,
                Message(Kind.SHUTDOWN, msg.phase, msg.step, code=int(ShutdownCode.INTERRUPTED)),
                "the shutdown notice",
            )
            raise KeyboardInterrupt
        try:
            reply = handler(msg)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            _send_if_listening(
                endpoint, Message(Kind.ERROR, msg.phase, msg.step, tensors=[text_tensor(text)]), "an error report"
            )
            raise HandlerError(f"could not answer {last} from the {endpoint.peer_name}: {text}") from exc
        endpoint.send(reply, f"the answer to {last}")


# -- handshake ----------------------------------------------------------------------------------
ROLES = ("client", "server")


class Version(int):
    """A handshake field that is the version of a protocol spoken over this transport (the split
    protocol's, hosl/training/protocol.py): compared before the configuration fields, and a peer
    with another version (or none) is refused with "<name> version mismatch: this side speaks A,
    the <peer> B"."""


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True)


def _encode_value(value) -> int:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return _stable_hash(repr(value))
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def _describe_peer_value(mine, encoded: int) -> str:
    if isinstance(mine, bool) or mine is None or isinstance(mine, str):
        return "a different value"
    if isinstance(mine, int):
        return repr(encoded)
    return repr(struct.unpack("<d", struct.pack("<q", encoded))[0])


def handshake(endpoint: Endpoint, role: str, fields: Mapping[str, object], timeout_s: float) -> None:
    """Exchange (protocol version, role, named config fields) with the peer and compare.

    Raises :class:`ConfigMismatchError` naming the first field that differs (on both sides).
    Values travel as int64: integers as themselves, floats by their bits, strings as a hash.
    """
    names = list(fields)
    ints = [PROTOCOL_VERSION, ROLES.index(role), len(names)]
    for name in names:
        ints += [_stable_hash(name), _encode_value(fields[name])]
    hello = Message(Kind.HELLO, ints=ints)
    what = "the configuration handshake"
    if endpoint.rank == 0:
        endpoint.send(hello, what, timeout_s)
        theirs = endpoint.recv(f"waiting for {what}", timeout_s)
    else:
        theirs = endpoint.recv(f"waiting for {what}", timeout_s)
        endpoint.send(hello, what, timeout_s)
    peer = endpoint.peer_name
    if theirs.kind != Kind.HELLO or len(theirs.ints) < 3:
        raise ConfigMismatchError(f"the {peer} did not start with a hosl handshake")
    version, their_role, count = theirs.ints[:3]
    if version != PROTOCOL_VERSION:
        raise ConfigMismatchError(
            f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, the {peer} {version}"
        )
    if their_role == ROLES.index(role):
        raise ConfigMismatchError(f"both sides were started as the {role}; start one client and one server")
    pairs = dict(zip(theirs.ints[3::2], theirs.ints[4::2]))
    for name, mine in fields.items():
        if isinstance(mine, Version) and pairs.get(_stable_hash(name)) != mine:
            spoken = pairs.get(_stable_hash(name), "none (a hosl from before it had one)")
            raise ConfigMismatchError(f"{name} version mismatch: this side speaks {int(mine)}, the {peer} {spoken}")
    for name in names:
        key = _stable_hash(name)
        if key not in pairs:
            raise ConfigMismatchError(
                f"configuration mismatch: the {peer} does not send '{name}' (different hosl version?)"
            )
        if pairs[key] != _encode_value(fields[name]):
            raise ConfigMismatchError(
                f"configuration mismatch with the {peer}: {name} is {fields[name]!r} here and "
                f"{_describe_peer_value(fields[name], pairs[key])} there; start both sides with the same "
                f"--{name.replace('_', '-')}"
            )
    if count != len(names):
        raise ConfigMismatchError(f"configuration mismatch: the {peer} compares {count} fields, this side {len(names)}")
