"""Per-message authentication and encryption (hosl/transport/session.py): every message after the
channel check is sealed; altered, replayed, dropped or injected messages are refused unread.

The two sides here are real Endpoints over an in-memory loopback "process group" whose relay sees
(and may alter) every part on its way, as anything on the network path could."""

import collections
import datetime
import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from hosl.transport import ConfigMismatchError, Kind, Message, RemoteError
from hosl.transport.auth import AuthError, confirm_channel
from hosl.transport.distributed import DistributedLink, Endpoint, serve
from hosl.transport.link import PeerProtocolError
from hosl.transport.session import TAG_HEADER_TRAILER, TAG_TRAILER, Session, TamperedMessageError, derive_key

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"a test secret of enough bytes"
RUN_ID = "0123456789abcdef0123456789abcdef"


class _Done:
    def wait(self, timeout=None):
        return True


class Wire:
    """The loopback network: one queue per (from, to, tag); ``relay(rank, tag, data) -> data | None``
    sees every part sent (None drops it); ``log`` keeps what crossed."""

    def __init__(self):
        self.queues = collections.defaultdict(queue.Queue)
        self.relay = None
        self.log: list[tuple[int, int, bytes]] = []
        self._lock = threading.Lock()

    def queue(self, key) -> queue.Queue:
        """The queue of ``key``, made once: the two sides' threads may ask for a new key together."""
        with self._lock:
            return self.queues[key]


class LoopbackGroup:
    def __init__(self, wire: Wire, rank: int):
        self.wire, self.rank = wire, rank

    def send(self, tensors, peer, tag):
        data = tensors[0].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if self.wire.relay is not None:
            data = self.wire.relay(self.rank, tag, data)
        if data is not None:
            self.wire.log.append((self.rank, tag, data))
            self.wire.queue((self.rank, peer, tag)).put(data)
        return _Done()

    def recv(self, tensors, peer, tag):
        t, q = tensors[0], self.wire.queue((peer, self.rank, tag))

        class Work:
            def wait(self, timeout=None):
                seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else 5.0
                try:
                    data = q.get(timeout=seconds)
                except queue.Empty:
                    raise TimeoutError("Timed out") from None
                t.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

        return Work()


