"""A fleet: one host (the server, rank 0) and any number of peers (clients, ranks 1..N), each peer
connected to the host by a two-rank process group of its own.

Why not one N+1 process group: a ``torch.distributed`` group is fixed when it forms; a member
that dies cannot come back into it. Here every peer's connection is its own pair group (gloo, or
NCCL between GPUs) formed over the host's rendezvous store, so a peer can die, the others go on,
and it (or its restarted process) joins again through a new pair.

Joining (:func:`join_fleet` on the peer, :meth:`FleetHost.accept_joins` on the host):

1. the peer takes a join number ``i`` from the store's counter and posts its rank under it;
2. both sides prove the shared secret under that join's keys
   (:func:`hosl.transport.auth.authenticate_over_store`, host = the server), which also gives the
   run id of this pair;
3. the pair group forms under a store prefix derived from the run id, both sides prove the secret
   again over it (:func:`~hosl.transport.auth.confirm_channel`, which also starts the authenticated
   session) and compare configurations (:func:`~hosl.transport.distributed.handshake`);
4. the host says over that connection whether the rank joins (it may be taken or out of range).

The host never waits on a join: each slot proves the secret in a thread of its own, at most
``MAX_JOINING`` at once and ``MAX_WAITING_SLOTS`` waiting, each within the peer timeout. Nothing
the store says is believed (anyone reaching its port can write any key): a stranger with store
access can delay a join by at most the connect timeout and never holds up a running step.
A stranger that fails a proof is refused and logged; the host goes on serving the others. The
host waits for the next message of any of a set of peers (:meth:`FleetHost.next_message`), with
a per-peer silence limit. Knows nothing of ZO or models: messages are
:class:`~hosl.transport.wire.Message` s.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hosl.transport.auth import AuthError, ConnectError, authenticate_over_store, confirm_channel
from hosl.transport.distributed import Endpoint, handshake, open_store, refuse_to_peer
from hosl.transport.link import PeerLostError, PeerProtocolError
from hosl.transport.session import TamperedMessageError
from hosl.transport.waiting import call_bounded
from hosl.transport.wire import Kind, Message, tensor_text, text_tensor

KEYS = "hosl/fleet/v1/"
JOINS = KEYS + "joins"  # the counter each joining peer increments


def pair_group(backend: str, store, rank: int, timeout_s: float):
    """A two-rank process group over ``store`` (a prefix store of its own), not the default group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    raise ValueError(f"--dist-backend must be gloo or nccl, got {backend!r}")


MAX_WAITING_SLOTS = 32  # join numbers waiting for their rank key; beyond it the oldest are skipped
MAX_JOINING = 4  # joins proving the secret at once
VERDICT_OK = "joined"


def _send_verdict(endpoint: Endpoint, why: str | None, timeout_s: float) -> bool:
    """Tell a client that proved the secret whether its rank joined (``why`` None) or why not, over
    the authenticated connection; False when it is gone."""
    text = VERDICT_OK if why is None else why
    kind = Kind.REPLY if why is None else Kind.ERROR
    try:
        endpoint.send(Message(kind, tensors=[text_tensor(text)]), "the join verdict", min(timeout_s, 10.0))
        return True
    except PeerLostError:
        return False


def _join_keys(i: int) -> str:
    return f"{KEYS}join/{i}/"


@dataclass
class Joined:
    """A peer the host accepted: its rank and its endpoint."""

    rank: int
    endpoint: Endpoint


