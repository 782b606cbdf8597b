"""Starting a server half over several processes (``--server-procs P``) with
``torch.multiprocessing``; each rank loads the same server half, joins the group
(``hosl/training/server_group.py``) and answers what rank 0 shares until it is told to stop.

* ``hosl train --server-procs P`` (:func:`server_ranks`): this process holds the client and is
  server rank 0; it spawns ranks 1..P-1.
* ``hosl serve --server-procs P`` (:func:`relayed_server_ranks`): this process speaks to the client
  (or hosts the fleet, ``--clients N``) and spawns all P ranks; it relays each request (a fleet's
  operation, ``hosl/training/fleet_half.py``) to rank 0 over a pipe (the link to the client and
  the server ranks' group are each a process's default torch.distributed group, and one process
  holds only one).

The ranks rendezvous on a free port of 127.0.0.1 (one machine). Every wait is bounded: the
rendezvous and the group's collectives by ``--connect-timeout`` (a rank may still be loading its
half, and between requests the client may be evaluating), the wait for the spawned ranks to exit
by ``_EXIT_GRACE_S``. A rank that dies closes its connections: the next collective of the others
fails at once: every rank left and the serving process raise a ``ServerRankLost`` naming the
lost rank (the ranks print it as one line and exit with status 2).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from hosl.training.config import TrainConfig
from hosl.training.modes import SPLIT_MODES
from hosl.training.server_group import ServerGroup, ServerRankLost, check_parallel, follow
from hosl.transport.link import PeerLostError

_EXIT_GRACE_S = 30.0  # how long rank 0 waits for the other ranks to exit once told to stop
_DEATH_GRACE_S = 2.0  # after a failed collective: how long to wait for a rank's exit to be readable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_server_procs(cfg: TrainConfig, procs: int, parallel: str, relayed: bool = False) -> None:
    """Refuse what several server ranks do not do (yet), before anything starts. ``relayed``: the
    ranks serve a client process or a fleet (``hosl serve``), not this process's client."""
    check_parallel(procs, parallel)
    if procs == 1:
        return
    if cfg.mode not in SPLIT_MODES:
        raise ValueError(f"--server-procs {procs} needs a split mode ({', '.join(SPLIT_MODES)}), got --mode {cfg.mode}")
    if cfg.resume and not relayed:
        raise ValueError(
            f"hosl train --resume with --server-procs {procs} is not supported yet (the spawned ranks "
            "would not load the checkpoint): resume with --server-procs 1, or run the server with "
            "hosl serve --server-procs (its ranks load the checkpoints)"
        )
    if parallel == "fsdp" and not relayed:
        raise ValueError(
            "hosl train --server-procs with --server-parallel fsdp is not supported (the run saves the "
            "server half with the client, unsharded); use ddp, or hosl serve --server-parallel fsdp "
            "beside a client process or a fleet"
        )


@dataclass(frozen=True)
class _Rendezvous:
    """Where the ``procs`` server ranks of one run meet (a local ``port``), how they split the server
    half (``parallel``) and the bound on the rendezvous and collectives (``timeout_s``)."""

    procs: int
    parallel: str
    port: int
    timeout_s: float
    backend: str | None

    def join(self, rank: int) -> ServerGroup:
        return ServerGroup.join(rank, self.procs, self.parallel, "127.0.0.1", self.port, self.timeout_s, self.backend)


def _start_rank(rank: int, cfg: TrainConfig, meet: _Rendezvous, checkpoint_dir: str | None):
    """Load the server half, join the group as ``rank``; returns (group, handler)."""
    from hosl.training.run import load_server_model, server_handler

    model_kind, server = load_server_model(cfg)
    group = meet.join(rank)
    half = server_handler(
        cfg,
        model_kind,
        server,
        group=group,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        resume_allowed=cfg.resume,
    )
    return group, half


