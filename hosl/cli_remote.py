"""Command-line pieces of two-process runs: ``hosl serve`` and ``hosl train --role ...``.

::

    hosl serve --rank 1 --master-addr A --master-port P [train arguments]      # the server half
    hosl train --role client --rank 0 --master-addr A --master-port P [...]    # the client half
    torchrun --nproc-per-node 2 -m hosl train --role auto [...]                # rank 0 client, 1 server

Both sides take the same training arguments (model, task, mode, cut, seed, ...); they compare the
ones that matter at connect time. Each writes its own run folder under ``--out``: ``client/`` and
``server/``. Both must hold the same secret (``--secret-file PATH`` or ``HOSL_SECRET``); ``hosl
serve`` without one generates it into ``OUT/server/secret`` and says how to pass it to the client.

Fleets (``--clients N``, docs/fleet.md): ``hosl serve --clients N`` is rank 0 and hosts the
rendezvous; each client is ``hosl train --role client --clients N --rank R`` (R in 1..N) and writes
``OUT/clientR``; under torchrun ``--role auto`` makes rank 0 the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hosl import cli_options
from hosl.cli_options import config_from

ROLES = ("local", "client", "server", "auto")


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "two-process runs (default: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them)"
    )
    g.add_argument(
        "--rank",
        type=int,
        default=None,
        help="two-process run: 0 or 1 (the client is usually 0); fleet (--clients N): the server is 0, "
        "the clients 1..N",
    )
    g.add_argument("--world-size", type=int, default=None, help="always 2 (a fleet does not use it)")
    g.add_argument("--master-addr", default=None, help="host of rank 0 (default 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None, help="rendezvous port on the master")
    g.add_argument(
        "--peer-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for any one answer of the other side before giving up (default %(default)s)",
    )
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="seconds for the start: the other side loading its model, the rendezvous, the proof of the "
        "secret; a taken port or an absent peer ends after it (default %(default)s)",
    )
    g.add_argument(
        "--dist-backend",
        default=None,
        choices=("gloo", "nccl"),
        help="torch.distributed backend (default: nccl when CUDA is available, else gloo)",
    )
    g.add_argument(
        "--secret-file",
        default=None,
        metavar="PATH",
        help="file holding the secret both sides share (default: the HOSL_SECRET environment variable; "
        "hosl serve without either generates one in OUT/server/secret, mode 0600)",
    )
    g.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt every message's payloads (ChaCha20-Poly1305) as well as authenticating it (every "
        "message always carries a MAC); both sides must pass it (docs/transport.md)",
    )


def add_fleet_args(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("fleets: one server, many clients (docs/fleet.md)")
    g.add_argument(
        "--clients",
        type=int,
        default=d.clients,
        metavar="N",
        help="hosl serve: serve a fleet of N hosl clients (ranks 1..N; the server is rank 0 and hosts "
        "the rendezvous); each client: hosl train --role client --clients N --rank R "
        "(default 0: one client, the two-process run)",
    )
    g.add_argument(
        "--client-sync",
        default=d.client_sync,
        choices=("shared", "local"),
        help="shared: one client model, every client applies every client's update each step, so all "
        "hold the same bits; local: each client keeps its own client half (default %(default)s)",
    )
    g.add_argument(
        "--shard",
        default=d.shard,
        metavar="iid|dirichlet:ALPHA|by-file",
        help="which training examples each fleet client sees: a round-robin deal of a seeded "
        "permutation, label skew drawn from Dirichlet(ALPHA), or each client's own --train-file "
        "(default %(default)s)",
    )
    g.add_argument(
        "--wire",
        default=d.wire,
        choices=("native", "float32", "bfloat16", "float16", "delta8"),
        help="how activations travel up: as computed, cast to a float format, or delta8 (the perturbed "
        "copies as int8 differences from the clean activation, per-row scaled); docs/transport.md "
        "(default %(default)s)",
    )


def add_server_procs_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a server half over several processes (docs/fleet.md)")
    g.add_argument(
        "--server-procs",
        type=int,
        default=1,
        metavar="P",
        help="run the server half as P processes on this machine (hosl train: this one is rank 0 and "
        "spawns the others; hosl serve, for one client or a fleet: it spawns all P and relays to rank "
        "0); each computes on its share of every batch's rows (default %(default)s)",
    )
    g.add_argument(
        "--server-parallel",
        default="ddp",
        choices=("ddp", "fsdp"),
        help="with --server-procs > 1: ddp, a replica of the server half per process "
        "(DistributedDataParallel), or fsdp, its parameters sharded (FSDP2 fully_shard; hosl serve "
        "only; a run begun with fsdp writes sharded checkpoints, each rank its shards with "
        "torch.distributed.checkpoint, which resume at any P and hosl export reads) (default %(default)s)",
    )


def add_role_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--role",
        default="local",
        choices=ROLES,
        help="local: both halves here (default); client/server: one half of a two-process run; "
        "auto: client on rank 0, server on rank 1 (for torchrun)",
    )


def register(sub, add_train_args, defaults) -> None:
    """Add ``hosl serve`` (the training arguments plus the connection ones)."""
    p = sub.add_parser("serve", help="run the server half of a two-process run (see also train --role client)")
    add_train_args(p, defaults)
    add_connection_args(p)
    add_server_procs_args(p)
    p.set_defaults(func=cmd_serve, role="server")


def _connection(args, role: str):
    from dataclasses import fields

    from hosl.training.remote import Connection
    from hosl.transport.auth import SECRET_ENV, load_secret

    for name in ("peer_timeout", "connect_timeout"):
        value = getattr(args, name)
        if not (0 < value < float("inf")):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
    found = load_secret(args.secret_file)
    if found is None and args.role == "auto":
        raise ValueError(
            f"--role auto (torchrun) needs the same secret on both ranks: set {SECRET_ENV} (e.g. "
            f"{SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))') torchrun ...) "
            f"or pass --secret-file"
        )
    if found is not None:
        print(f"[hosl] {role}: using the shared secret from {found[1]}", file=sys.stderr, flush=True)
    # every other field of Connection is the flag of its name (--rank: rank, --peer-timeout: peer_timeout)
    same_name = {f.name: getattr(args, f.name) for f in fields(Connection) if f.name not in ("backend", "secret")}
    return Connection(backend=args.dist_backend, secret=found[0] if found else None, **same_name)


def resolve_role(args) -> str:
    if args.role != "auto":
        return args.role
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "-1"))
    if getattr(args, "clients", 0):  # a fleet under torchrun: rank 0 serves, ranks 1..N are its clients
        if not 0 <= rank <= args.clients:
            raise ValueError(f"--role auto with --clients {args.clients} needs RANK in 0..{args.clients}, got {rank}")
        if args.rank is None:
            args.rank = rank
        return "server" if rank == 0 else "client"
    if rank not in (0, 1):
        raise ValueError("--role auto needs --rank or RANK (as torchrun sets) to be 0 (client) or 1 (server)")
    return "client" if rank == 0 else "server"


def cmd_serve(args) -> int:
    cfg = config_from(args)
    if cfg.clients:
        from hosl.training.fleet_server import run_fleet_server

        if args.rank not in (None, 0):
            raise ValueError(f"the server of a fleet is rank 0, got --rank {args.rank}")
        return run_fleet_server(cfg, _connection(args, "server"), args.server_procs, args.server_parallel)
    from hosl.training.remote import run_server

    return run_server(cfg, _connection(args, "server"), args.server_procs, args.server_parallel)


def cmd_train_remote(args) -> int:
    """``hosl train --role client|server|auto``."""
    from hosl.training.remote import run_client, run_server

    role = resolve_role(args)
    cfg = config_from(args)
    # under torchrun (--role auto) every process gets the same arguments: the server's rank takes
    # --server-procs, the clients' ranks leave it
    if role == "client" and args.role != "auto" and args.server_procs != 1:
        raise ValueError(
            f"--server-procs {args.server_procs} belongs to the server (hosl serve --server-procs); "
            "a client process holds no server half"
        )
    if cfg.clients and role == "server":
        return cmd_serve(args)
    if role == "server":
        return run_server(cfg, _connection(args, "server"), args.server_procs, args.server_parallel)
    if cfg.clients:
        from hosl.training.fleet_client import run_fleet_client

        summary = run_fleet_client(cfg, _connection(args, "client"))
    else:
        summary = run_client(cfg, _connection(args, "client"))
    print(json.dumps(cli_options.summary_lines(summary, ("bytes_up_per_step", "bytes_down_per_step")), indent=2))
    return 0
