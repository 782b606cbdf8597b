"""Every message after the channel check is authenticated, and with ``--encrypt`` encrypted.

The channel check (:func:`hosl.transport.auth.confirm_channel`) ends with both sides holding the
shared secret, the run id and two fresh nonces (one per side). From them each side derives, with
HKDF-SHA256 (RFC 5869, from the ``cryptography`` package), one 32-byte key per direction (host ->
joiner and joiner -> host; the host is rank 0 of the connection), and keeps a counter per direction
that starts at 0 and counts the messages sent (or accepted) that way.

Every message then ends with a trailer (its own part, tag :data:`TAG_TRAILER`): the message's
counter (8 bytes, little endian) and

* without ``--encrypt``: ``HMAC-SHA256(key, direction | counter | every part with its tag)``
  (32 bytes); the payloads travel as they are;
* with ``--encrypt``: the 16-byte tag of ChaCha20-Poly1305 (key, nonce = direction | counter)
  over the ints, floats and tensor bytes, with the message header, the tensors' headers (dtype and
  shape: the receiver needs them to receive) and the counter as associated data. The ciphertext
  has the plaintext's length, so each part keeps its dtype and size on the wire.

Before the tensors, each message also carries a header trailer (tag :data:`TAG_HEADER_TRAILER`):
its counter and ``HMAC-SHA256(header key, direction | counter | header, ints, floats and tensor
headers as sent)``, under a key of its own (:func:`derive_key` with ``purpose=b"headers"``). The
receiver must read the message header and the tensors' headers to size what it receives; it checks
this trailer before it allocates a single tensor, so a stranger on the path cannot make it allocate
more than the bounded small parts (:data:`hosl.transport.wire.MAX_SMALL_PAYLOAD` ints and floats)
by claiming a huge tensor.

The receiver checks the trailer before anything of the message is used: a wrong MAC or tag (a
byte altered on the way, a message injected by a stranger) and a counter other than the next one
(a message replayed, reordered or dropped) raise :class:`TamperedMessageError`, and the message
is dropped unread. After one refusal the session refuses everything it receives: the counters
can no longer be trusted. Nothing here sends anything: :class:`hosl.transport.distributed.Endpoint`
calls :meth:`Session.seal` on every message it sends and :meth:`Session.open` on every one it
receives.
"""

from __future__ import annotations

import hashlib
import hmac

import torch

from hosl.transport.link import PeerLostError

TAG_TRAILER = 1 << 20  # above every tensor's tag (4 + i, i < wire.MAX_TENSORS)
TAG_HEADER_TRAILER = TAG_TRAILER + 1
COUNTER_BYTES = 8
MAC_BYTES = 32  # HMAC-SHA256
AEAD_TAG_BYTES = 16  # ChaCha20-Poly1305
KEY_BYTES = 32
INFO = b"hosl-session-v2"  # v2: the header trailer
DIRECTIONS = (b"host-to-joiner", b"joiner-to-host")
CLEAR_TAGS = (0, 3)  # the message header and the tensors' headers stay readable (the receiver sizes by them)
SMALL_TAGS = (0, 1, 2, 3)  # header, ints, floats, tensor headers: what the header trailer covers


class TamperedMessageError(PeerLostError):
    """A message failed its authentication check (altered, injected, replayed, reordered or dropped on
    the way); it was refused unread, and the connection can no longer be trusted."""


def derive_key(
    secret: bytes,
    run_id: str,
    n_host: bytes,
    n_joiner: bytes,
    direction: bytes,
    encrypt: bool,
    purpose: bytes = b"",
) -> bytes:
    """HKDF-SHA256 (RFC 5869) of the shared secret, salted with both channel-check nonces; the info
    names the protocol, the run id, the direction and whether payloads are encrypted (and, for any
    key but the message key, its ``purpose``), so every direction, connection, mode and purpose has
    a key of its own."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    mode = b"aead-chacha20poly1305" if encrypt else b"mac-hmac-sha256"
    info = b"|".join([INFO, run_id.encode("ascii"), direction, mode, *([purpose] if purpose else [])])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=n_host + n_joiner, info=info).derive(secret)


def _part_bytes(t: torch.Tensor):
    """A part's bytes as a CPU buffer (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