def _pair(encrypt=(False, False), relay=None) -> tuple[Endpoint, Endpoint, Wire]:
    """A client (rank 0, the host) and a server endpoint that passed the channel check."""
    wire = Wire()
    eps = [Endpoint(name, 5.0, "cpu", group=LoopbackGroup(wire, r), rank=r) for r, name in ((0, "server"), (1, "client"))]
    errors = {}

    def check(r):
        try:
            confirm_channel(eps[r], SECRET, RUN_ID, 5.0, encrypt=encrypt[r])
        except Exception as exc:  # handed to the test
            errors[r] = exc

    threads = [threading.Thread(target=check, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    if errors:
        raise errors.get(0) or errors[1]
    wire.relay = relay
    return eps[0], eps[1], wire


def _message(step=1, seed=0) -> Message:
    g = torch.Generator().manual_seed(seed)
    return Message(Kind.REQUEST, 3, step, ints=[step, -5], floats=[0.25 * step],
                   tensors=[torch.randn(4, 8, generator=g), torch.tensor([1, 0, 1, 1]),
                            torch.randn(2, 3, generator=g).bfloat16()])


def _same(a: Message, b: Message) -> None:
    assert (a.kind, a.phase, a.step, a.ints, a.floats) == (b.kind, b.phase, b.step, b.ints, b.floats)
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


# -- keys ------------------------------------------------------------------------------------------
def test_each_direction_connection_and_mode_has_a_key_of_its_own():
    n0, n1 = b"a" * 32, b"b" * 32
    keys = {derive_key(SECRET, RUN_ID, n0, n1, d, enc) for d in (b"host-to-joiner", b"joiner-to-host")
            for enc in (False, True)}
    keys |= {derive_key(SECRET, RUN_ID, n1, n0, b"host-to-joiner", False),
             derive_key(SECRET + b"x", RUN_ID, n0, n1, b"host-to-joiner", False)}
    assert len(keys) == 6 and all(len(k) == 32 for k in keys)


def test_hkdf_follows_rfc_5869():
    """The library's HKDF against the two steps of RFC 5869 written out with hmac."""
    import hashlib
    import hmac

    n0, n1 = b"\x01" * 32, b"\x02" * 32
    prk = hmac.new(n0 + n1, SECRET, hashlib.sha256).digest()
    info = b"|".join([b"hosl-session-v2", RUN_ID.encode(), b"joiner-to-host", b"mac-hmac-sha256"])
    okm = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    assert derive_key(SECRET, RUN_ID, n0, n1, b"joiner-to-host", False) == okm


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encrypt", [False, True])
def test_messages_round_trip_bit_exact_both_ways(encrypt):
    client, server, wire = _pair((encrypt, encrypt))
    assert client.session.encrypt is encrypt and server.session.encrypt is encrypt
    for step in range(3):
        sent = _message(step)
        client.send(sent, "a request")
        _same(server.recv("the request"), sent)
        server.send(sent, "a reply")
        _same(client.recv("the reply"), sent)
    trailers = [data for _rank, tag, data in wire.log if tag == TAG_TRAILER]
    assert len(trailers) == 6 and len({len(t) for t in trailers}) == 1


def test_encrypted_payloads_do_not_cross_in_the_clear_and_plain_ones_do():
    known = torch.arange(64, dtype=torch.float32) * 1.5  # a tensor whose bytes the test knows
    for encrypt in (False, True):
        client, server, wire = _pair((encrypt, encrypt))
        client.send(Message(Kind.REQUEST, 1, 1, ints=[123456789], tensors=[known]), "a request")
        assert torch.equal(server.recv("the request").tensors[0], known)
        crossed = b"".join(data for _rank, _tag, data in wire.log)
        assert (known.numpy().tobytes() in crossed) is (not encrypt)
        assert ((123456789).to_bytes(8, "little") in crossed) is (not encrypt)


def test_the_two_sides_must_agree_on_encrypt():
    with pytest.raises(ConfigMismatchError, match="--encrypt is (on|off) here and (off|on) there"):
        _pair((True, False))


def test_a_flipped_encrypt_flag_in_flight_fails_the_channel_proof():
    def relay(rank, tag, data):  # the client's first AUTH message: its ints part holds the encrypt flag
        return (1).to_bytes(8, "little") if rank == 0 and tag == 1 and data == (0).to_bytes(8, "little") else data

    wire_relay = relay
    wire = Wire()
    wire.relay = wire_relay
    eps = [Endpoint(n, 5.0, "cpu", group=LoopbackGroup(wire, r), rank=r) for r, n in ((0, "server"), (1, "client"))]
    errors = []
    threads = [threading.Thread(target=lambda r=r: _catch(errors, confirm_channel, eps[r], SECRET, RUN_ID, 30.0))
               for r in (0, 1)]  # a generous wait: a loaded machine must not turn the refusal into a timeout
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert any(isinstance(e, AuthError) for e in errors), errors
    assert all(ep.session is None for ep in eps)


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)


# -- tampering -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("tag", [0, 1, 2, 3, 4, 5, TAG_HEADER_TRAILER, TAG_TRAILER], ids=lambda t: f"tag{t}")
def test_one_flipped_byte_anywhere_is_refused_unread(encrypt, tag):
    def flip(rank, t, data):
        if rank == 0 and t == tag:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01 if t != 0 else 0x02  # header: n_ints (index 32), 2 -> 0
            return bytes(data)
        return data

    client, server, _ = _pair((encrypt, encrypt), relay=flip)
    client.send(_message(), "a request")
    with pytest.raises(TamperedMessageError, match="refused a message from the client .* nothing of it was used"):
        server.recv("the request")
    client.send(_message(2), "the next request")  # the connection is no longer trusted
    with pytest.raises(TamperedMessageError, match="earlier message"):
        server.recv("the next request")


def _message_relay(action):
    """A relay that acts on whole messages from the client: ``action(index, parts) -> list of parts
    to deliver now`` (each part a (tag, data)), where index counts the client's messages."""
    state = {"index": 0, "parts": [], "kept": []}

    def relay(rank, tag, data):
        if rank != 0:
            return data
        state["parts"].append((tag, data))
        if tag == TAG_TRAILER:
            parts, state["parts"] = state["parts"], []
            deliver = action(state["index"], parts, state["kept"])
            state["index"] += 1
            for t, d in deliver:
                relay.wire.queue((0, 1, t)).put(d)
        return None  # delivered above, whole messages at a time

    return relay


@pytest.mark.parametrize("case, expect", [
    ("replay", "already received"),
    ("drop", "dropped, or it was reordered"),
    ("reorder", "dropped, or it was reordered"),
])
def test_replayed_dropped_and_reordered_messages_are_refused(case, expect):
    def action(i, parts, kept):
        kept.append(parts)
        if case == "replay":
            return parts + kept[0] if i == 1 else parts  # message 0 again after message 1
        if case == "drop":
            return [] if i == 1 else parts
        return [] if i == 1 else parts + kept[1] if i == 2 else parts  # 0, 2, 1

    relay = _message_relay(action)
    client, server, wire = _pair(relay=relay)
    relay.wire = wire
    for step in range(3):
        client.send(_message(step), f"request {step}")
    server.recv("request 0")
    if case == "replay":
        server.recv("request 1")
    with pytest.raises(TamperedMessageError, match=expect):
        server.recv("the next request")


def test_an_injected_message_without_the_key_is_refused():
    """A stranger on the path who knows the layout (and even the counter) but not the session key."""
    client, server, wire = _pair()
    fake = Session(b"another secret of enough bytes", RUN_ID, b"a" * 32, b"b" * 32, is_host=True, encrypt=False)
    stranger = Endpoint("server", 5.0, "cpu", group=LoopbackGroup(wire, 0), rank=0)
    stranger.session = fake
    stranger.send(_message(), "a forged request")
    with pytest.raises(TamperedMessageError, match="headers failed their authentication check"):
        server.recv("the request")


def _claim_huge_tensor(data: bytes) -> bytes:
    """A tensor-headers part (int64 rows: dtype code, ndim, shape...) whose first tensor now claims
    2**46 elements in its first dimension: petabytes, which no allocation could satisfy."""
    rows = torch.frombuffer(bytearray(data), dtype=torch.int64).clone()
    rows[2] = 2**46
    return rows.numpy().tobytes()


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_huge_tensor_claimed_in_flight_is_refused_before_anything_is_allocated(encrypt):
    """The receiver sizes its buffers by the tensors' headers: those are authenticated (the header
    trailer) before a single tensor is allocated, so an altered size is refused, not attempted."""

    def relay(rank, tag, data):
        return _claim_huge_tensor(data) if rank == 0 and tag == 3 else data

    client, server, _ = _pair((encrypt, encrypt), relay=relay)
    client.send(_message(), "a request")
    with pytest.raises(TamperedMessageError, match="its headers failed their authentication check"):
        server.recv("the request")


def test_the_channel_check_refuses_a_huge_claimed_tensor_before_allocating_it():
    """Before the session exists nothing is authenticated: the channel check accepts only messages
    whose tensors claim at most a proof's bytes."""
    wire = Wire()
    wire.relay = lambda rank, tag, data: _claim_huge_tensor(data) if rank == 0 and tag == 3 else data
    eps = [Endpoint(n, 5.0, "cpu", group=LoopbackGroup(wire, r), rank=r) for r, n in ((0, "server"), (1, "client"))]
    errors: list[Exception] = []
    threads = [threading.Thread(target=lambda r=r: _catch(errors, confirm_channel, eps[r], SECRET, RUN_ID, 3.0))
               for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    refused = [e for e in errors if isinstance(e, PeerProtocolError)]
    assert refused and "nothing of it was allocated" in str(refused[0]), errors
    assert all(ep.session is None for ep in eps)


def test_a_replayed_header_trailer_with_fresh_headers_is_refused():
    """The header trailer binds the counter: message 0's header trailer moved onto message 1."""
    first: dict[int, bytes] = {}

    def relay(rank, tag, data):
        if rank == 0 and tag == TAG_HEADER_TRAILER:
            first.setdefault(tag, data)
            return first[tag]
        return data

    client, server, _ = _pair(relay=relay)
    client.send(_message(0), "request 0")
    _same(server.recv("request 0"), _message(0))
    client.send(_message(1), "request 1")
    with pytest.raises(TamperedMessageError, match="headers failed their authentication check"):
        server.recv("request 1")


# -- both sides of a step ----------------------------------------------------------------------------
def _serve_in_thread(server, handled):
    result = {}

    def run():
        try:
            result["code"] = serve(server, lambda req: handled.append(req.step) or Message(Kind.REPLY, req.phase,
                                                                                           req.step, floats=[1.0]))
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.parametrize("direction", ["request", "reply"])
def test_a_tampered_step_is_refused_on_both_sides_and_nothing_is_applied(direction):
    state = {"n": 0}

    def flip(rank, tag, data):  # a byte of the first tensor of the 2nd request (or of the 2nd reply)
        if (rank, tag) == ((0, 4) if direction == "request" else (1, 2)):
            state["n"] += 1
            if state["n"] == 2:
                data = bytes([data[0] ^ 0x80]) + data[1:]
        return data

    client, server, _ = _pair(relay=flip)
    handled: list[int] = []
    thread, result = _serve_in_thread(server, handled)
    link = DistributedLink(client, {3: "three"})
    link.call(3, 1, tensors=[torch.ones(4)])
    if direction == "request":
        with pytest.raises(RemoteError, match="the server .* failed in phase 'three' of step 2: .*authentication check"):
            link.call(3, 2, tensors=[torch.ones(4)])
    else:
        with pytest.raises(TamperedMessageError, match="from the server .* failed (its|their) authentication check"):
            link.call(3, 2, tensors=[torch.ones(4)])
    thread.join(10)
    assert isinstance(result.get("error"), (TamperedMessageError, RemoteError)), result
    assert "authentication check" in str(result["error"])
    assert handled == ([1] if direction == "request" else [1, 2])  # a tampered request never reached the handler


# -- real processes: hosl serve and hosl train --role client ------------------------------------------
# A run of the hosl command whose Endpoint, after the channel check, records every message's plaintext
# tensors (PLAIN) and every byte it hands to the network (WIRE), and flips one byte of the FLIP-th
# tensor part it sends: what a relay on the path would do to it in flight, after the MAC was computed.
WIRE_HOOK = textwrap.dedent('''
    import os, sys
    from hosl.transport import distributed

    flip_at, count = int(os.environ.get("FLIP", "0")), [0]
    plain, wire = open(os.environ["PLAIN"], "ab"), open(os.environ["WIRE"], "ab")
    send, isend = distributed.Endpoint.send, distributed.Endpoint._isend

    def recording_send(self, msg, what, timeout_s=None):
        if self.session is not None:
            for t in msg.tensors:
                plain.write(t.detach().cpu().contiguous().reshape(-1).view(distributed.torch.uint8).numpy().tobytes()
                            + b"\\n--\\n")
            plain.flush()
        return send(self, msg, what, timeout_s)

    def relay_isend(self, t, tag):
        if self.session is not None and distributed.TAG_FIRST_TENSOR <= tag < distributed.TAG_TRAILER and t.numel():
            count[0] += 1
            if count[0] == flip_at:
                t = t.clone()
                t[t.numel() // 2] ^= 0x10
        if self.session is not None:
            wire.write(t.cpu().reshape(-1).view(distributed.torch.uint8).numpy().tobytes())
            wire.flush()
        return isend(self, t, tag)

    distributed.Endpoint.send, distributed.Endpoint._isend = recording_send, relay_isend
    from hosl.cli import main
    sys.exit(main(sys.argv[1:]))
''')
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _split_run(tmp_path, *extra, client_env=None):
    """hosl serve and hosl train --role client (through WIRE_HOOK) on a free port: (rc, output) of each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", "hosl", "--cut", "1",
            "--steps", "3", "--batch-size", "4", "--train-size", "12", "--eval-size", "4", "--num-queries", "2",
            "--max-length", "32", "--eval-every", "3", "--checkpoint-every", "3", "--out", str(tmp_path / "run"),
            "--no-progress", "--master-addr", "127.0.0.1", "--master-port", str(port), "--peer-timeout", "20",
            "--connect-timeout", "120", *extra]
    env = dict(os.environ, HOSL_SECRET="a-shared-secret-for-the-tests", PYTHONPATH=str(ROOT),
               PLAIN=str(tmp_path / "plain"), WIRE=str(tmp_path / "wire"))
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = subprocess.Popen([sys.executable, "-m", "hosl", "serve", "--rank", "1", *args], env=env, **common)
    client = subprocess.Popen([sys.executable, "-c", WIRE_HOOK, "train", "--role", "client", "--rank", "0", *args],
                              env=dict(env, **(client_env or {})), **common)
    results = []
    for proc in (client, server):
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0] + "\n<killed: did not end in time>"
        results.append((proc.returncode, out))
    return results


@needs_data
@pytest.mark.slow
def test_a_byte_flipped_in_flight_stops_both_processes_with_a_clear_error(tmp_path):
    (rc_client, out_client), (rc_server, out_server) = _split_run(tmp_path, client_env={"FLIP": "3"})
    assert rc_client == 2 and rc_server == 2, out_client + out_server
    assert "failed its authentication check" in out_client, out_client
    assert "refused a message from the client (rank 0)" in out_server and "Traceback" not in out_server, out_server
    assert not (tmp_path / "run" / "server" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "server" / "checkpoints").iterdir())  # no step got as far as a checkpoint


@needs_data
@pytest.mark.slow
def test_encrypt_trains_end_to_end_and_no_plaintext_tensor_crosses(tmp_path):
    (rc_client, out_client), (rc_server, out_server) = _split_run(tmp_path, "--encrypt")
    assert rc_client == 0 and rc_server == 0, out_client + out_server
    metrics = [json.loads(line) for line in (tmp_path / "run" / "client" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics if "loss" in r) == 3
    wire = (tmp_path / "wire").read_bytes()
    sent = (tmp_path / "plain").read_bytes().split(b"\n--\n")
    assert len(wire) >= sum(map(len, sent))  # activations, labels, losses, ... all went out
    # a tensor's first 32 bytes that look like data (not a run of zeros a header also holds) must not cross
    known = [p[:32] for p in sent if len(set(p[:32])) >= 8]
    assert len(known) >= 6
    leaked = [p for p in known if p in wire]
    assert not leaked, f"{len(leaked)} of {len(sent)} tensors crossed in the clear"
