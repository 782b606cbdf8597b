"""The two roles of a two-process run: the client (data, client half, the training loop) and the
server (server half, its optimizer, the labels' loss), talking over ``hosl.transport``.

Each side writes its own run folder: ``OUT/client`` and ``OUT/server`` (so both can share one
``--out``, as they do under ``torchrun``). Order of events on each side: load the model (both
build the same weights from the same arguments), rendezvous, prove the shared secret both ways
(``hosl/transport/auth.py``), compare configurations, then the client drives the conversation
(``hosl/training/protocol.py``) and the server answers until the client says goodbye.

Faults: a dead or silent peer ends this side within ``peer_timeout`` with a ``PeerLostError``
naming the peer and the phase (the CLI exits with status 2). The first Ctrl-C asks for a clean
stop: the client finishes the exchange in flight and sends a shutdown notice; the server answers
the next request with one; before the two are connected, the first Ctrl-C stops at once. Exit
status 130.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from hosl.training import checkpoint as ckpt
from hosl.training.config import TrainConfig
from hosl.training.loop import run_loop
from hosl.training.modes import SPLIT_MODES
from hosl.training.protocol import PHASE_NAMES, SPLIT_PROTOCOL_VERSION
from hosl.training.run import RunExistsError, build_run, load_server_model, say, server_handler
from hosl.training.run_folder import RunFolderError, compare
from hosl.training.server_handler import ServerHandler
from hosl.transport import SECRET_ENV, ShutdownCode
from hosl.transport.auth import confirm_channel, write_secret_file
from hosl.transport.distributed import DistributedLink, Endpoint, Version, connect, disconnect, handshake, serve

# What both sides must agree on: these run settings, and the ZO options whose ZOConfig field says
# ``agree`` (hosl/optim/config.py: lr_client, eps, weight_decay, seed, direction, zo_optimizer,
# zo_momentum, zo_betas, ...). Fields that only the client uses (steps, data sizes, Q, ...) are not
# compared: the server follows whatever the client sends. ``client_params`` shapes the client alone
# but is compared, so that every client of a fleet (each checked against the server) applies the
# relayed updates to the same trainable coordinates.
FINGERPRINT_FIELDS = (
    "model",
    "task",
    "mode",
    "cut",
    "dtype",
    "lr_server",
    "momentum",
    "dropout",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "lora_halves",
    "client_params",
    "server_optimizer",
    "lr_schedule",
    "warmup_steps",
    "clients",
    "client_sync",
    "wire",
)


@dataclass
class Connection:
    rank: int | None = None  # None: from the environment (torchrun)
    world_size: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    peer_timeout: float = 30.0  # longest wait for any one answer once running
    connect_timeout: float = 300.0  # rendezvous, handshake and the first request (the peer may be loading)
    backend: str | None = None  # gloo | nccl (default: nccl when CUDA is available)
    secret: bytes | None = field(default=None, repr=False)  # shared by both sides; see hosl/transport/auth.py
    encrypt: bool = False  # --encrypt: payloads encrypted too (hosl/transport/session.py); both sides alike

    def addr(self) -> str:
        """The rendezvous host: --master-addr, else MASTER_ADDR (torchrun), else 127.0.0.1."""
        return self.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"

    def port(self) -> int:
        """The rendezvous port: --master-port, else MASTER_PORT (torchrun)."""
        port = self.master_port or (int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None)
        if port is None or not 0 < port < 65536:
            raise ValueError(f"need --master-port between 1 and 65535 (or MASTER_PORT, as torchrun sets), got {port}")
        return port

    def where(self) -> str:
        return f"{self.addr()}:{self.master_port or os.environ.get('MASTER_PORT', '?')}"

    def connect(self, stop_requested) -> str:
        """Rendezvous and prove the secret (both ways); returns the run id."""
        return connect(
            secret=self.secret,  # type: ignore[arg-type]  # the CLI always sets one
            rank=self.rank,
            world_size=self.world_size,
            master_addr=self.master_addr,
            master_port=self.master_port,
            timeout_s=self.connect_timeout,
            backend=self.backend,
            stop_requested=stop_requested,
        )


def fingerprint(cfg: TrainConfig) -> dict:
    """The settings both processes must share, as the scalars the handshake compares; first the
    split protocol's version (a peer speaking another is refused before any setting is compared)."""
    values: dict = {"split protocol": Version(SPLIT_PROTOCOL_VERSION)}
    values.update({name: getattr(cfg, name) for name in FINGERPRINT_FIELDS})
    values["lora_alpha"] = float(cfg.lora_alpha)
    values["lora_targets"] = ",".join(cfg.lora_target_list() or ())  # "" : the architecture's default
    values["client_params"] = ",".join(cfg.client_param_patterns() or ())  # "": every client parameter
    values.update(cfg.zo_config().fingerprint())  # lr_client and eps resolved; zo_betas as zo_betas[0], [1]
    return values