class Session:
    """The keys and counters of one connection, as seen from one side of it.

    ``is_host``: this side is rank 0 of the connection. ``peer_name`` names the other side in errors."""

    def __init__(
        self,
        secret: bytes,
        run_id: str,
        n_host: bytes,
        n_joiner: bytes,
        *,
        is_host: bool,
        encrypt: bool,
        peer_name: str = "peer",
    ):
        out_dir, in_dir = DIRECTIONS if is_host else DIRECTIONS[::-1]
        self.encrypt = encrypt
        self.peer_name = peer_name
        self._out = (out_dir, derive_key(secret, run_id, n_host, n_joiner, out_dir, encrypt))
        self._in = (in_dir, derive_key(secret, run_id, n_host, n_joiner, in_dir, encrypt))
        self._out_headers = derive_key(secret, run_id, n_host, n_joiner, out_dir, encrypt, b"headers")
        self._in_headers = derive_key(secret, run_id, n_host, n_joiner, in_dir, encrypt, b"headers")
        self.sent = 0  # messages sealed so far: the next one's counter
        self.received = 0  # messages accepted so far: the counter the next one must carry
        self.broken: str | None = None  # why this session refuses everything (after a refused message)

    @property
    def trailer_len(self) -> int:
        return COUNTER_BYTES + (AEAD_TAG_BYTES if self.encrypt else MAC_BYTES)

    header_trailer_len = COUNTER_BYTES + MAC_BYTES

    # -- the two checks ---------------------------------------------------------------------------
    @staticmethod
    def _nonce(direction: bytes, counter: int) -> bytes:
        return (1 if direction == DIRECTIONS[0] else 2).to_bytes(4, "little") + counter.to_bytes(8, "little")

    @staticmethod
    def _mac(key: bytes, direction: bytes, counter: int, parts) -> bytes:
        mac = hmac.new(key, b"|".join([INFO, direction, counter.to_bytes(8, "little")]), hashlib.sha256)
        for tag, t in parts:
            mac.update(tag.to_bytes(4, "little") + t.numel().to_bytes(8, "little") + bytes([t.element_size()]))
            mac.update(_part_bytes(t))
        return mac.digest()

    @staticmethod
    def _aad(direction: bytes, counter: int, parts) -> bytes:
        out = [INFO, direction, counter.to_bytes(8, "little")]
        for tag, t in parts:
            out.append(tag.to_bytes(4, "little") + t.numel().to_bytes(8, "little") + bytes([t.element_size()]))
            if tag in CLEAR_TAGS:
                out.append(_part_bytes(t).tobytes())
        return b"".join(out)

    # -- sending ----------------------------------------------------------------------------------
    def seal(self, parts: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        """The parts to send for one message, in order (encrypted where ``encrypt``), and the trailer."""
        direction, key = self._out
        counter = self.sent
        self.sent += 1
        if not self.encrypt:
            tag = self._mac(key, direction, counter, parts)
            return self._with_header_trailer(direction, counter, [*parts, (TAG_TRAILER, _trailer(counter, tag))])
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        secret_parts = [(i, t) for i, (tag, t) in enumerate(parts) if tag not in CLEAR_TAGS]
        plain = b"".join(_part_bytes(t).tobytes() for _, t in secret_parts)
        sealed = ChaCha20Poly1305(key).encrypt(
            self._nonce(direction, counter), plain, self._aad(direction, counter, parts)
        )
        body, tag = sealed[: len(plain)], sealed[len(plain) :]
        out = list(parts)
        offset = 0
        for i, t in secret_parts:
            n = t.numel() * t.element_size()
            chunk = torch.frombuffer(bytearray(body[offset : offset + n]), dtype=torch.uint8)
            out[i] = (parts[i][0], chunk.view(t.dtype).reshape(t.shape))
            offset += n
        return self._with_header_trailer(direction, counter, [*out, (TAG_TRAILER, _trailer(counter, tag))])

    def _with_header_trailer(self, direction: bytes, counter: int, parts):
        """``parts`` (as sent) with the header trailer inserted after the small parts."""
        small = [(tag, t) for tag, t in parts if tag in SMALL_TAGS]
        trailer = (TAG_HEADER_TRAILER, _trailer(counter, self._mac(self._out_headers, direction, counter, small)))
        return [*small, trailer, *[(tag, t) for tag, t in parts if tag not in SMALL_TAGS]]

    # -- receiving --------------------------------------------------------------------------------
    def check_headers(self, small: list[tuple[int, torch.Tensor]], trailer: torch.Tensor, what: str) -> None:
        """Check a received message's small parts (header, ints, floats, tensor headers, as received)
        against its header trailer, before anything is sized by them. Raises
        :class:`TamperedMessageError` (and refuses everything after) unless they are the next
        message's, unaltered."""
        direction, _key = self._in
        counter, tag = self._read_trailer(trailer, what)
        if not (
            len(tag) == MAC_BYTES and hmac.compare_digest(self._mac(self._in_headers, direction, counter, small), tag)
        ):
            self.broken = "an earlier message failed its authentication check"
            raise TamperedMessageError(
                f"refused a message from the {self.peer_name} while {what}: its headers failed their authentication "
                f"check (altered on the way, or not sent by the {self.peer_name}); nothing of it was used"
            )
        self._check_counter(counter, what)

    def _read_trailer(self, trailer: torch.Tensor, what: str) -> tuple[int, bytes]:
        """``(counter, tag)`` of a received trailer; refuses at once when the session is broken."""
        if self.broken is not None:
            raise TamperedMessageError(f"refused a message from the {self.peer_name} while {what}: {self.broken}")
        raw = bytes(_part_bytes(trailer))
        return int.from_bytes(raw[:COUNTER_BYTES], "little"), raw[COUNTER_BYTES:]

    def _check_counter(self, counter: int, what: str) -> None:
        if counter == self.received:
            return
        self.broken = "an earlier message arrived out of order"
        how = (
            "replayed (that message was already received)"
            if counter < self.received
            else (f"{counter - self.received} message(s) before it were dropped, or it was reordered, on the way")
        )
        raise TamperedMessageError(
            f"refused a message from the {self.peer_name} while {what}: it is message {counter} of this "
            f"connection where {self.received} was due: {how}; nothing of it was used"
        )

    def open(self, parts: list[tuple[int, torch.Tensor]], trailer: torch.Tensor, what: str) -> None:
        """Check a received message (its parts in order, header first, and its trailer); with
        ``encrypt``, decrypt its parts in place. Raises :class:`TamperedMessageError` (and refuses
        everything after) unless it is the next message the peer sealed, unaltered."""
        direction, key = self._in
        counter, tag = self._read_trailer(trailer, what)
        plain = None
        if not self.encrypt:
            ok = len(tag) == MAC_BYTES and hmac.compare_digest(self._mac(key, direction, counter, parts), tag)
        else:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

            body = b"".join(_part_bytes(t).tobytes() for tag_, t in parts if tag_ not in CLEAR_TAGS)
            try:
                plain = ChaCha20Poly1305(key).decrypt(
                    self._nonce(direction, counter), body + tag, self._aad(direction, counter, parts)
                )
                ok = True
            except InvalidTag:
                ok = False
        if not ok:
            self.broken = "an earlier message failed its authentication check"
            raise TamperedMessageError(
                f"refused a message from the {self.peer_name} while {what}: it failed its authentication check "
                f"(altered on the way, or not sent by the {self.peer_name}); nothing of it was used"
            )
        self._check_counter(counter, what)
        self.received += 1
        if plain is not None:
            offset = 0
            for tag_, t in parts:
                if tag_ in CLEAR_TAGS:
                    continue
                n = t.numel() * t.element_size()
                flat = t.view(-1).view(torch.uint8)
                flat.copy_(torch.frombuffer(bytearray(plain[offset : offset + n]), dtype=torch.uint8).to(flat.device))
                offset += n


def _trailer(counter: int, tag: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(counter.to_bytes(COUNTER_BYTES, "little") + tag), dtype=torch.uint8)
