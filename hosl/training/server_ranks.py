"""Starting a server half over several processes (``--server-procs P``): this process is server
rank 0 and spawns ranks 1..P-1 with ``torch.multiprocessing``; each loads the same server half,
joins the group (``hosl/training/server_group.py``) and answers what rank 0 shares until it is
told to stop.

The ranks rendezvous on a free port of 127.0.0.1 (one machine). Every wait is bounded by
``timeout_s``: the group's collectives, and the wait for the spawned ranks to exit.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import torch
import torch.multiprocessing as mp

from hosl.training.config import TrainConfig
from hosl.training.protocol import SPLIT_MODES
from hosl.training.server_group import ServerGroup, check_parallel, follow

_EXIT_GRACE_S = 30.0  # how long rank 0 waits for the other ranks to exit once told to stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_server_procs(cfg: TrainConfig, procs: int, parallel: str) -> None:
    """Refuse what several server ranks do not do (yet), before anything starts."""
    check_parallel(procs, parallel)
    if procs == 1:
        return
    if cfg.mode not in SPLIT_MODES:
        raise ValueError(f"--server-procs {procs} needs a split mode ({', '.join(SPLIT_MODES)}), got --mode {cfg.mode}")
    if cfg.resume:
        raise ValueError(f"--resume with --server-procs {procs} is not supported yet: resume with --server-procs 1 "
                         "(a ddp run's checkpoints are those of one server process)")
    if parallel == "fsdp":
        raise ValueError("--server-parallel fsdp does not write checkpoints yet (a sharded server half needs "
                         "torch.distributed.checkpoint); use ddp, or benchmarks/server_scaling.py to measure fsdp")
    if cfg.batch_size < procs:
        raise ValueError(f"--server-procs {procs} splits each batch's rows over the ranks: --batch-size must be at "
                         f"least {procs}, got {cfg.batch_size}")


def _rank_main(index: int, cfg: TrainConfig, procs: int, parallel: str, port: int, timeout_s: float,
               backend: str | None) -> None:
    """Server rank ``index + 1`` (a spawned process)."""
    from hosl.training.run import hyper, load_split_model, loss_fn, train_dropout
    from hosl.training.server_handler import ServerHandler

    torch.manual_seed(cfg.seed)
    model_kind, _tokenizer, client, server = load_split_model(cfg)
    del client
    group = ServerGroup.join(index + 1, procs, parallel, "127.0.0.1", port, timeout_s, backend)
    try:
        half = ServerHandler(server, cfg.mode, hyper(cfg), loss_fn(model_kind), model_kind,
                             train_dropout=train_dropout(cfg), trainable_only_checkpoints=cfg.lora, wire=cfg.wire,
                             group=group)
        follow(group, half.answer)
    finally:
        group.leave()


@contextlib.contextmanager
def server_ranks(cfg: TrainConfig, procs: int, parallel: str = "ddp", timeout_s: float = 60.0,
                 backend: str | None = None) -> Iterator[ServerGroup]:
    """Rank 0's group (this process), with ranks 1..``procs``-1 spawned and joined; on exit the
    ranks are told to stop and waited for (``procs == 1``: one process, nothing spawned)."""
    check_parallel(procs, parallel)
    if procs == 1:
        yield ServerGroup()
        return
    port = free_port()
    spawned = mp.start_processes(_rank_main, args=(cfg, procs, parallel, port, timeout_s, backend),
                                 nprocs=procs - 1, join=False, start_method="spawn")
    group = None
    try:
        group = ServerGroup.join(0, procs, parallel, "127.0.0.1", port, timeout_s, backend)
        yield group
        group.share(None)  # no more requests
    finally:
        if group is not None:
            group.leave()
        _wait_for(spawned, _EXIT_GRACE_S)


def _wait_for(spawned, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the spawned ranks; end those still running (a rank that failed
    raises here, as ``ProcessRaisedException``)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if spawned.join(timeout=max(0.1, deadline - time.monotonic())):
            return
    for process in spawned.processes:
        if process.is_alive():
            process.terminate()