class StopOnInterrupt:
    """Once connected (``connected = True``), the first SIGINT sets a flag (stop cleanly at the next
    exchange) and a second one interrupts. Before that (loading, connecting) there is no exchange
    to finish, so the first one interrupts at once."""

    def __init__(self, role: str):
        self.role = role
        self.flag = False
        self.connected = False
        self._previous = None

    def requested(self) -> bool:
        return self.flag

    def _handler(self, signum, frame):
        if self.flag or not self.connected:
            raise KeyboardInterrupt
        self.flag = True
        say(f"{self.role}: interrupted; stopping both sides at the next exchange (Ctrl-C again to abort now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def open_channel(
    role: str, peer: str, cfg: TrainConfig, conn: Connection, stop: StopOnInterrupt, detail: str = ""
) -> Endpoint:
    """Either side's way in: rendezvous with ``peer``, prove the shared secret over the new channel
    and compare configurations; then the run counts as connected (``stop.connected``). ``detail``
    ends the "connected" line."""
    say(f"{role}: waiting for the {peer} on {conn.where()} (up to {conn.connect_timeout:g} s)")
    run_id = conn.connect(stop.requested)
    endpoint = Endpoint(peer, conn.peer_timeout)
    confirm_channel(endpoint, conn.secret, run_id, conn.connect_timeout, encrypt=conn.encrypt)  # type: ignore[arg-type]  # the CLI always sets one
    handshake(endpoint, role, fingerprint(cfg), conn.connect_timeout)
    say(f"{role}: connected to the {endpoint.peer_name}{detail}")
    stop.connected = True
    return endpoint


def check_split_mode(cfg: TrainConfig) -> None:
    cfg.validate()
    if cfg.mode not in SPLIT_MODES:
        raise ValueError(
            f"--mode {cfg.mode} trains the unsplit model; only {', '.join(SPLIT_MODES)} run as client and server"
        )


def run_client(cfg: TrainConfig, conn: Connection) -> dict:
    """The client half: the run (validated here, once) built with a link to the server process,
    then the training loop; returns the run's summary."""
    check_split_mode(cfg)
    if not conn.secret:
        raise ValueError(
            f"the client needs the server's shared secret: pass --secret-file PATH (the file `hosl serve` "
            f"wrote, e.g. OUT/server/secret, copied over a secure channel) or set {SECRET_ENV}"
        )
    cfg = replace(cfg, out=str(Path(cfg.out) / "client"))
    stop = StopOnInterrupt("client")
    links: list[DistributedLink] = []

    def connect_server() -> DistributedLink:
        endpoint = open_channel("client", "server", cfg, conn, stop)
        links.append(DistributedLink(endpoint, PHASE_NAMES, stop.requested))
        return links[0]

    with stop:
        try:
            with goodbye_on_exit(links):
                return run_loop(build_run(cfg, connect_server=connect_server))
        finally:
            disconnect()


@contextlib.contextmanager
def goodbye_on_exit(links: list):
    """Around a client's run: say goodbye to the server over ``links[0]`` (once connected) with why
    the run ended: done, interrupted, or failed (a no-op when the server is the one that failed)."""
    try:
        yield
    except KeyboardInterrupt:
        if links:
            links[0].close(ShutdownCode.INTERRUPTED)
        raise
    except Exception:
        if links:
            links[0].close(ShutdownCode.FAILED)
        raise
    if links:
        links[0].close(ShutdownCode.DONE)


