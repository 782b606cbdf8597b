"""A fleet's joins with the rendezvous store treated as hostile (hosl/transport/fleet.py): the host
never waits on a join, slots are bounded and expire, and what the store says is not believed.

Host and clients run as threads of this process over a real TCPStore and gloo pair groups."""

import datetime
import socket
import threading
import time

import pytest
import torch.distributed as dist

from hosl.transport import AuthError
from hosl.transport.fleet import JOINS, KEYS, MAX_WAITING_SLOTS, FleetHost, join_fleet

SECRET = b"a test secret of enough bytes"
FIELDS = {"model": "tiny-opt", "cut": 1}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_in_thread(port, rank, result, timeout_s=20.0):
    def run():
        try:
            result["endpoint"] = join_fleet(secret=SECRET, rank=rank, addr="127.0.0.1", port=port, timeout_s=timeout_s,
                                            peer_timeout=10.0, fields=FIELDS)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _serve_joins(host, until, valid_rank=lambda rank: None, timeout_s=30.0):
    """Call accept_joins as the fleet server's loop does until ``until()``; the longest one call took."""
    joined, longest = [], 0.0
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        t0 = time.monotonic()
        joined += host.accept_joins(FIELDS, valid_rank)
        longest = max(longest, time.monotonic() - t0)
        time.sleep(0.05)
    return joined, longest


@pytest.fixture
def host():
    port = _port()
    h = FleetHost(secret=SECRET, addr="127.0.0.1", port=port, timeout_s=20.0, peer_timeout=10.0)
    h.port = port
    yield h
    h.endpoints.clear()


def _stranger_store(port):
    return dist.TCPStore("127.0.0.1", port, 2, False, datetime.timedelta(seconds=10), wait_for_workers=False,
                         multi_tenant=True)


def test_refused_keys_from_a_stranger_are_not_believed_and_the_join_completes(host):
    stranger = _stranger_store(host.port)
    for i in range(1, 40):  # where the client will read them, before it even joins
        stranger.set(f"{KEYS}join/{i}/refused", b"STRANGER SAYS NO")
    result = {}
    thread = _join_in_thread(host.port, 1, result)
    joined, _ = _serve_joins(host, lambda: not thread.is_alive())
    thread.join(5)
    assert "error" not in result, result.get("error")
    assert [j.rank for j in joined] == [1] and 1 in host.endpoints


def test_a_rank_refusal_travels_over_the_authenticated_connection(host):
    result = {}
    thread = _join_in_thread(host.port, 2, result)
    joined, _ = _serve_joins(host, lambda: not thread.is_alive(), valid_rank=lambda rank: "rank 2 is connected already")
    assert not joined and host.refused == 1
    assert isinstance(result.get("error"), AuthError)
    assert "refused rank 2: rank 2 is connected already" in str(result["error"])


def test_a_stranger_bumping_the_counter_never_holds_up_the_host_and_slots_stay_bounded(host):
    stranger = _stranger_store(host.port)
    stranger.add(JOINS, 5000)  # five thousand join numbers that will never post a rank
    stranger.set(f"{KEYS}join/5000/rank", b"1")  # and one that posts a rank it cannot prove
    result = {}
    thread = _join_in_thread(host.port, 1, result)
    joined, longest = _serve_joins(host, lambda: not thread.is_alive())
    assert "error" not in result, result.get("error")
    assert [j.rank for j in joined] == [1]
    assert longest < 2.0  # each look at the slots returns at once: a running step is never held up
    assert len(host._slots) <= MAX_WAITING_SLOTS


def test_a_refused_verdict_written_by_a_stranger_does_not_end_a_join(host):
    """The auth verdict of the client's join reads "refused" before the server has said anything:
    the client waits on for the server's proof (which overwrites it) and joins."""
    stranger = _stranger_store(host.port)
    stranger.set(f"{KEYS}join/1/auth/verdict", b"refused")
    result = {}
    client = _join_in_thread(host.port, 1, result, timeout_s=15.0)
    joined, _ = _serve_joins(host, lambda: not client.is_alive())
    assert "error" not in result, result.get("error")
    assert [j.rank for j in joined] == [1]
