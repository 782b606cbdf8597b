"""Who may talk: a shared secret, proven both ways before anything else is said.

Two processes of a run share a secret (``--secret-file PATH`` or the ``HOSL_SECRET`` environment
variable; ``hosl serve`` generates one when given none). Before any tensor, label or configuration
crosses, each side proves it holds the secret without revealing it:

1. over the rendezvous store (:func:`authenticate_over_store`): the host (rank 0) posts a fresh
   nonce ``n0``; the joiner (rank 1) answers with its own fresh nonce ``n1`` and
   ``HMAC(secret, "joiner" | n0 | n1)``; the host checks it and answers with
   ``HMAC(secret, "host" | n0 | n1)``, which the joiner checks. Either side that finds a wrong
   proof posts a refusal, so both ends stop with a message. Fresh nonces from both sides mean an
   old exchange cannot be replayed. The process group is then formed under a store prefix derived
   from the secret and both nonces (``run_id``), apart from other runs and stale keys.
2. over the tensor channel itself (:func:`confirm_channel`): right after the process group is
   formed, each side sends a fresh nonce as a small ``uint8`` tensor and proves the secret over
   ``run_id`` and both nonces. A TCPStore lets any process that reaches its port read and write
   keys, so step 1 alone cannot rule out a stranger who rewrote the addresses the process group
   connects to; this step does: the process at the other end of the very connection that will
   carry activations and labels holds the secret.

After step 2 every message carries a MAC under a session key derived from the secret and both
channel nonces, and with ``--encrypt`` its payloads are encrypted (``hosl/transport/session.py``,
docs/transport.md). Comparisons use ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hosl.transport.link import PeerError
from hosl.transport.waiting import call_bounded

SECRET_ENV = "HOSL_SECRET"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
TAG_BYTES = 32  # sha256
CHANNEL_CHECK_BYTES = 64  # the most tensor bytes a channel-check message may claim (a nonce or a proof: 32)
DOMAIN = b"hosl-auth-v1"
VERDICT_GRACE_S = 5.0  # how long a refusing host keeps its store up for the refused side to read why


class AuthError(PeerError):
    """The other side did not prove the shared secret, or refused this side's proof."""


class ConnectError(PeerError):
    """The rendezvous could not be completed: port taken, nobody there, or no answer in time."""


# -- the secret ---------------------------------------------------------------------------------
def load_secret(path: str | None = None, environ=None) -> tuple[bytes, str] | None:
    """The shared secret and where it came from (``--secret-file`` first, then ``HOSL_SECRET``),
    or None when neither is given. Surrounding whitespace is ignored (files end with a newline)."""
    environ = os.environ if environ is None else environ
    if path is not None:
        p = Path(path)
        try:
            data = p.read_bytes().strip()
        except FileNotFoundError:
            raise ValueError(f"--secret-file {path}: no such file") from None
        except OSError as exc:
            raise ValueError(f"--secret-file {path}: cannot read it ({exc.strerror or exc})") from None
        source = f"--secret-file {path}"
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(
                f"[hosl] warning: {path} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it",
                file=sys.stderr,
                flush=True,
            )
    elif environ.get(SECRET_ENV):
        data, source = environ[SECRET_ENV].strip().encode("utf-8"), SECRET_ENV
    else:
        return None
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{source}: the secret is {len(data)} bytes; use at least {MIN_SECRET_BYTES} "
            f"(e.g. the 64 hex characters `hosl serve` generates)"
        )
    return data, source


def write_secret_file(path: Path) -> bytes:
    """Generate a fresh secret (64 hex characters) and write it to ``path``, readable by the
    owner only (0600, created that way: never briefly readable by others)."""
    text = secrets.token_hex(32)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (text + "\n").encode("ascii"))
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return text.encode("ascii")