class FleetHost:
    """The server's side: hosts the rendezvous, accepts peers, receives from whichever speaks."""

    def __init__(
        self,
        *,
        secret: bytes,
        addr: str,
        port: int,
        timeout_s: float,
        peer_timeout: float,
        backend: str = "gloo",
        stop_requested: Callable[[], bool] | None = None,
        log: Callable[[str], None] = lambda _msg: None,
        encrypt: bool = False,
    ):
        if not secret:
            raise ValueError("a fleet needs a shared secret (--secret-file or HOSL_SECRET)")
        self.secret, self.backend, self.where = secret, backend, f"{addr}:{port}"
        self.timeout_s, self.peer_timeout = timeout_s, peer_timeout
        self.stop_requested = stop_requested or (lambda: False)
        self.log = log
        self.encrypt = encrypt  # every pair's messages are MACed; with encrypt, their payloads encrypted too
        self.store = open_store(addr, port, 0, time.monotonic() + timeout_s, timeout_s, self.stop_requested)
        self.seen_joins = int(self.store.add(JOINS, 0))  # numbers taken before this host started are stale
        self._slots: dict[int, float] = {}  # join number -> when first seen (waiting for its rank, or joining)
        self._running: set[int] = set()  # join numbers whose proof runs in a thread
        self._threads: list[threading.Thread] = []  # the proof threads, waited for by finish_joins
        self._done: queue.Queue[tuple[int, Joined | BaseException]] = queue.Queue()
        self.endpoints: dict[int, Endpoint] = {}
        self._headers: dict[int, tuple[torch.Tensor, object]] = {}  # rank -> its posted header receive
        self._arrivals: queue.Queue[tuple[int, torch.Tensor, PeerLostError | None]] = (
            queue.Queue()
        )  # (rank, header, PeerLostError | None) from the waiters
        self.refused = 0  # joins refused (a wrong secret, a malformed or vanished peer, a config mismatch)

    # -- joining ----------------------------------------------------------------------------------
    # Nothing a store key says is believed before the join proved the secret: the store is open to
    # anyone who reaches its port. Each join number is a slot that waits (without blocking the
    # serving loop) for its rank key, then proves the secret in a thread of its own; slots are
    # bounded and time out on their own, so a stranger bumping the counter or posting ranks delays
    # a real join by at most the connect timeout and never holds up a running step. Whether the rank
    # may join is said over the authenticated connection, never through the store.
    def pending_joins(self) -> int:
        """Join numbers posted but not yet looked at, plus slots in progress or finished unread."""
        return int(self.store.add(JOINS, 0)) - self.seen_joins + len(self._slots) + self._done.qsize()

    def accept_joins(self, fields: Mapping[str, object], valid_rank: Callable[[int], str | None]) -> list[Joined]:
        """Look at every join slot (never waiting on one) and return the joins that completed since
        the last call. ``valid_rank(rank)`` returns why a rank may not join now, or None; the client
        is told over its authenticated connection. A refused or expired join is logged and counted,
        never raised."""
        now = time.monotonic()
        posted = int(self.store.add(JOINS, 0))
        for i in range(max(self.seen_joins + 1, posted - MAX_WAITING_SLOTS + 1), posted + 1):
            self._slots[i] = now
        skipped = max(0, posted - self.seen_joins - MAX_WAITING_SLOTS)
        self.seen_joins = max(self.seen_joins, posted)
        waiting = sorted(i for i in self._slots if i not in self._running)
        for i in waiting[: max(0, len(waiting) - MAX_WAITING_SLOTS)]:  # the newest slots are kept
            del self._slots[i]
            skipped += 1
        if skipped:
            self.log(f"skipped {skipped} join number(s) beyond the {MAX_WAITING_SLOTS} waiting slots")
        for i in sorted(i for i in self._slots if i not in self._running):
            if len(self._running) >= MAX_JOINING:
                break
            if self.store.check([_join_keys(i) + "rank"]):
                self._start(i, fields)
            elif now - self._slots[i] > self.peer_timeout:
                del self._slots[i]
                self.refused += 1
                self.log(f"refused join #{i}: no rank posted within {self.peer_timeout:g} s")
        joined = []
        while not self._done.empty():
            i, result = self._done.get()
            self._slots.pop(i, None)
            self._running.discard(i)
            if isinstance(result, BaseException):
                self.refused += 1
                self.log(f"refused join #{i}: {result}")
                continue
            why = valid_rank(result.rank)
            if why is not None:
                self.refused += 1
                self.log(f"refused join #{i}: rank {result.rank}: {why}")
                _send_verdict(result.endpoint, why, self.peer_timeout)
                continue
            if not _send_verdict(result.endpoint, None, self.peer_timeout):
                self.refused += 1
                self.log(f"refused join #{i}: rank {result.rank} vanished before it was told it joined")
                continue
            self.drop(result.rank)  # a rank that joins again replaces its old connection
            self.endpoints[result.rank] = result.endpoint
            joined.append(result)
        return joined

    def _start(self, i: int, fields) -> None:
        self._running.add(i)

        def run():
            try:
                result: Joined | BaseException = self._accept(i, fields)
            except BaseException as exc:  # handed to the serving thread
                result = exc
            self._done.put((i, result))

        thread = threading.Thread(target=run, name=f"hosl-fleet-join-{i}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def finish_joins(self) -> None:
        """Wait for the proof threads still running (each ends within ``peer_timeout``): a process that
        exits while one is inside torch.distributed's C++ aborts ("terminate called without an active
        exception") instead of exiting with its status."""
        deadline = time.monotonic() + self.peer_timeout + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept(self, i: int, fields) -> Joined:
        keys = _join_keys(i)
        deadline = time.monotonic() + self.peer_timeout
        text = self.store.get(keys + "rank").decode("ascii", errors="replace")
        if not text.isdigit() or len(text) > 9:
            raise ValueError(f"a join posted a malformed rank {text[:20]!r}")
        rank = int(text)  # a claim until the secret is proven; checked by valid_rank once it is
        run_id = authenticate_over_store(
            self.store,
            is_host=True,
            secret=self.secret,
            deadline=deadline,
            where=self.where,
            stop_requested=self.stop_requested,
            timeout_s=self.peer_timeout,
            keys=keys + "auth/",
            roles=("server", f"client (rank {rank})"),
            joiner_rank=rank,
        )
        group = call_bounded(
            lambda: pair_group(
                self.backend, dist.PrefixStore(f"{KEYS}pair/{run_id}/", self.store), 0, self.peer_timeout
            ),
            deadline + 1.0,
            lambda: ConnectError(f"the pair group with client rank {rank} did not form"),
            self.stop_requested,
        )
        endpoint = Endpoint("client", self.peer_timeout, group=group, rank=0, peer_rank=rank)
        confirm_channel(endpoint, self.secret, run_id, self.peer_timeout, encrypt=self.encrypt)
        handshake(endpoint, "server", fields, self.peer_timeout)
        return Joined(rank, endpoint)

    # -- messages ---------------------------------------------------------------------------------
    def send(self, rank: int, msg: Message, what: str) -> None:
        self.endpoints[rank].send(msg, what)

    def drop(self, rank: int) -> None:
        """Forget ``rank``'s connection (its pair group is left to close with the peer)."""
        self.endpoints.pop(rank, None)
        self._headers.pop(rank, None)

    def next_message(
        self, ranks, *, idle: Callable[[], bool] = lambda: False
    ) -> tuple[int, Message | PeerLostError] | None:
        """The first message from any of ``ranks``: ``(rank, message)``; ``(rank, PeerLostError)``
        when that peer's connection closed or it sent nothing for ``peer_timeout`` seconds since
        this host began waiting on it; None when ``idle()`` turns true first (the caller has other
        work, e.g. a join to accept). ``KeyboardInterrupt`` when ``stop_requested()``.

        Each peer's next header is awaited by a helper thread of its own (a gloo receive completes
        only inside ``wait``), which reports to one queue."""
        for r in ranks:
            if r in self.endpoints and r not in self._headers:
                self._post(r)
        while True:
            try:
                rank, header, failure = self._arrivals.get(timeout=0.05)
            except queue.Empty:
                if self.stop_requested():
                    raise KeyboardInterrupt from None
                if idle():
                    return None
                continue
            if self._headers.get(rank, (None,))[0] is not header:
                continue  # a dropped (or replaced) connection's late report
            del self._headers[rank]
            if failure is not None:
                return rank, failure
            try:
                return rank, self.endpoints[rank].recv_rest(header, "receiving a request")
            except TamperedMessageError as exc:  # tell the client why (authenticated), then it counts as lost
                refuse_to_peer(self.endpoints[rank], exc)
                return rank, exc
            except PeerLostError as exc:
                return rank, exc

    def _post(self, rank: int) -> None:
        ep = self.endpoints[rank]
        what = "waiting for the next request"
        try:
            header, work = ep.post_header(what)
        except PeerLostError as exc:
            header, work = torch.empty(0), None
            self._arrivals.put((rank, header, exc))
            self._headers[rank] = (header, None)
            return
        self._headers[rank] = (header, work)

        def wait():
            try:
                ep._wait([work], what, self.peer_timeout)
                self._arrivals.put((rank, header, None))
            except PeerLostError as exc:
                self._arrivals.put((rank, header, exc))

        threading.Thread(target=wait, name=f"hosl-fleet-wait-{rank}", daemon=True).start()


def join_fleet(
    *,
    secret: bytes,
    rank: int,
    addr: str,
    port: int,
    timeout_s: float,
    peer_timeout: float,
    fields: Mapping[str, object],
    backend: str = "gloo",
    stop_requested: Callable[[], bool] | None = None,
    encrypt: bool = False,
) -> Endpoint:
    """A client's side: join the fleet whose server listens on ``addr:port`` as ``rank`` (>= 1);
    returns the endpoint to the server. Raises :class:`AuthError` (secrets differ, or the server
    refused this rank), :class:`ConnectError` (nobody there in ``timeout_s``), or
    :class:`ConfigMismatchError`."""
    if not secret:
        raise ValueError("a fleet client needs the server's shared secret (--secret-file or HOSL_SECRET)")
    if rank < 1:
        raise ValueError(f"a fleet client's --rank must be >= 1 (the server is rank 0), got {rank}")
    where = f"{addr}:{port}"
    deadline = time.monotonic() + timeout_s
    store = open_store(addr, port, 1, deadline, timeout_s, stop_requested)
    i = int(
        call_bounded(
            lambda: store.add(JOINS, 1),
            deadline,
            lambda: ConnectError(f"the rendezvous store on {where} stopped answering"),
            stop_requested,
        )
    )
    keys = _join_keys(i)
    store.set(keys + "rank", str(rank).encode("ascii"))
    # wait for the server's challenge; nothing else in the store is believed (a "refused" key, say:
    # anyone can write one). A join number that fell out of the server's window of waiting slots (a
    # stranger bumped the counter past it) is given up for a new one.
    polls = 0
    while not store.check([keys + "auth/challenge"]):
        if time.monotonic() > deadline:
            raise ConnectError(
                f"the server on {where} did not take up this join within {timeout_s:g} s (--connect-timeout)"
            )
        if stop_requested is not None and stop_requested():
            raise KeyboardInterrupt
        polls += 1
        if polls % 10 == 0 and int(store.add(JOINS, 0)) - i >= MAX_WAITING_SLOTS:
            i = int(store.add(JOINS, 1))
            keys = _join_keys(i)
            store.set(keys + "rank", str(rank).encode("ascii"))
        time.sleep(0.05)
    run_id = authenticate_over_store(
        store,
        is_host=False,
        secret=secret,
        deadline=deadline,
        where=where,
        stop_requested=stop_requested,
        timeout_s=timeout_s,
        keys=keys + "auth/",
        roles=("server", f"client (rank {rank})"),
        joiner_rank=rank,
        believe_refusal=False,  # the store is open to strangers; only the server's proof counts
    )
    group = call_bounded(
        lambda: pair_group(backend, dist.PrefixStore(f"{KEYS}pair/{run_id}/", store), 1, peer_timeout),
        deadline + 1.0,
        lambda: ConnectError(f"the pair group with the server on {where} did not form"),
        stop_requested,
    )
    endpoint = Endpoint("server", peer_timeout, group=group, rank=1, peer_rank=0)
    confirm_channel(endpoint, secret, run_id, timeout_s, encrypt=encrypt)
    handshake(endpoint, "client", fields, timeout_s)
    verdict = endpoint.recv("waiting for the server to accept this rank", max(1.0, deadline - time.monotonic()))
    text = tensor_text(verdict.tensors[0]) if verdict.tensors else ""
    if verdict.kind == Kind.ERROR:
        raise AuthError(f"the server on {where} refused rank {rank}: {text}")
    if verdict.kind != Kind.REPLY or text != VERDICT_OK:
        raise PeerProtocolError(f"the server on {where} answered the join with {verdict.kind.name} {text[:40]!r}")
    endpoint.store = store  # kept alive with the endpoint
    return endpoint
