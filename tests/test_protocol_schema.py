"""The split protocol's declared shapes (hosl/training/protocol.py): each payload a NamedTuple that
round-trips through its integer and float lists, and a version checked at the handshake, so a peer
speaking another version is refused with one line naming both (a fake peer, no second process)."""

import pytest

from hosl.training.config import TrainConfig
from hosl.training.protocol import SPLIT_PROTOCOL_VERSION, CatchUp, ClientUpdate, Relay, ZOPoint, ZOUpdate
from hosl.training.remote import fingerprint
from hosl.transport import Kind, Message
from hosl.transport.distributed import ConfigMismatchError, Version, handshake

SEEDS = [2**64 - 5, 7, 0]  # seeds above 2**63 travel as negative int64


@pytest.mark.parametrize("payload", [
    ZOPoint(2**64 - 1, -0.5),
    ZOUpdate(SEEDS, [0.25, -1.5, 1e-300]),
    Relay(2, [ClientUpdate(1, SEEDS[:2], [0.5, 1.0]), ClientUpdate(4, [], [])]),
    CatchUp(3, 5, [[ClientUpdate(0, [9], [2.0])], []]),
])
def test_each_payload_round_trips_through_int64_lists(payload):
    ints, floats = payload.to_fields()
    assert all(isinstance(i, int) and -(2**63) <= i < 2**63 for i in ints)
    assert all(isinstance(f, float) for f in floats)
    assert type(payload).from_fields(ints, floats) == payload


def test_no_point_is_no_ints_and_a_malformed_relay_is_refused():
    assert ZOPoint.from_fields([], []) is None
    ints, floats = Relay(0, [ClientUpdate(1, [3, 4], [0.5, 1.0])]).to_fields()
    with pytest.raises(ValueError, match="does not add up"):
        Relay.from_fields(ints, floats[:1])


class _FakePeer:
    """An endpoint whose peer answers the handshake with ``hello`` (rank 0 sends first)."""

    rank, peer_name = 0, "server (rank 1)"

    def __init__(self, hello: Message | None = None):
        self.hello, self.sent = hello, []

    def send(self, message, what, timeout_s):
        self.sent.append(message)

    def recv(self, what, timeout_s):
        return self.hello


def _hello(role: str, fields: dict) -> Message:
    """The HELLO a side with ``fields`` sends (recorded from a handshake that then fails)."""
    peer = _FakePeer(Message(Kind.REPLY))
    with pytest.raises(ConfigMismatchError):
        handshake(peer, role, fields, 1.0)
    return peer.sent[0]


def test_a_peer_speaking_another_split_protocol_version_is_refused_naming_both():
    cfg = TrainConfig(model="tiny-opt", cut=1)
    assert fingerprint(cfg)["split protocol"] == SPLIT_PROTOCOL_VERSION
    newer = {**fingerprint(cfg), "split protocol": Version(SPLIT_PROTOCOL_VERSION + 1), "cut": 2}
    with pytest.raises(ConfigMismatchError) as refused:
        handshake(_FakePeer(_hello("server", newer)), "client", fingerprint(cfg), 1.0)
    # the version is compared first: the cut differs too, but the line names the versions
    assert str(refused.value) == (f"split protocol version mismatch: this side speaks {SPLIT_PROTOCOL_VERSION}, "
                                  f"the server (rank 1) {SPLIT_PROTOCOL_VERSION + 1}")


def test_a_peer_with_no_split_protocol_version_is_refused_and_the_same_version_passes():
    mine = fingerprint(TrainConfig(model="tiny-opt", cut=1))
    older = {k: v for k, v in mine.items() if k != "split protocol"}
    with pytest.raises(ConfigMismatchError, match=r"split protocol version mismatch: this side speaks \d+, the "
                                                   r"server \(rank 1\) none"):
        handshake(_FakePeer(_hello("server", older)), "client", mine, 1.0)
    handshake(_FakePeer(_hello("server", mine)), "client", mine, 1.0)  # same version and settings: no error
