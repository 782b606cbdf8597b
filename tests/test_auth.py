"""Who may join a two-process run: the shared secret, strangers, impostors, wrong secrets, taken
ports and Ctrl-C, with real processes on 127.0.0.1 (hosl/transport/auth.py, docs/transport.md)."""

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hosl.transport import ConnectError, InProcessLink, Kind, Message, PeerProtocolError
from hosl.transport.auth import load_secret, proof, proof_ok, run_id_of, write_secret_file
from hosl.transport.distributed import open_store
from hosl.transport.wire import HEADER_LEN, MAGIC, check_header

ROOT = Path(__file__).resolve().parents[1]
SECRET = "0123456789abcdef-test-secret"

# A hosl transport peer: connect with a secret, confirm the channel, compare configurations,
# then the client (rank 0) sends one "label" tensor that the server prints (GOT ...).
PEER = textwrap.dedent('''
    import sys, torch
    from hosl.transport import Kind, Message
    from hosl.transport.auth import confirm_channel
    from hosl.transport.distributed import Endpoint, connect, disconnect, handshake
    rank, port, secret, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
    try:
        run_id = connect(secret=secret, rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port,
                         timeout_s=timeout)
        ep = Endpoint("server" if rank == 0 else "client", timeout_s=30)
        confirm_channel(ep, secret, run_id, 30)
        handshake(ep, "client" if rank == 0 else "server", {"cut": 1}, 30)
        if rank == 0:
            ep.send(Message(Kind.REQUEST, 1, 1, tensors=[torch.tensor([7, 7])]), "the labels")
        else:
            print("GOT", ep.recv("waiting for the labels").tensors[0].tolist(), flush=True)
        print("OK", flush=True)
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    finally:
        disconnect()
''')

# The attack of issue 20: plain torch.distributed, joining the client's port as rank 1 and waiting
# for the first message (activations and labels, before authentication existed).
STRANGER = textwrap.dedent('''
    import datetime, os, sys, torch, torch.distributed as dist
    port, marker = sys.argv[1], sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    open(marker, "w").close()  # imports done: the client may start
    try:
        dist.init_process_group("gloo", init_method="env://", rank=1, world_size=2,
                                timeout=datetime.timedelta(seconds=40))
        header = torch.empty(8, dtype=torch.int64)
        dist.recv(header, 0, tag=0)
        print("RECEIVED", header.tolist(), flush=True)
    except Exception as exc:
        print("STRANGER GOT NOTHING:", type(exc).__name__, flush=True)
''')

