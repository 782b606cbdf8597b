"""What a message is and how it is laid out on the wire; nothing here sends anything.

A message is a control header plus optional payloads, each sent as its own tensor:

* header, ``int64[8]``: ``MAGIC, kind, phase, step, n_ints, n_floats, n_tensors, code``;
* ``int64[n_ints]`` and ``float64[n_floats]`` (small payloads: seeds, losses, flags), if non-empty;
* the tensors' headers packed in one ``int64[n_tensors, 2 + MAX_DIMS]`` (dtype code, ndim, shape
  padded with zeros), if any tensors;
* each tensor's bytes as ``uint8[nbytes]`` (omitted when empty).

Each part travels with its own tag (header 0, ints 1, floats 2, tensor headers 3, tensor ``i`` at
``4 + i``), so a receiver always knows what the next piece on a tag is.

Everything is a fixed-layout integer/float tensor or raw tensor bytes: no pickling. ``kind`` says
whether the message is a request, a reply, an error (the payload is a UTF-8 text as a uint8
tensor), or a shutdown notice (``code`` says why). ``phase`` is an opaque small integer that the
layer above gives meaning to; the transport never interprets it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

PROTOCOL_VERSION = 1
MAGIC = 0x484F534C  # "HOSL"
HEADER_LEN = 8
MAX_DIMS = 8
TENSOR_HEADER_LEN = 2 + MAX_DIMS


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    SHUTDOWN = 4
    HELLO = 5
    AUTH = 6  # a nonce or an HMAC proof of the shared secret (hosl/transport/auth.py)


class ShutdownCode(enum.IntEnum):
    """Why a side says goodbye (the ``code`` field of a SHUTDOWN message)."""

    DONE = 0
    INTERRUPTED = 130
    FAILED = 1


# dtype <-> small integer. Order is part of the protocol: append only.
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
DTYPE_CODES = {dt: i for i, dt in enumerate(DTYPES)}


@dataclass
class Message:
    kind: Kind
    phase: int = 0
    step: int = 0
    ints: list[int] = field(default_factory=list)
    floats: list[float] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    code: int = 0

    def header(self) -> torch.Tensor:
        return torch.tensor(
            [
                MAGIC,
                int(self.kind),
                self.phase,
                self.step,
                len(self.ints),
                len(self.floats),
                len(self.tensors),
                self.code,
            ],
            dtype=torch.int64,
        )


MAX_SMALL_PAYLOAD = 1 << 24  # ints/floats in one message; a header claiming more is malformed
MAX_TENSORS = 1 << 16


def check_header(values: list[int]) -> str | None:
    """What is wrong with a received header (``int64[8]``), or None when it is well formed."""
    magic, kind, _phase, _step, n_ints, n_floats, n_tensors, _code = values
    if magic != MAGIC:
        return "something that is not a hosl message (bad magic number)"
    if kind not in {int(k) for k in Kind}:
        return f"a message of unknown kind {kind}"
    for name, n, limit in (
        ("ints", n_ints, MAX_SMALL_PAYLOAD),
        ("floats", n_floats, MAX_SMALL_PAYLOAD),
        ("tensors", n_tensors, MAX_TENSORS),
    ):
        if not 0 <= n <= limit:
            return f"a malformed header ({n} {name})"
    return None


def tensor_header(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot send a {t.dtype} tensor; supported: {', '.join(map(str, DTYPES))}")
    if t.dim() > MAX_DIMS:
        raise ValueError(f"cannot send a tensor with {t.dim()} dimensions (at most {MAX_DIMS})")
    shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
    return torch.tensor([DTYPE_CODES[t.dtype], t.dim(), *shape], dtype=torch.int64)


def parse_tensor_header(h: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    code, ndim, *shape = h.tolist()
    if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS or any(n < 0 for n in shape):
        raise ValueError(f"malformed tensor header {h.tolist()}")
    return DTYPES[code], tuple(shape[:ndim])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat uint8 tensor (what crosses the wire)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def message_nbytes(msg: Message) -> int:
    """Bytes the message occupies on the wire (headers included); both links count with this."""
    n = HEADER_LEN * 8 + 8 * len(msg.ints) + 8 * len(msg.floats) + TENSOR_HEADER_LEN * 8 * len(msg.tensors)
    return n + sum(t.numel() * t.element_size() for t in msg.tensors)


def text_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def tensor_text(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("utf-8", errors="replace")


def to_int64(value: int) -> int:
    """An unsigned 64-bit value (e.g. a direction seed) as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


def from_int64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
