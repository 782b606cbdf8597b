"""The server of a fleet: one server half answering N hosl clients step by step
(``hosl serve --clients N``; docs/fleet.md).

A step (a *round*) for the clients that are connected ("live"):

1. each client's ``begin-step`` and ``clean-loss`` arrive as the client gets there; the clean
   losses are held until every live client's is in (a barrier), then run in rank order: forward,
   backward, gradients *accumulated* into the server's weights (not one concatenated batch: the
   clients' batches are padded to different lengths, and only one client's activation graph is
   alive at a time, so server memory does not grow with N). Running them in rank order makes the
   sum the same bits whatever order the activations arrived in;
2. each client's perturbed points (``losses``, or the linear estimate's phases) are answered as
   they come (the server's weights do not change within a round);
3. the ``end-step`` s (each carrying that client's update: seeds and projected gradients) are held
   until every live client's is in; then the server divides the accumulated gradient by the number
   of clean losses (the mean over clients), steps its optimizer once, appends the round's updates
   to the update log (``fleet_log.py``, on disk before anyone is answered) and answers each
   client with the updates it must apply (``--client-sync shared``: all, in rank order; ``local``:
   its own).

Faults: a client whose connection closes, or that stays silent ``--peer-timeout`` seconds while
the fleet waits on it, is dropped from the round (logged in ``fleet.jsonl``, counted in the
summary); the others go on. Its clean-loss gradient, if already accumulated, stays in that round.
A client may join (or rejoin) while a round is still collecting clean losses: it catches up by
replaying the update log from one of its checkpoints (``join``), with no weight transfer.

The server knows the clients only by rank; the transport (``hosl/transport/fleet.py``) proves
each one holds the shared secret before anything else is said. The server half itself is driven
through :class:`~hosl.training.fleet_half.FleetHalf`'s operations: in this process, or relayed to
the ranks of ``--server-procs P`` (``hosl/training/server_ranks.py``). A server rank that dies
(:class:`~hosl.training.server_group.ServerRankLost`) ends the fleet: every client waiting on an
answer, and every client that asks within ``--peer-timeout``, is told why, and the server exits
with the error (resume the run with ``--resume``, with any ``--server-procs``).
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hosl.training import checkpoint as ckpt
from hosl.training import fleet_half as op
from hosl.training.fleet_log import UpdateLog, relayed
from hosl.training.protocol import CatchUp, ClientUpdate, Phase, Relay, ZOUpdate
from hosl.training.remote import StopOnInterrupt, fingerprint, start_server_process, write_or_check_server_config
from hosl.training.run import say
from hosl.training.server_group import ServerRankLost
from hosl.transport import Message, PeerLostError, ShutdownCode
from hosl.transport.fleet import FleetHost
from hosl.transport.wire import Kind, tensor_text, text_tensor

JOIN_CHECK_S = 0.2  # how often the server looks for joining clients while it waits on messages


@dataclass
class ClientSlot:
    """What the server holds for one connected client during a round."""

    rank: int
    held: Message | None = None  # a clean-loss or end-step waiting for the barrier (or, once a
    # server rank is lost, the request it waits on an answer to)


class FleetServer:
    """``half``: anything that answers :mod:`hosl.training.fleet_half`'s operations (``handle(op)
    -> reply``): a ``FleetHalf``, or the relay to server rank 0. ``skipped``: the server steps
    skipped before (a resumed run's)."""

    def __init__(
        self,
        host: FleetHost,
        half,
        log: UpdateLog,
        *,
        clients: int,
        client_sync: str,
        fields: dict,
        run_dir: Path,
        start_timeout_s: float,
        say: Callable[[str], None],
        completed: int = 0,
        skipped: int = 0,
    ):
        self.host, self.half, self.log = host, half, log
        self.skipped = skipped  # the server steps skipped (non-finite losses or gradients)
        self.clients, self.client_sync, self.fields = clients, client_sync, fields
        self.run_dir, self.say = Path(run_dir), say
        self.start_timeout_s = start_timeout_s
        self.completed = completed  # the last finished round (step)
        self.live: dict[int, ClientSlot] = {}
        self.finished: set[int] = set()
        self.collecting = True  # False between the clean-loss barrier and the end-step barrier
        self.clean_count = 0
        self.started = False
        self.events = open(self.run_dir / "fleet.jsonl", "a", buffering=1)
        self.counts = {"rounds": 0, "dropped": 0, "joins": 0, "rejoins": 0, "refused_joins": 0, "errors": 0}
        self.ever_joined: set[int] = set()
        self.saved_step = -1
        self.round_started = time.monotonic()
        self.last_live = time.monotonic()
        self.started_at = time.monotonic()

    # -- the loop ---------------------------------------------------------------------------------
    def serve(self) -> dict:
        try:
            return self._serve()
        except ServerRankLost as exc:
            self._tell_everyone(exc)
            raise

    def _serve(self) -> dict:
        deadline = time.monotonic() + self.start_timeout_s
        next_join_check = 0.0
        while not self._over():
            now = time.monotonic()
            if self.collecting and now >= next_join_check:
                self._accept_joins()
                next_join_check = now + JOIN_CHECK_S
            if not self.started and (len(self.live) >= self.clients or now > deadline):
                self.started = True
            if not self.live:
                if not self.collecting:  # everyone of this step left: finish it with what it has
                    self._finish_round()
                time.sleep(0.05)
                continue
            self.last_live = now
            waiting = [r for r, s in self.live.items() if s.held is None]
            if not waiting:
                self._barriers()
                if not any(s.held is None for s in self.live.values()):
                    time.sleep(0.01)  # everyone waits on a barrier that cannot fire yet (the fleet is starting)
                continue
            got = self.host.next_message(
                waiting,
                idle=lambda at=next_join_check: self.collecting and time.monotonic() >= at,  # type: ignore[misc]  # a lambda with a default
            )
            if got is None:
                continue
            rank, msg = got
            if isinstance(msg, PeerLostError):
                self._drop(rank, str(msg))
            else:
                self._dispatch(rank, msg)
            self._barriers()
        self.events.close()
        return self.summary()

    def _over(self) -> bool:
        if self.live:
            return False
        if self.ever_joined and self.finished >= set(range(1, self.clients + 1)):
            return True  # every rank finished
        # nobody connected: wait for (re)joins up to the start timeout
        return time.monotonic() - self.last_live > self.start_timeout_s

    # -- joins ------------------------------------------------------------------------------------
    def _accept_joins(self) -> None:
        if self.host.pending_joins() <= 0:
            return
        refused_before = self.host.refused
        for joined in self.host.accept_joins(self.fields, self._join_refusal):
            rejoin = joined.rank in self.ever_joined
            self.ever_joined.add(joined.rank)
            self.finished.discard(joined.rank)
            self.live[joined.rank] = ClientSlot(joined.rank)
            self.counts["rejoins" if rejoin else "joins"] += 1
            self._event("rejoin" if rejoin else "join", rank=joined.rank)
            self.say(
                f"server: client rank {joined.rank} {'re' if rejoin else ''}joined at step {self.completed} "
                f"({len(self.live)} live)"
            )
        if self.host.refused > refused_before:
            self.counts["refused_joins"] += self.host.refused - refused_before
            self._event("refused", count=self.host.refused - refused_before)

    def _join_refusal(self, rank: int) -> str | None:
        if not 1 <= rank <= self.clients:
            return f"this fleet has ranks 1..{self.clients} (--clients {self.clients})"
        if rank in self.live:
            return f"rank {rank} is connected already"
        return None

    # -- one message --------------------------------------------------------------------------------
    def _dispatch(self, rank: int, msg: Message) -> None:
        slot = self.live[rank]
        if msg.kind == Kind.SHUTDOWN:
            with contextlib.suppress(PeerLostError):
                self.host.send(
                    rank, Message(Kind.SHUTDOWN, code=int(ShutdownCode.DONE)), "the shutdown acknowledgement"
                )
            self._leave(rank, done=msg.code == int(ShutdownCode.DONE), why=f"said goodbye (code {msg.code})")
            return
        if msg.kind == Kind.ERROR:  # the client refused an answer (it failed its authentication check, say)
            self._drop(rank, f"it gave up: {tensor_text(msg.tensors[0]) if msg.tensors else '?'}")
            return
        try:
            phase = Phase(msg.phase)
            if phase in (Phase.CLEAN_LOSS, Phase.END_STEP):
                self._hold(slot, msg)
                return
            reply = self._answer(slot, phase, msg)
        except ServerRankLost:
            slot.held = msg  # it waits on this answer
            raise
        except Exception as exc:  # this client's request failed: tell it, drop it, keep serving the others
            self.counts["errors"] += 1
            text = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(PeerLostError):
                self.host.send(
                    rank, Message(Kind.ERROR, msg.phase, msg.step, tensors=[text_tensor(text)]), "an error report"
                )
            self._drop(rank, f"its request failed: {text}")
            return
        self._reply(rank, reply)

    def _answer(self, slot: ClientSlot, phase: Phase, msg: Message) -> Message:
        if phase == Phase.JOIN:
            return self._catch_up(slot, msg)
        if phase == Phase.RESUME:  # the fleet's server resumed on its own (--resume); a join catches up
            return Message(Kind.REPLY, msg.phase, msg.step)
        if phase == Phase.SAVE:
            if msg.step != self.completed:
                raise ValueError(f"save at step {msg.step} asked while the fleet is at step {self.completed}")
            if self.saved_step != msg.step:
                self.half.handle(op.half_request(Phase.SAVE, msg.step))
                self.saved_step = msg.step
            return Message(Kind.REPLY, msg.phase, msg.step)
        if phase == Phase.BEGIN_STEP:
            if msg.step != self.completed + 1 or not self.collecting:
                raise ValueError(
                    f"client rank {slot.rank} begins step {msg.step} but the fleet is at step "
                    f"{self.completed + (0 if self.collecting else 1)} (a client out of step: restart "
                    f"it with --resume to catch up)"
                )
        return self.half.handle(op.client_request(slot.rank, msg))

    def _hold(self, slot: ClientSlot, msg: Message) -> None:
        expected = Phase.CLEAN_LOSS if self.collecting else Phase.END_STEP
        if msg.phase != expected or msg.step != self.completed + 1:
            raise ValueError(
                f"client rank {slot.rank} sent {Phase(msg.phase).name.lower()} of step {msg.step} while "
                f"the fleet waits for {expected.name.lower()} of step {self.completed + 1}"
            )
        slot.held = msg

    def _reply(self, rank: int, reply: Message) -> None:
        try:
            self.host.send(rank, reply, f"the answer to phase {Phase(reply.phase).name.lower()}")
        except PeerLostError as exc:
            self._drop(rank, str(exc))

    # -- barriers ---------------------------------------------------------------------------------
    def _barriers(self) -> None:
        if not self.live:
            return
        held = all(s.held is not None for s in self.live.values())
        if not held:
            return
        if self.collecting and self.started:
            self._run_clean_losses()
        elif not self.collecting:
            self._finish_round()

    def _run_clean_losses(self) -> None:
        """Every live client's clean loss, in rank order: forward, backward into the accumulated
        server gradient; each client gets its loss back."""
        self.collecting = False
        self.clean_count = 0
        self.round_started = time.monotonic()
        for rank in sorted(self.live):
            slot = self.live[rank]
            msg, slot.held = slot.held, None
            try:
                reply = self.half.handle(op.client_request(rank, msg))  # type: ignore[arg-type]  # held: the clean-loss request
            except ServerRankLost:
                slot.held = msg  # it waits on this answer
                raise
            except Exception as exc:
                self.counts["errors"] += 1
                with contextlib.suppress(PeerLostError):
                    self.host.send(
                        rank,
                        Message(Kind.ERROR, msg.phase, msg.step, tensors=[text_tensor(f"{type(exc).__name__}: {exc}")]),  # type: ignore[union-attr]  # held: the clean-loss request
                        "an error report",
                    )
                self._drop(rank, f"its clean loss failed: {exc}")
                continue
            self.clean_count += 1
            self._reply(rank, reply)

    def _finish_round(self) -> None:
        step = self.completed + 1
        slots = [self.live[r] for r in sorted(self.live)]
        updates = []
        for slot in slots:
            seeds, grads = ZOUpdate.from_fields(slot.held.ints, slot.held.floats)  # type: ignore[union-attr]  # held: each slot's end-step
            if seeds:
                updates.append(ClientUpdate(slot.rank, seeds, grads))
        skipped_before = self.skipped
        # the gradient averaged over the clean losses, the optimizer's step (or a skip, counted)
        ended = self.half.handle(op.finish_round(step, self.clean_count, [s.rank for s in slots]))
        self.skipped = ended.ints[0]
        self.log.append(step, updates)  # on disk before any client applies it
        self.completed, self.collecting = step, True
        self.counts["rounds"] += 1
        self._event(
            "step",
            step=step,
            members=[s.rank for s in slots],
            clean=self.clean_count,
            updates=[u[0] for u in updates],
            server_step_skipped=self.skipped > skipped_before,
            seconds=round(time.monotonic() - self.round_started, 4),
        )
        for slot in slots:
            msg, slot.held = slot.held, None
            relay = Relay(self.skipped, relayed(updates, slot.rank, self.client_sync))
            ints, floats = relay.to_fields()
            self._reply(slot.rank, Message(Kind.REPLY, msg.phase, msg.step, ints, floats))  # type: ignore[union-attr]  # held: the end-step request

    # -- a lost server rank ------------------------------------------------------------------------
    def _tell_everyone(self, exc: ServerRankLost) -> None:
        """The server half cannot answer any more: every client waiting on an answer is told why at
        once, and every other client at its next request (within ``--peer-timeout``)."""
        text = " ".join(str(exc).split())
        self.say(f"server: {text}; stopping the fleet")
        self._event("server-rank-lost", why=text)
        for rank, slot in list(self.live.items()):
            if slot.held is not None:
                self._refuse(rank, slot.held, text)
        deadline = time.monotonic() + self.host.peer_timeout
        while self.live and time.monotonic() < deadline:
            got = self.host.next_message(list(self.live), idle=lambda: time.monotonic() > deadline)
            if got is None:
                break
            rank, msg = got
            if isinstance(msg, PeerLostError) or msg.kind != Kind.REQUEST:
                self.live.pop(rank, None)
                self.host.drop(rank)
            else:
                self._refuse(rank, msg, text)
        self.events.close()

    def _refuse(self, rank: int, msg: Message, text: str) -> None:
        with contextlib.suppress(PeerLostError):
            self.host.send(
                rank, Message(Kind.ERROR, msg.phase, msg.step, tensors=[text_tensor(text)]), "an error report"
            )
        self.live.pop(rank, None)
        self.host.drop(rank)

    # -- joins' catch-up --------------------------------------------------------------------------
    def _catch_up(self, slot: ClientSlot, msg: Message) -> Message:
        """The client's checkpoint steps are the request's ints (0, its initial weights, always
        counts); it restarts from the latest one at or before the fleet's step and replays the log."""
        have = sorted({0, *msg.ints})
        start = max(s for s in have if s <= self.completed)
        steps = [relayed(u, slot.rank, self.client_sync) for u in self.log.between(start, self.completed)]
        ints, floats = CatchUp(start, self.completed, steps).to_fields()
        self._event("catch-up", rank=slot.rank, start=start, to=self.completed)
        return Message(Kind.REPLY, msg.phase, msg.step, ints, floats)

    # -- leaving ----------------------------------------------------------------------------------
    def _drop(self, rank: int, why: str) -> None:
        if rank not in self.live:
            return
        self.counts["dropped"] += 1
        self.say(f"server: dropped client rank {rank} at step {self.completed + 1}: {why}")
        self._leave(rank, done=False, why=why, event="dropped")

    def _leave(self, rank: int, *, done: bool, why: str, event: str = "left") -> None:
        self.live.pop(rank, None)
        self.host.drop(rank)
        self.half.handle(op.forget(rank))
        if done:
            self.finished.add(rank)
        self._event(event, rank=rank, why=why, done=done)
        self.last_live = time.monotonic()

    def _event(self, kind: str, **fields) -> None:
        self.events.write(
            json.dumps(
                {
                    "event": kind,
                    "fleet_step": self.completed,
                    "time": round(time.monotonic() - self.started_at, 4),
                    **fields,
                }
            )
            + "\n"
        )

    def summary(self) -> dict:
        return {
            "role": "server",
            "clients": self.clients,
            "client_sync": self.client_sync,
            "steps": self.completed,
            "finished": sorted(self.finished),
            **self.counts,
            "skipped_server_steps": self.skipped,
            "server_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


def run_fleet_server(cfg, conn, server_procs: int = 1, server_parallel: str = "ddp") -> int:
    """``hosl serve --clients N``: load the server half (here, or over ``server_procs`` spawned
    ranks), host the fleet at ``conn`` (a ``hosl.training.remote.Connection``), serve until every
    client finished (or none is connected for ``--connect-timeout`` seconds). Exit status 0 when
    every rank finished, else 1; a lost server rank raises :class:`ServerRankLost`."""
    from hosl.training.server_ranks import check_server_procs, relayed_server_ranks

    check_server_procs(cfg, server_procs, server_parallel, relayed=True)
    conn, run_dir, handler = start_server_process(cfg, conn, "every client", load_half=server_procs == 1)
    log_path = run_dir / "fleet_log.jsonl"
    completed = 0
    if cfg.resume and ckpt.list_checkpoints(run_dir):
        completed = ckpt.checkpoint_steps(run_dir)[-1]
    elif log_path.exists():
        log_path.unlink()  # a run that never checkpointed: its log starts again with it
    log = UpdateLog(log_path)
    log.truncate(completed)
    if log.last_step < completed:
        raise RuntimeError(
            f"{log_path} ends at step {log.last_step} but the server's checkpoint is at step "
            f"{completed}: the log cannot rebuild the clients"
        )
    write_or_check_server_config(run_dir, cfg)
    halves = (
        contextlib.nullcontext(op.FleetHalf(handler))
        if handler is not None
        else relayed_server_ranks(
            cfg,
            server_procs,
            server_parallel,
            run_dir,
            conn.peer_timeout,
            conn.connect_timeout,
            conn.backend,
            fleet=True,
        )
    )
    stop = StopOnInterrupt("server")
    with stop, halves as half:
        skipped = 0
        if completed:
            skipped = half.handle(op.half_request(Phase.RESUME, completed)).ints[0]
            say(f"server: resumed the fleet from its checkpoint at step {completed}")
        over = f" over {server_procs} server processes ({server_parallel})" if server_procs > 1 else ""
        say(
            f"server: hosting a fleet of {cfg.clients} clients on {conn.where()} ({cfg.client_sync} client model){over}"
        )
        host = FleetHost(
            secret=conn.secret,
            addr=conn.addr(),
            port=conn.port(),
            timeout_s=conn.connect_timeout,
            peer_timeout=conn.peer_timeout,
            backend=conn.backend or "gloo",
            stop_requested=stop.requested,
            log=say,
            encrypt=conn.encrypt,
        )
        stop.connected = True
        fleet = FleetServer(
            host,
            half,
            log,
            clients=cfg.clients,
            client_sync=cfg.client_sync,
            fields=fingerprint(cfg),
            run_dir=run_dir,
            start_timeout_s=conn.connect_timeout,
            say=say,
            completed=completed,
            skipped=skipped,
        )
        try:
            summary = fleet.serve()
        except ServerRankLost as exc:
            _write_summary(run_dir, cfg, {**fleet.summary(), "server_rank_lost": " ".join(str(exc).split())})
            raise
        finally:
            host.finish_joins()
        if fleet.saved_step != fleet.completed and fleet.completed > 0:
            half.handle(op.half_request(Phase.SAVE, fleet.completed))
    _write_summary(run_dir, cfg, summary)
    say(
        f"server: fleet done at step {fleet.completed}: {summary['rounds']} rounds, {summary['dropped']} drops, "
        f"{summary['rejoins']} rejoins, {summary['refused_joins']} refused joins"
    )
    return 0 if summary["finished"] == list(range(1, cfg.clients + 1)) else 1


def _write_summary(run_dir: Path, cfg, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps({"mode": cfg.mode, "model": cfg.model, **summary}, indent=2))