def proof(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    """``HMAC-SHA256(secret, DOMAIN | label | parts...)``; the label keeps the two sides' proofs
    (and the run id) distinct, so one side's proof is never a valid answer for the other."""
    return hmac.new(secret, b"|".join([DOMAIN, label, *parts]), hashlib.sha256).digest()


def proof_ok(secret: bytes, label: bytes, parts: tuple[bytes, ...], tag: bytes) -> bool:
    return len(tag) == TAG_BYTES and hmac.compare_digest(proof(secret, label, *parts), tag)


def run_id_of(secret: bytes, n0: bytes, n1: bytes) -> str:
    return proof(secret, b"run-id", n0, n1).hex()[:32]


# -- step 1: over the rendezvous store ------------------------------------------------------------
def _keys_prefix() -> str:
    # torchrun's agent store outlives a restart of the workers: keep each attempt's keys apart
    return f"hosl/auth/v1/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def authenticate_over_store(
    store,
    *,
    is_host: bool,
    secret: bytes,
    deadline: float,
    where: str,
    stop_requested: Callable[[], bool] | None = None,
    timeout_s: float | None = None,
    keys: str | None = None,
    roles: tuple[str, str] = ("client", "server"),
    joiner_rank: int = 1,
    believe_refusal: bool = True,
) -> str:
    """Mutual challenge/response through ``store``; returns the run id both sides derive.

    ``is_host``: rank 0 (it posts the challenge). ``where`` names the rendezvous (``host:port``)
    in messages, ``timeout_s`` the connect timeout behind ``deadline``. ``keys``: the store prefix of
    this exchange (default: the two-process run's); ``roles``: (host, joiner) as messages name them
    (a two-process run's client hosts; a fleet's server does, ``hosl/transport/fleet.py``), and
    ``joiner_rank`` the joiner's rank. ``believe_refusal`` False (a fleet's joins): a "refused"
    verdict in the store, which anyone who reaches it can write, does not end the joiner's wait for
    the host's proof; it is reported only if no proof comes before ``deadline``. Raises
    :class:`AuthError` on a wrong proof (after telling the other side) and :class:`ConnectError` when
    the other side does not show up before ``deadline``.
    """
    keys = keys or _keys_prefix()
    host, joiner = roles

    def wait_get(key: str, waiting_for: str) -> bytes:
        def on_timeout():
            within = f"{timeout_s:g} s" if timeout_s is not None else "the connect timeout"
            return ConnectError(f"{waiting_for} on {where}: nothing came within {within} (--connect-timeout)")

        def get():
            try:
                return _poll(store, key, deadline)
            except RuntimeError as exc:
                raise ConnectError(
                    f"{waiting_for} on {where}: the rendezvous store went away ({_first_line(exc)})"
                ) from None

        value = call_bounded(get, deadline + 1.0, on_timeout, stop_requested)
        if value is None:
            raise on_timeout()
        return value

    def put(key: str, value: bytes) -> None:
        call_bounded(
            lambda: store.set(key, value),
            max(deadline, time.monotonic() + 5.0),
            lambda: ConnectError(f"the rendezvous store on {where} stopped answering"),
            stop_requested,
        )

    if is_host:
        n0 = secrets.token_bytes(NONCE_BYTES)
        put(keys + "challenge", n0)
        answer = wait_get(
            keys + "response", f"waiting for a {joiner} to join the rendezvous and prove the shared secret"
        )
        n1, tag = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if len(n1) != NONCE_BYTES or not proof_ok(secret, b"joiner", (n0, n1), tag):
            put(keys + "verdict", b"refused")
            grace = time.monotonic() + VERDICT_GRACE_S
            try:  # give the refused side a moment to read why
                call_bounded(
                    lambda: _poll(store, keys + "verdict-seen", grace), grace + 1.0, TimeoutError, stop_requested
                )
            except (TimeoutError, RuntimeError):
                pass
            raise AuthError(
                f"refused the process that joined the rendezvous on {where} as rank {joiner_rank}: it "
                f"did not prove the shared secret (a stranger, or a {joiner} started with another "
                f"--secret-file or {SECRET_ENV}); nothing was sent to it"
            )
        put(keys + "verdict", b"ok" + proof(secret, b"host", n0, n1))
        theirs = wait_get(keys + "joiner-verdict", f"waiting for the {joiner}'s verdict on this {host}'s proof")
        if theirs != b"ok":
            raise AuthError(
                f"the process that joined on {where} as rank {joiner_rank} refused this side's proof of "
                f"the shared secret (the two sides hold different secrets?); nothing was sent to it"
            )
        return run_id_of(secret, n0, n1)

    joined = call_bounded(
        lambda: store.add(keys + "joined", 1),
        max(deadline, time.monotonic() + 5.0),
        lambda: ConnectError(f"the rendezvous store on {where} stopped answering"),
        stop_requested,
    )
    if joined != 1:
        raise AuthError(
            f"another process already joined the rendezvous on {where} as rank {joiner_rank}; this one "
            f"is refused (is another {joiner} already connected to that {host}?)"
        )
    n0 = wait_get(keys + "challenge", f"waiting for the {host}'s challenge")
    if len(n0) != NONCE_BYTES:
        raise AuthError(
            f"the process on {where} (rank 0) sent a malformed challenge ({len(n0)} bytes); "
            f"not a hosl {host} of this version"
        )
    n1 = secrets.token_bytes(NONCE_BYTES)
    put(keys + "response", n1 + proof(secret, b"joiner", n0, n1))
    verdict = wait_get(keys + "verdict", f"waiting for the {host}'s verdict on this {joiner}'s proof")
    if verdict == b"refused" and not believe_refusal:
        put(keys + "verdict-seen", b"1")
        proven = _wait_for_proven_verdict(store, keys + "verdict", secret, (n0, n1), deadline, stop_requested)
        if proven is None:
            raise AuthError(
                f"the {host} on {where} did not prove the shared secret within the connect timeout, and the "
                f"rendezvous store says it refused this side (a refusal anyone who reaches the store can write): "
                f"the two sides probably hold different secrets (pass both the same --secret-file or {SECRET_ENV})"
            )
        verdict = proven
    if verdict == b"refused":
        put(keys + "verdict-seen", b"1")
        raise AuthError(
            f"the {host} on {where} (rank 0) refused this side: the two sides hold different secrets "
            f"(pass both the same --secret-file or {SECRET_ENV})"
        )
    if not (verdict.startswith(b"ok") and proof_ok(secret, b"host", (n0, n1), verdict[2:])):
        put(keys + "joiner-verdict", b"refused")
        raise AuthError(
            f"refused the process on {where} (rank 0): it did not prove the shared secret (an impostor "
            f"{host}, or one started with another --secret-file or {SECRET_ENV}); nothing was sent to it"
        )
    put(keys + "joiner-verdict", b"ok")
    return run_id_of(secret, n0, n1)


