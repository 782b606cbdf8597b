"""A client of a fleet (``hosl train --role client --clients N --rank R``; docs/fleet.md).

The client runs the ordinary training loop with a hosl mode whose step ends differently
(:class:`FleetSync`): the optimizer leaves its update (seeds, projected gradients) pending, the
client sends it with ``end-step``, and applies what the server relays: with ``--client-sync
shared`` every client's update of the step, in rank order, as one fused update over all their
directions (the mean of the clients' estimates), so every client holds the same bits; with
``local``, its own update only (a personalised client half).

Each step's seeds are a function of (``--seed``, rank, step), not of a generator's history, so
clients never share directions and a client that restarts needs no generator state.

Joining (or rejoining after a crash, with ``--resume``): the client tells the server which
checkpoints it has; the server answers with the step to restart from and the update log since
(:func:`catch_up`); the client replays it (the same fused updates, in the same order) and is at
the fleet's step with the same weights as the others, without any weight transfer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from hosl.training import checkpoint as ckpt
from hosl.training.config import TrainConfig
from hosl.training.loop import run_loop, save_run
from hosl.training.protocol import PHASE_NAMES, Phase
from hosl.training.remote import StopOnInterrupt, check_split_mode, fingerprint, goodbye_on_exit
from hosl.training.run import Run, build_run, load_resume_state, say
from hosl.training.schedule import schedule_client_step
from hosl.transport.distributed import DistributedLink
from hosl.transport.fleet import join_fleet


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the step's seed stream for client ``rank``: distinct per (seed, rank, step)."""
    digest = hashlib.sha256(f"hosl-fleet|{seed}|{rank}|{step}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def apply_updates(opt, updates) -> bool:
    """Apply a step's relayed ``updates`` [(rank, seeds, grads), ...] as ONE update over all their
    directions, in the order given; False when there was none (or it was refused as unsafe)."""
    seeds = [s for _rank, ss, _g in updates for s in ss]
    grads = [g for _rank, _s, gs in updates for g in gs]
    return bool(seeds) and opt.apply_update(seeds, grads)


class FleetSync:
    """A hosl mode's step in a fleet (``HOSLMode.sync``)."""

    def __init__(self, rank: int, seed: int):
        self.rank, self.seed = rank, seed

    def before_step(self, opt, step: int) -> None:
        opt.defer_update = True
        opt.generator.manual_seed(step_seed(self.seed, self.rank, step))

    def end_step(self, opt, proxy) -> None:
        apply_updates(opt, proxy.end_step(*opt.pending_update))


def catch_up(run: Run, say) -> tuple[int, int]:
    """Join the fleet's step: restart from the checkpoint the server picks, replay the update log
    up to the fleet's step. Returns (restart step, fleet step)."""
    have = sorted({0, run.step, *ckpt.checkpoint_steps(run.run_dir)})
    start, to, steps = run.proxy.join(have)  # type: ignore[union-attr]  # a fleet client has a proxy
    if start != run.step:
        if start == 0:
            raise RuntimeError(
                f"the fleet is at step {to}, before this client's checkpoints ({have[1:]}); its "
                f"initial weights are needed: start this client again in a new --out (it replays "
                f"the fleet's log from step 0)"
            )
        _reload(run, start)
    opt = run.mode.opt  # type: ignore[attr-defined]  # a fleet client is hosl
    for step, updates in enumerate(steps, start + 1):
        schedule_client_step(run.mode, run.hp, step)
        apply_updates(opt, updates)
    run.step = to
    if to != start:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "catch-up", "from": start, "to": to}) + "\n")
        save_run(run, to)  # the caught-up weights are a checkpoint of their own
        say(f"client: caught up from step {start} to the fleet's step {to} by replaying {len(steps)} logged steps")
    return start, to


def _reload(run: Run, step: int) -> None:
    """Go back to this client's checkpoint at ``step`` (the server resumed from an earlier step)."""
    path = ckpt.checkpoint_at(run.run_dir, step)
    if path is None:
        raise FileNotFoundError(f"no checkpoint at step {step} in {run.run_dir}")
    state = ckpt.load_checkpoint(path, run.modules)
    load_resume_state(state, run.mode, None)
    run.batches.load_state_dict(state["batches"])
    run.step, run.seconds, run.evals = state["step"], state["seconds"], state["evals"]


def run_fleet_client(cfg: TrainConfig, conn) -> dict:
    """This client's run in the fleet at ``conn`` (a ``hosl.training.remote.Connection``)."""
    check_split_mode(cfg)
    rank = conn.rank
    if rank is None or not 1 <= rank <= cfg.clients:
        raise ValueError(f"a fleet client needs --rank in 1..{cfg.clients} (the server is rank 0), got {rank}")
    if not conn.secret:
        raise ValueError("a fleet client needs the server's shared secret: --secret-file PATH or HOSL_SECRET")
    cfg = replace(cfg, out=str(Path(cfg.out) / f"client{rank}"))
    stop = StopOnInterrupt(f"client {rank}")
    links: list[DistributedLink] = []

    def connect_server() -> DistributedLink:
        say(f"client {rank}: joining the fleet on {conn.where()} (up to {conn.connect_timeout:g} s)")
        endpoint = join_fleet(
            secret=conn.secret,
            rank=rank,
            addr=conn.addr(),
            port=conn.port(),
            timeout_s=conn.connect_timeout,
            peer_timeout=conn.peer_timeout,
            fields=fingerprint(cfg),
            backend=conn.backend or "gloo",
            stop_requested=stop.requested,
            encrypt=conn.encrypt,
        )
        stop.connected = True
        barrier = {
            int(Phase.CLEAN_LOSS): conn.connect_timeout,
            int(Phase.END_STEP): conn.connect_timeout,
            int(Phase.JOIN): conn.connect_timeout,
        }
        links.append(DistributedLink(endpoint, PHASE_NAMES, stop.requested, reply_timeouts=barrier))
        say(f"client {rank}: joined as rank {rank} of {cfg.clients} ({cfg.client_sync} client model)")
        return links[0]

    with stop, goodbye_on_exit(links):
        run = build_run(cfg, connect_server=connect_server, fleet_rank=rank)
        run.mode.sync = FleetSync(rank, cfg.seed)  # type: ignore[attr-defined]  # a fleet client is hosl
        run.evaluates = cfg.client_sync == "local" or rank == 1  # shared: one model, rank 1 evaluates it
        catch_up(run, say)
        summary = run_loop(run)
        summary.update(rank=rank, clients=cfg.clients, client_sync=cfg.client_sync)
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