def write_or_check_server_config(run_dir: Path, cfg: TrainConfig) -> None:
    """A fresh server run writes its config.json; a resumed one compares its settings with the saved
    ones (as the client's resume does) and never rewrites the file."""
    path = run_dir / "config.json"
    if cfg.resume and path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise RunFolderError(f"{path} is not JSON; the server run cannot be checked for --resume") from None
        compare(saved, replace(cfg, out=str(run_dir)))
        return
    path.write_text(json.dumps(cfg.to_dict(), indent=2))


def start_server_process(
    cfg: TrainConfig, conn: Connection, clients: str, load_half: bool = True
) -> tuple[Connection, Path, ServerHandler | None]:
    """What a server process does before it connects: check the mode and its run folder
    (``OUT/server``), generate a secret if none was given (telling ``clients`` how to get it), load
    the server half (unless not ``load_half``: other processes hold it). Returns the connection
    (with the secret), the run folder and the handler."""
    check_split_mode(cfg)
    run_dir = Path(cfg.out) / "server"
    if ckpt.list_checkpoints(run_dir) and not cfg.resume:
        raise RunExistsError(
            f"{run_dir} already holds a server run; pass --resume to continue it or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not conn.secret:
        secret_path = run_dir / "secret"
        conn = replace(conn, secret=write_secret_file(secret_path))
        say(
            f"server: no --secret-file or {SECRET_ENV} given: generated a shared secret in {secret_path} (mode 0600). "
            f"Start {clients} with --secret-file {secret_path} (copy the file over a secure channel, e.g. scp) "
            f'or {SECRET_ENV}="$(cat {secret_path})"'
        )
    if not load_half:
        return conn, run_dir, None
    model_kind, server = load_server_model(cfg)
    return conn, run_dir, server_handler(cfg, model_kind, server, checkpoint_dir=run_dir, resume_allowed=cfg.resume)


def run_server(cfg: TrainConfig, conn: Connection, server_procs: int = 1, server_parallel: str = "ddp") -> int:
    """The server half: answer the client until it says goodbye. Returns an exit status: 0 when
    the client finished, 130 when it was interrupted, 1 when it failed. ``server_procs`` > 1: the
    server half runs in that many spawned processes (``hosl/training/server_ranks.py``) and this one
    relays the client's requests to them."""
    from hosl.training.server_ranks import check_server_procs, relayed_server_ranks

    check_server_procs(cfg, server_procs, server_parallel, relayed=True)
    conn, run_dir, half = start_server_process(cfg, conn, "the client", load_half=server_procs == 1)
    write_or_check_server_config(run_dir, cfg)
    stop = StopOnInterrupt("server")
    ranks = (
        contextlib.nullcontext(half)
        if half is not None
        else relayed_server_ranks(
            cfg, server_procs, server_parallel, run_dir, conn.peer_timeout, conn.connect_timeout, conn.backend
        )
    )
    with stop, ranks as answerer:
        try:
            endpoint = open_channel(
                "server",
                "client",
                cfg,
                conn,
                stop,
                f"; serving {cfg.mode} on {cfg.model} (cut {cfg.cut})"
                + (f" over {server_procs} processes" if server_procs > 1 else ""),
            )
            code = serve(
                endpoint,
                answerer.handle,
                phase_names=PHASE_NAMES,
                stop_requested=stop.requested,
                first_timeout_s=conn.connect_timeout,
            )
        finally:
            disconnect()
    reason = {int(c): c.name.lower() for c in ShutdownCode}.get(code, str(code))
    say(f"server: the client said goodbye ({reason})")
    (run_dir / "summary.json").write_text(
        json.dumps({"role": "server", "mode": cfg.mode, "model": cfg.model, "client_shutdown": reason}, indent=2)
    )
    return {int(ShutdownCode.DONE): 0, int(ShutdownCode.INTERRUPTED): 130}.get(code, 1)