# -- step 2: over the tensor channel --------------------------------------------------------------
def confirm_channel(endpoint, secret: bytes, run_id: str, timeout_s: float, *, encrypt: bool = False) -> None:
    """Prove the secret again over the point-to-point connection that will carry the tensors,
    with fresh nonces, so the process at its other end is the one that passed step 1; then give
    ``endpoint`` the session that authenticates (and with ``encrypt``, encrypts) every later message
    (:class:`hosl.transport.session.Session`, keys from the secret and both nonces).
    ``endpoint`` is a :class:`hosl.transport.distributed.Endpoint`; only nonces, the ``encrypt``
    flags and HMACs cross. Both sides must pass the same ``encrypt`` (else ``ConfigMismatchError``)."""
    from hosl.transport.link import ConfigMismatchError
    from hosl.transport.session import Session
    from hosl.transport.wire import Kind, Message

    host = endpoint.rank == 0
    mine_label, their_label = (b"channel-host", b"channel-joiner") if host else (b"channel-joiner", b"channel-host")
    what = "the channel check (proof of the shared secret)"

    def exchange(payload: bytes, flags: list[int]) -> Message:
        msg = Message(Kind.AUTH, ints=flags, tensors=[torch.frombuffer(bytearray(payload), dtype=torch.uint8)])
        if host:
            endpoint.send(msg, what, timeout_s)
            theirs = endpoint.recv(f"waiting for {what}", timeout_s, max_tensor_bytes=CHANNEL_CHECK_BYTES)
        else:
            theirs = endpoint.recv(f"waiting for {what}", timeout_s, max_tensor_bytes=CHANNEL_CHECK_BYTES)
            endpoint.send(msg, what, timeout_s)
        if theirs.kind != Kind.AUTH or len(theirs.tensors) != 1 or theirs.tensors[0].dtype != torch.uint8:
            raise AuthError(f"the {endpoint.peer_name} did not answer {what} (not a hosl peer of this version?)")
        return theirs

    mine = secrets.token_bytes(NONCE_BYTES)
    first = exchange(mine, [int(encrypt)])
    theirs = bytes(first.tensors[0].cpu().tolist())
    if len(theirs) != NONCE_BYTES or len(first.ints) != 1 or first.ints[0] not in (0, 1):
        raise AuthError(f"the {endpoint.peer_name} sent a malformed nonce in {what} (not a hosl peer of this version?)")
    their_encrypt = bool(first.ints[0])
    n_host, n_joiner = (mine, theirs) if host else (theirs, mine)
    enc_host, enc_joiner = (encrypt, their_encrypt) if host else (their_encrypt, encrypt)
    rid = run_id.encode("ascii")
    flags = f"encrypt={int(enc_host)},{int(enc_joiner)}".encode("ascii")  # proven: no one on the path flips them
    tag = bytes(exchange(proof(secret, mine_label, rid, n_host, n_joiner, flags), []).tensors[0].cpu().tolist())
    if not proof_ok(secret, their_label, (rid, n_host, n_joiner, flags), tag):
        raise AuthError(
            f"the connection to the {endpoint.peer_name} is not held by the process that proved the "
            f"shared secret (the rendezvous store was tampered with?); nothing else was sent"
        )
    if their_encrypt != encrypt:
        raise ConfigMismatchError(
            f"configuration mismatch with the {endpoint.peer_name}: --encrypt is {'on' if encrypt else 'off'} here "
            f"and {'on' if their_encrypt else 'off'} there; start both sides with the same --encrypt"
        )
    endpoint.session = Session(
        secret, run_id, n_host, n_joiner, is_host=host, encrypt=encrypt, peer_name=endpoint.peer_name
    )


def _wait_for_proven_verdict(
    store,
    key: str,
    secret: bytes,
    nonces: tuple[bytes, bytes],
    deadline: float,
    stop_requested: Callable[[], bool] | None,
) -> bytes | None:
    """The value of ``key`` once it holds the host's proof over ``nonces``, or None at ``deadline``."""
    while time.monotonic() < deadline:
        if stop_requested is not None and stop_requested():
            raise KeyboardInterrupt
        value = store.get(key)
        if value.startswith(b"ok") and proof_ok(secret, b"host", nonces, value[2:]):
            return value
        time.sleep(0.1)
    return None


def _poll(store, key: str, deadline: float, every_s: float = 0.05) -> bytes | None:
    """The value of ``key`` once it exists, or None at ``deadline``. Polls with ``check`` (which
    returns at once) rather than ``wait``, whose timeouts print C++ warnings."""
    while time.monotonic() < deadline:
        if store.check([key]):
            return store.get(key)
        time.sleep(every_s)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