# A rank 0 that does not hold the secret but pretends it accepted the server's proof.
IMPOSTOR_HOST = textwrap.dedent('''
    import datetime, os, sys, time, torch.distributed as dist
    port = int(sys.argv[1])
    store = dist.TCPStore("127.0.0.1", port, 2, True, datetime.timedelta(seconds=60), wait_for_workers=False)
    keys = "hosl/auth/v1/0/"
    store.set(keys + "challenge", os.urandom(32))
    store.wait([keys + "response"], datetime.timedelta(seconds=60))
    store.set(keys + "verdict", b"ok" + os.urandom(32))  # a made-up proof
    store.wait([keys + "joiner-verdict"], datetime.timedelta(seconds=60))
    print("VERDICT", store.get(keys + "joiner-verdict").decode(), flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HOSL_SECRET"}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _spawn(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=kw.pop("env", _env()), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += "\n<killed: did not end in time>"
    return proc.returncode, out


def _wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


# -- the secret and the proofs (no processes) --------------------------------------------------------
def test_proofs_depend_on_the_secret_both_nonces_and_the_side():
    s, n0, n1 = b"s" * 20, os.urandom(32), os.urandom(32)
    tag = proof(s, b"joiner", n0, n1)
    assert proof_ok(s, b"joiner", (n0, n1), tag)
    assert not proof_ok(b"t" * 20, b"joiner", (n0, n1), tag)  # wrong secret
    assert not proof_ok(s, b"host", (n0, n1), tag)  # one side's proof is no answer for the other's
    assert not proof_ok(s, b"joiner", (os.urandom(32), n1), tag)  # a replay against a fresh challenge
    assert not proof_ok(s, b"joiner", (n0, n1), tag[:-1])
    assert run_id_of(s, n0, n1) != run_id_of(s, n0, os.urandom(32))


def test_secret_from_file_or_environment_with_clear_errors(tmp_path):
    path = tmp_path / "secret"
    written = write_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(written) == 64
    assert load_secret(str(path), environ={"HOSL_SECRET": "x" * 20}) == (written, f"--secret-file {path}")
    assert load_secret(None, environ={"HOSL_SECRET": " y" * 10 + "\n"})[0] == (" y" * 10).strip().encode()
    assert load_secret(None, environ={}) is None
    with pytest.raises(ValueError, match="no such file"):
        load_secret(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="HOSL_SECRET: the secret is 5 bytes; use at least 16"):
        load_secret(None, environ={"HOSL_SECRET": "short"})


def test_a_client_without_a_secret_is_refused_before_loading_anything(tmp_path, monkeypatch, capsys):
    from hosl.cli import main

    monkeypatch.delenv("HOSL_SECRET", raising=False)
    base = ["--model", "tiny-opt", "--mode", "hosl", "--out", str(tmp_path / "run"), "--master-port", "1"]
    assert main(["train", "--role", "client", "--rank", "0", *base]) == 2
    assert "--secret-file" in capsys.readouterr().err
    assert main(["train", "--role", "auto", "--rank", "1", *base]) == 2
    assert "--role auto (torchrun) needs the same secret on both ranks" in capsys.readouterr().err
    assert main(["serve", "--rank", "1", *base, "--connect-timeout", "inf"]) == 2
    assert "--connect-timeout must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_connection_carries_every_connection_flag(tmp_path, monkeypatch):
    from hosl.cli import build_parser
    from hosl.cli_remote import _connection

    monkeypatch.delenv("HOSL_SECRET", raising=False)
    (tmp_path / "secret").write_text("ab" * 32)
    args = build_parser().parse_args(
        ["serve", "--rank", "1", "--world-size", "2", "--master-addr", "10.0.0.2", "--master-port", "4321",
         "--peer-timeout", "7", "--connect-timeout", "8", "--dist-backend", "gloo", "--encrypt",
         "--secret-file", str(tmp_path / "secret")]
    )
    conn = _connection(args, "server")
    assert (conn.rank, conn.world_size, conn.master_addr, conn.master_port) == (1, 2, "10.0.0.2", 4321)
    assert (conn.peer_timeout, conn.connect_timeout, conn.backend, conn.encrypt) == (7, 8, "gloo", True)
    assert conn.secret == load_secret(str(tmp_path / "secret"))[0]

# -- malformed messages (no processes) -------------------------------------------------------------
def test_a_reply_without_the_fields_a_phase_needs_names_the_peer_and_the_phase():
    from hosl.training.protocol import PHASE_NAMES
    from hosl.training.server_proxy import ServerProxy

    proxy = ServerProxy(InProcessLink(lambda req: Message(Kind.REPLY, req.phase, req.step), PHASE_NAMES), "causal_lm")
    proxy.step = 3
    with pytest.raises(PeerProtocolError, match=r"the server answered phase 'clean-loss' of step 3 with 0 floats"):
        proxy.clean_loss(torch.zeros(2, 4, 8))
    with pytest.raises(PeerProtocolError, match="phase 'backprop'"):
        proxy.backprop(torch.zeros(2, 4, 8))


def test_malformed_headers_are_named():
    good = [MAGIC, int(Kind.REPLY), 1, 1, 0, 1, 0, 0]
    assert len(good) == HEADER_LEN and check_header(good) is None
    assert "not a hosl message" in check_header([0, *good[1:]])
    assert "unknown kind 99" in check_header([MAGIC, 99, *good[2:]])
    assert "-1 floats" in check_header([*good[:5], -1, 0, 0])


# -- bounded waits on a taken port (in this process) -------------------------------------------------
def test_a_taken_port_ends_within_the_timeout_naming_the_port_and_the_cause():
    with socket.socket() as holder:  # another program holds the port: it accepts and never answers
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConnectError, match=rf"on port {port}: the port is already in use"):  # rank 0 cannot host it
            open_store("127.0.0.1", port, 0, time.monotonic() + 5, 5)
        with pytest.raises(ConnectError, match=rf"127.0.0.1:{port} within 2 s: something listens on port {port} "
                                               "but does not answer as a torch.distributed store"):
            open_store("127.0.0.1", port, 1, time.monotonic() + 2, 2)  # used to hang for minutes


# -- real processes (the accepted case, same connect() and channel check: tests/test_transport.py) ------
@pytest.mark.slow
def test_a_wrong_secret_is_refused_on_both_sides_and_nothing_is_sent():
    port = _free_port()
    server = _spawn(["-c", PEER, "1", str(port), SECRET, "90"])
    client = _spawn(["-c", PEER, "0", str(port), SECRET + "-but-another", "90"])
    (rc0, out0), (rc1, out1) = _finish(client), _finish(server)
    assert rc0 == 3 and "AuthError: refused the process that joined the rendezvous" in out0, out0
    assert f"127.0.0.1:{port}" in out0 and "did not prove the shared secret" in out0
    assert rc1 == 3 and "AuthError: the client on" in out1 and "hold different secrets" in out1, out1
    assert "GOT" not in out1


@pytest.mark.slow
def test_an_impostor_client_that_fakes_its_proof_is_refused_by_the_server():
    port = _free_port()
    impostor = _spawn(["-c", IMPOSTOR_HOST, str(port)])
    server = _spawn(["-c", PEER, "1", str(port), SECRET, "90"])
    (rc1, out1), (_, out_imp) = _finish(server), _finish(impostor)
    assert rc1 == 3 and "AuthError: refused the process on" in out1 and "(rank 0)" in out1, out1
    assert "VERDICT refused" in out_imp, out_imp


@pytest.mark.slow
def test_a_stranger_speaking_plain_torch_distributed_gets_nothing(tmp_path):
    port, marker = _free_port(), tmp_path / "stranger-ready"
    stranger = _spawn(["-c", STRANGER, str(port), str(marker)])
    _wait_for(marker.exists, "the stranger's start")
    client = _spawn(["-c", PEER, "0", str(port), SECRET, "8"])
    (rc0, out0), (_, out_s) = _finish(client), _finish(stranger, 90)
    assert rc0 == 3 and "ConnectError: waiting for a server to join the rendezvous and prove the shared secret" in out0
    assert f"on 127.0.0.1:{port}: nothing came within 8 s (--connect-timeout)" in out0, out0
    assert "RECEIVED" not in out_s, out_s


# -- the command line: an impostor `hosl serve`, and Ctrl-C ---------------------------------------------
def _hosl_args(out, port, connect_timeout):
    return ["--model", "tiny-opt", "--task", "sst2", "--mode", "hosl", "--cut", "1", "--steps", "2",
            "--batch-size", "2", "--train-size", "8", "--eval-size", "4", "--max-length", "32", "--no-progress",
            "--out", str(out), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--connect-timeout", str(connect_timeout)]


@pytest.mark.slow
def test_an_impostor_hosl_serve_started_first_is_refused_on_both_sides(tmp_path):
    """The impostor is a real `hosl serve` without the secret (so it generates its own); the client
    is the transport peer above holding the run's secret (the same connect() as `hosl train
    --role client`, without loading a dataset)."""
    port = _free_port()
    impostor = _spawn(["-m", "hosl", "serve", "--rank", "1", *_hosl_args(tmp_path / "imp", port, 180)])
    _wait_for(lambda: (tmp_path / "imp" / "server" / "secret").exists(), "the impostor's start", 180)
    client = _spawn(["-c", PEER, "0", str(port), SECRET, "180"])
    (rc_c, out_c), (rc_i, out_i) = _finish(client, 240), _finish(impostor, 60)
    assert rc_c == 3 and "AuthError: refused the process that joined the rendezvous" in out_c, out_c
    assert rc_i == 2 and "hosl: error: the client on" in out_i and "hold different secrets" in out_i, out_i
    secret_file = tmp_path / "imp" / "server" / "secret"  # no secret given: generated, owner-only, and said so
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and f"--secret-file {secret_file}" in out_i
    assert SECRET not in secret_file.read_text()


@pytest.mark.slow
def test_ctrl_c_while_waiting_on_a_taken_port_exits_130(tmp_path):
    with socket.socket() as holder:  # the port is held by a program that never answers
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        log = tmp_path / "serve.log"
        with log.open("w") as f:
            server = subprocess.Popen([sys.executable, "-m", "hosl", "serve", "--rank", "1",
                                       *_hosl_args(tmp_path / "run", port, 600)], cwd=ROOT,
                                      env=_env(HOSL_SECRET=SECRET), stdout=f, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: "waiting for the client" in log.read_text(), "serve reaching the rendezvous", 180)
            time.sleep(1.0)  # inside the wait on the port
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=60) == 130, log.read_text()
        finally:
            if server.poll() is None:
                server.kill()