@contextlib.contextmanager
def _exit_when_lost():
    """Around a spawned rank: a lost server rank is printed as one line and ends the process with
    status 2 (as the CLI's errors do), without a traceback."""
    try:
        yield
    except ServerRankLost as exc:
        print(f"hosl: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        sys.exit(2)


def _rank_main(index: int, cfg: TrainConfig, meet: _Rendezvous) -> None:
    """Server rank ``index + 1`` of ``hosl train --server-procs`` (a spawned process)."""
    group, half = _start_rank(index + 1, cfg, meet, None)
    try:
        with _exit_when_lost():
            follow(group, half.answer)
    finally:
        group.leave()


def _relayed_rank_main(
    rank: int, cfg: TrainConfig, meet: _Rendezvous, checkpoint_dir: str, pipe, fleet: bool = False
) -> None:
    """Server rank ``rank`` of ``hosl serve --server-procs`` (a spawned process); rank 0 answers the
    requests the serving process relays over ``pipe`` (None: no more), sending back
    ``("reply", message)``, ``("error", text)`` (the request failed) or ``("lost", text)`` (the
    group failed: then it exits). ``fleet``: the requests are a fleet's operations."""
    from hosl.training.fleet_half import FleetHalf

    group, half = _start_rank(rank, cfg, meet, checkpoint_dir)
    handler = FleetHalf(half) if fleet else half
    try:
        with _exit_when_lost():
            if rank != 0:
                follow(group, handler.answer)
                return
            pipe.send(("ready", None))
            while (request := _recv_or_none(pipe)) is not None:
                try:
                    pipe.send(("reply", handler.handle(request)))
                except Exception as exc:  # noqa: BLE001 - the serving process reports it to the client
                    lost = group.lost(exc)
                    if lost is not None:
                        pipe.send(("lost", lost.detail))
                        raise lost from exc
                    pipe.send(("error", f"{type(exc).__name__}: {exc}"))
            group.share(None)
    finally:
        group.leave()


def _recv_or_none(pipe):
    try:
        return pipe.recv()
    except EOFError:  # the serving process is gone
        return None


class RankZeroRelay:
    """The serving process's handler for ``hosl serve --server-procs``: each request goes to server
    rank 0 (a child process) and its answer comes back, within ``timeout_s`` (``first_timeout_s``
    for the first: the ranks may still be loading). A server rank that died (or rank 0 silent past
    the timeout) raises :class:`ServerRankLost` naming the dead ranks (``lost()``: e.g. "server
    rank 1 (killed by signal 9)")."""

    def __init__(self, pipe, timeout_s: float, first_timeout_s: float, procs: int, lost=lambda: ""):
        self.pipe, self.timeout_s, self.first_timeout_s = pipe, timeout_s, first_timeout_s
        self.procs, self.lost = procs, lost
        self._ready = False

    def _fail(self, why: str) -> ServerRankLost:
        return ServerRankLost(
            f"lost {self.lost() or 'a server rank'} of --server-procs {self.procs} ({why}); "
            "resume the run from its last checkpoint with --resume (any --server-procs)"
        )

    def _wait(self, what: str, timeout_s: float):
        if not self.pipe.poll(timeout_s):
            raise self._fail(f"server rank 0 did not {what} within {timeout_s:g} s")
        try:
            return self.pipe.recv()
        except EOFError:
            raise self._fail(f"server rank 0 exited before it could {what}") from None

    def handle(self, request):
        if not self._ready:
            self._wait("load the server half and join the other ranks", self.first_timeout_s)
            self._ready = True
        try:
            self.pipe.send(request)
        except OSError:  # rank 0 is gone
            raise self._fail("server rank 0 is gone") from None
        status, value = self._wait("answer", self.timeout_s)
        if status == "lost":
            raise self._fail(f"server rank 0's collective failed: {value}")
        if status == "error":
            raise RuntimeError(value)
        return value


@contextlib.contextmanager
def server_ranks(
    cfg: TrainConfig, procs: int, parallel: str = "ddp", timeout_s: float = 60.0, backend: str | None = None
) -> Iterator[ServerGroup]:
    """Rank 0's group (this process), with ranks 1..``procs``-1 spawned and joined; on exit the
    ranks are told to stop and waited for (``procs == 1``: one process, nothing spawned)."""
    check_parallel(procs, parallel)
    if procs == 1:
        yield ServerGroup()
        return
    meet = _Rendezvous(procs, parallel, free_port(), timeout_s, backend)
    spawned = mp.start_processes(
        _rank_main,
        args=(cfg, meet),
        nprocs=procs - 1,
        join=False,
        start_method="spawn",
    )
    group = None
    try:
        group = meet.join(0)
        yield group
        group.share(None)  # no more requests
    except Exception as exc:
        lost = _lost_ranks(spawned, first_rank=1)
        if lost:
            raise PeerLostError(
                f"lost {lost} (server ranks of --server-procs {procs}): "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from exc
        raise
    finally:
        if group is not None:
            group.leave()
        _wait_for(spawned, _EXIT_GRACE_S)


def _lost_ranks(spawned, first_rank: int) -> str:
    """The spawned ranks that have exited with a failure, e.g. "server rank 1 (killed by signal 9)";
    ranks that exited with status 2 (they lost another rank) only when no other rank failed."""
    failed = []
    for i, process in enumerate(spawned.processes):
        process.join(_DEATH_GRACE_S)  # its sockets close a moment before its exit can be read
        code = process.exitcode
        if code not in (None, 0):
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            failed.append((code, f"server rank {first_rank + i} ({why})"))
    first = [name for code, name in failed if code != 2] or [name for _code, name in failed]
    return ", ".join(first)


def _wait_for(spawned, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the spawned ranks; end those still running. A rank's own failure
    was printed by that rank and reaches rank 0 as a failed collective, so it is not raised again."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if spawned.join(timeout=max(0.1, deadline - time.monotonic())):
                return
        except ProcessException:
            continue  # one rank failed; wait for the others
    for process in spawned.processes:
        if process.is_alive():
            process.terminate()


@contextlib.contextmanager
def relayed_server_ranks(
    cfg: TrainConfig,
    procs: int,
    parallel: str,
    checkpoint_dir: Path,
    answer_timeout_s: float,
    connect_timeout_s: float,
    backend: str | None = None,
    fleet: bool = False,
) -> Iterator[RankZeroRelay]:
    """``hosl serve --server-procs P``: all P ranks spawned; yields the relay to rank 0, which waits
    ``answer_timeout_s`` for each answer (``connect_timeout_s`` for the first, while the ranks
    load). The ranks' group (rendezvous and collectives) is bounded by ``connect_timeout_s``. On
    exit the ranks are told to stop and waited for. ``fleet``: the relay carries a fleet's
    operations (``hosl/training/fleet_half.py``)."""
    check_parallel(procs, parallel)
    ours, theirs = mp.get_context("spawn").Pipe()
    meet = _Rendezvous(procs, parallel, free_port(), connect_timeout_s, backend)
    spawned = mp.start_processes(
        _relayed_rank_main,
        args=(cfg, meet, str(checkpoint_dir), theirs, fleet),
        nprocs=procs,
        join=False,
        start_method="spawn",
    )
    try:
        # which process is which rank (to watch one, or to signal it)
        pids = {str(rank): process.pid for rank, process in enumerate(spawned.processes)}
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_dir) / "server_ranks.json").write_text(json.dumps({"parallel": parallel, "pids": pids}))
        yield RankZeroRelay(
            ours, answer_timeout_s, connect_timeout_s, procs, lost=lambda: _lost_ranks(spawned, first_rank=0)
        )
    finally:
        with contextlib.suppress(OSError):
            ours.send(None)
        ours.close()
        _wait_for(spawned, _EXIT_GRACE_S)
