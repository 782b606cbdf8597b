"""hosl.transport with two real processes on 127.0.0.1: messages, bytes, handshake, dead and silent peers."""

import socket
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hosl.transport import InProcessLink, Kind, Message, message_nbytes
from hosl.transport.wire import from_int64, to_int64

ROOT = Path(__file__).resolve().parents[1]

PEER = textwrap.dedent('''
    import json, os, sys, time, torch
    from hosl.transport import Kind, Message
    from hosl.transport.auth import confirm_channel
    from hosl.transport.distributed import DistributedLink, Endpoint, connect, disconnect, handshake, serve
    rank, port, scenario, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    secret = b"a test secret of enough bytes"
    run_id = connect(secret=secret, rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, timeout_s=60)
    ep = Endpoint("server" if rank == 0 else "client", timeout_s=float(os.environ.get("PEER_TIMEOUT", "20")))
    confirm_channel(ep, secret, run_id, 30)
    fields = {"model": "tiny-opt", "cut": 1, "eps": 1e-3}
    if scenario == "mismatch" and rank == 1:
        fields["cut"] = 2
    try:
        handshake(ep, "client" if rank == 0 else "server", fields, 30)
        if rank == 1 and scenario == "garbage":  # answer the first request with a header that is not hosl's
            ep.recv("waiting for the request")
            torch.distributed.send(torch.arange(8, dtype=torch.int64), 0, tag=0)
            time.sleep(2)
        elif rank == 1 and scenario == "idle":  # Ctrl-C (SIGINT) while no request comes
            import signal
            flag = []
            signal.signal(signal.SIGINT, lambda *a: flag.append(1))
            try:
                serve(ep, lambda req: Message(Kind.REPLY, req.phase, req.step), stop_requested=lambda: bool(flag))
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
                sys.exit(130)
        elif rank == 1:
            def handle(req):
                if scenario == "die" and req.phase == 7:
                    os._exit(9)
                if scenario == "silent" and req.phase == 7:
                    time.sleep(60)
                return Message(Kind.REPLY, req.phase, req.step, req.ints, [2 * f for f in req.floats],
                               [t.clone() for t in req.tensors])
            code = serve(ep, handle, phase_names={7: "seven"})
            result = {"code": code}
        else:
            link = DistributedLink(ep, {7: "seven"})
            tensors = [torch.randn(3, 5), torch.randn(2, 4).bfloat16(), torch.tensor([True, False, True]),
                       torch.arange(6).view(2, 3), torch.empty(0, 4), torch.tensor(3.5, dtype=torch.float64)]
            ints = [0, -5, 2**62, -(2**63)]
            reply = link.call(3, 11, ints=ints, floats=[0.1, -2.5], tensors=tensors)
            torch.save({"sent": tensors, "got": reply.tensors, "ints": reply.ints, "floats": reply.floats,
                        "phase": reply.phase, "step": reply.step,
                        "bytes": [link.bytes_up, link.bytes_down]}, out)
            if scenario == "idle":  # the server is interrupted meanwhile; then ask again
                while not os.path.exists(out + ".go"):
                    time.sleep(0.1)
            if scenario in ("die", "silent", "idle"):
                link.call(7, 12, tensors=[torch.ones(4)])
            link.close()
            result = {}
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    finally:
        disconnect()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(tmp_path, scenario, peer_timeout="20", timeout=60, server_wait=15):
    port = _free_port()
    out = tmp_path / "reply.pt"
    env = {"PEER_TIMEOUT": peer_timeout, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", PEER, str(rank), str(port), scenario, str(out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    results = []
    for p, wait_s in zip(procs, (timeout, server_wait)):  # a server that hangs on purpose is killed after the client
        try:
            stdout, _ = p.communicate(timeout=wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        results.append((p.returncode, stdout))
    return results, out


def test_messages_round_trip_bit_exact_and_bytes_are_counted(tmp_path):
    (rc0, out0), (rc1, out1) = _pair(tmp_path, "echo")[0]
    assert rc0 == 0 and rc1 == 0, out0 + out1
    data = torch.load(tmp_path / "reply.pt")
    assert data["phase"] == 3 and data["step"] == 11
    assert data["ints"] == [0, -5, 2**62, -(2**63)] and data["floats"] == [0.2, -5.0]
    for sent, got in zip(data["sent"], data["got"], strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                           sent.view(-1).view(torch.uint8) if sent.numel() else sent)
    request = Message(Kind.REQUEST, 3, 11, [0] * 4, [0.0] * 2, data["sent"])
    assert data["bytes"] == [message_nbytes(request), message_nbytes(request)]


def test_in_process_link_counts_the_same_bytes_without_copying():
    h = torch.randn(4, 7, 32)
    seen = []

    def handle(req):
        seen.append(req.tensors[0])
        return Message(Kind.REPLY, req.phase, req.step, floats=[1.0, 2.0])

    link = InProcessLink(handle)
    link.call(2, 1, ints=[to_int64(2**64 - 1)], tensors=[h])
    assert seen[0] is h  # direct call
    assert link.bytes_up == 64 + 8 + 80 + h.numel() * 4 and link.bytes_down == 64 + 16
    assert from_int64(to_int64(2**64 - 1)) == 2**64 - 1


def test_mismatched_configuration_is_refused_on_both_sides(tmp_path):
    (rc0, out0), (rc1, out1) = _pair(tmp_path, "mismatch")[0]
    assert rc0 == 3 and rc1 == 3
    assert "ConfigMismatchError" in out0 and "cut is 1 here and 2 there" in out0 and "server (rank 1)" in out0
    assert "cut is 2 here and 1 there" in out1 and "client (rank 0)" in out1


def test_a_malformed_reply_is_one_line_naming_the_peer_and_the_phase(tmp_path):
    (rc0, out0), (rc1, out1) = _pair(tmp_path, "garbage")[0]
    assert rc0 == 3 and rc1 == 0, out0 + out1
    # after the channel check every message is authenticated: one that is not hosl's is refused as tampered
    assert "TamperedMessageError: refused a message from the server (rank 1)" in out0
    assert "something that is not a hosl message (bad magic number)" in out0
    assert "phase 'phase 3' of step 11" in out0 and "Traceback" not in out0


@pytest.mark.parametrize("scenario,peer_timeout", [("die", "20"), ("silent", "2")])
@pytest.mark.slow
def test_a_dead_or_silent_server_is_reported_with_the_phase(tmp_path, scenario, peer_timeout):
    (rc0, out0), (rc1, _) = _pair(tmp_path, scenario, peer_timeout=peer_timeout, timeout=40,
                                    server_wait=1 if scenario == "silent" else 15)[0]
    assert rc0 == 3, out0
    assert "PeerLostError" in out0 and "server (rank 1)" in out0 and "phase 'seven' of step 12" in out0
    assert ("within 2 s" in out0) if scenario == "silent" else ("connection closed" in out0)


@pytest.mark.slow
def test_ctrl_c_on_an_idle_server_ends_it_with_130_and_the_client_is_told(tmp_path):
    port, out = _free_port(), tmp_path / "reply.pt"
    env = {"PEER_TIMEOUT": "20", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    client, server = (subprocess.Popen([sys.executable, "-c", PEER, str(rank), str(port), "idle", str(out)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                      for rank in (0, 1))
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:  # the first exchange is done; the server idles
            assert client.poll() is None and server.poll() is None
            time.sleep(0.1)
        server.send_signal(signal.SIGINT)
        out_s, _ = server.communicate(timeout=60)
        assert server.returncode == 130 and "INTERRUPTED" in out_s, out_s
        Path(str(out) + ".go").touch()
        out_c, _ = client.communicate(timeout=60)
        # the server is gone: the client reads its notice, or finds the connection closed; either way one
        # line naming the server and the phase it asked for
        assert client.returncode == 3 and "the server (rank 1)" in out_c and "phase 'seven' of step 12" in out_c, out_c
        assert "shut down (interrupted)" in out_c or "connection closed" in out_c, out_c
    finally:
        for p in (client, server):
            if p.poll() is None:
                p.kill()
